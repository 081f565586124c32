from pomona.proto import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "raw", "max_tokens", "sampling", "stop", "ignore_eos")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    raw: bool
    max_tokens: int
    sampling: _worker_pb2.SamplingParams
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., raw: _Optional[bool] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_worker_pb2.SamplingParams, _Mapping]] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "token_ids", "summary")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    summary: GenerateSummary
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., summary: _Optional[_Union[GenerateSummary, _Mapping]] = ...) -> None: ...

class GenerateSummary(_message.Message):
    __slots__ = ("finish_reason", "prompt_tokens", "generated_tokens", "ttft_s", "decode_tok_s", "token_ids", "text")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOK_S_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_tok_s: float
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., ttft_s: _Optional[float] = ..., decode_tok_s: _Optional[float] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ("include_workers",)
    INCLUDE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    include_workers: bool
    def __init__(self, include_workers: _Optional[bool] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("node", "address", "layer_start", "layer_end", "is_first", "is_last", "parameter_bytes", "rss_bytes", "memory_total_bytes", "active_requests", "state", "load_fraction", "experts_only")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    IS_FIRST_FIELD_NUMBER: _ClassVar[int]
    IS_LAST_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_ONLY_FIELD_NUMBER: _ClassVar[int]
    node: str
    address: str
    layer_start: int
    layer_end: int
    is_first: bool
    is_last: bool
    parameter_bytes: int
    rss_bytes: int
    memory_total_bytes: int
    active_requests: int
    state: str
    load_fraction: float
    experts_only: bool
    def __init__(self, node: _Optional[str] = ..., address: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., is_first: _Optional[bool] = ..., is_last: _Optional[bool] = ..., parameter_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., active_requests: _Optional[int] = ..., state: _Optional[str] = ..., load_fraction: _Optional[float] = ..., experts_only: _Optional[bool] = ...) -> None: ...

class ExpertGroupInfo(_message.Message):
    __slots__ = ("node", "layer", "expert_ids")
    NODE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    node: str
    layer: int
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, node: _Optional[str] = ..., layer: _Optional[int] = ..., expert_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("state", "error", "model", "architecture", "num_layers", "stages", "active_requests", "message", "expert_groups")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_GROUPS_FIELD_NUMBER: _ClassVar[int]
    state: str
    error: str
    model: str
    architecture: str
    num_layers: int
    stages: _containers.RepeatedCompositeFieldContainer[StageInfo]
    active_requests: int
    message: str
    expert_groups: _containers.RepeatedCompositeFieldContainer[ExpertGroupInfo]
    def __init__(self, state: _Optional[str] = ..., error: _Optional[str] = ..., model: _Optional[str] = ..., architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ..., active_requests: _Optional[int] = ..., message: _Optional[str] = ..., expert_groups: _Optional[_Iterable[_Union[ExpertGroupInfo, _Mapping]]] = ...) -> None: ...

class ExpertStatsQuery(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeExpertStats(_message.Message):
    __slots__ = ("node", "stats")
    NODE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    node: str
    stats: _worker_pb2.ExpertStatsReply
    def __init__(self, node: _Optional[str] = ..., stats: _Optional[_Union[_worker_pb2.ExpertStatsReply, _Mapping]] = ...) -> None: ...

class ClusterExpertStats(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeExpertStats]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeExpertStats, _Mapping]]] = ...) -> None: ...

class StopClusterRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopClusterReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
