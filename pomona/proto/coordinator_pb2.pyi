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
    __slots__ = ("text", "token_ids", "summary", "logprobs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    summary: GenerateSummary
    logprobs: _containers.RepeatedCompositeFieldContainer[_worker_pb2.TokenLogprobs]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., summary: _Optional[_Union[GenerateSummary, _Mapping]] = ..., logprobs: _Optional[_Iterable[_Union[_worker_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class GenerateSummary(_message.Message):
    __slots__ = ("finish_reason", "prompt_tokens", "generated_tokens", "ttft_s", "decode_tok_s", "token_ids", "text", "energy_j", "j_per_token", "energy_source", "cached_prompt_tokens")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOK_S_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    J_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_tok_s: float
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    energy_j: float
    j_per_token: float
    energy_source: str
    cached_prompt_tokens: int
    def __init__(self, finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., ttft_s: _Optional[float] = ..., decode_tok_s: _Optional[float] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., energy_j: _Optional[float] = ..., j_per_token: _Optional[float] = ..., energy_source: _Optional[str] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ("include_workers",)
    INCLUDE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    include_workers: bool
    def __init__(self, include_workers: _Optional[bool] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("node", "address", "layer_start", "layer_end", "is_first", "is_last", "parameter_bytes", "rss_bytes", "memory_total_bytes", "active_requests", "state", "load_fraction", "experts_only", "predicted_compute_s", "measured_compute_s", "hop_latency_s", "next_node", "power_w", "energy_j", "power_basis", "cache_bytes", "batch_steps", "batch_rows", "decode_steps", "decode_busy_s", "prompt_cache_bytes")
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
    PREDICTED_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    MEASURED_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    HOP_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    NEXT_NODE_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    POWER_BASIS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCH_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECODE_BUSY_S_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
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
    predicted_compute_s: float
    measured_compute_s: float
    hop_latency_s: float
    next_node: str
    power_w: float
    energy_j: float
    power_basis: str
    cache_bytes: int
    batch_steps: int
    batch_rows: int
    decode_steps: int
    decode_busy_s: float
    prompt_cache_bytes: int
    def __init__(self, node: _Optional[str] = ..., address: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., is_first: _Optional[bool] = ..., is_last: _Optional[bool] = ..., parameter_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., active_requests: _Optional[int] = ..., state: _Optional[str] = ..., load_fraction: _Optional[float] = ..., experts_only: _Optional[bool] = ..., predicted_compute_s: _Optional[float] = ..., measured_compute_s: _Optional[float] = ..., hop_latency_s: _Optional[float] = ..., next_node: _Optional[str] = ..., power_w: _Optional[float] = ..., energy_j: _Optional[float] = ..., power_basis: _Optional[str] = ..., cache_bytes: _Optional[int] = ..., batch_steps: _Optional[int] = ..., batch_rows: _Optional[int] = ..., decode_steps: _Optional[int] = ..., decode_busy_s: _Optional[float] = ..., prompt_cache_bytes: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("decode_tok_s", "ttft_s", "throughput_tok_s", "j_per_token", "energy_basis", "bottleneck")
    DECODE_TOK_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_TOK_S_FIELD_NUMBER: _ClassVar[int]
    J_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ENERGY_BASIS_FIELD_NUMBER: _ClassVar[int]
    BOTTLENECK_FIELD_NUMBER: _ClassVar[int]
    decode_tok_s: float
    ttft_s: float
    throughput_tok_s: float
    j_per_token: float
    energy_basis: str
    bottleneck: str
    def __init__(self, decode_tok_s: _Optional[float] = ..., ttft_s: _Optional[float] = ..., throughput_tok_s: _Optional[float] = ..., j_per_token: _Optional[float] = ..., energy_basis: _Optional[str] = ..., bottleneck: _Optional[str] = ...) -> None: ...

class PlanOptionInfo(_message.Message):
    __slots__ = ("name", "stages", "predicted", "note")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    stages: _containers.RepeatedCompositeFieldContainer[StageInfo]
    predicted: Prediction
    note: str
    def __init__(self, name: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ..., predicted: _Optional[_Union[Prediction, _Mapping]] = ..., note: _Optional[str] = ...) -> None: ...

class LeftOutNode(_message.Message):
    __slots__ = ("node", "reason")
    NODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node: str
    reason: str
    def __init__(self, node: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("state", "error", "model", "architecture", "num_layers", "stages", "active_requests", "message", "expert_groups", "objective", "predicted", "left_out", "baselines", "energy_j", "energy_basis", "plan_note", "expert_load", "power_notes")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_GROUPS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    LEFT_OUT_FIELD_NUMBER: _ClassVar[int]
    BASELINES_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    ENERGY_BASIS_FIELD_NUMBER: _ClassVar[int]
    PLAN_NOTE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOAD_FIELD_NUMBER: _ClassVar[int]
    POWER_NOTES_FIELD_NUMBER: _ClassVar[int]
    state: str
    error: str
    model: str
    architecture: str
    num_layers: int
    stages: _containers.RepeatedCompositeFieldContainer[StageInfo]
    active_requests: int
    message: str
    expert_groups: _containers.RepeatedCompositeFieldContainer[ExpertGroupInfo]
    objective: str
    predicted: Prediction
    left_out: _containers.RepeatedCompositeFieldContainer[LeftOutNode]
    baselines: _containers.RepeatedCompositeFieldContainer[PlanOptionInfo]
    energy_j: float
    energy_basis: str
    plan_note: str
    expert_load: str
    power_notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, state: _Optional[str] = ..., error: _Optional[str] = ..., model: _Optional[str] = ..., architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ..., active_requests: _Optional[int] = ..., message: _Optional[str] = ..., expert_groups: _Optional[_Iterable[_Union[ExpertGroupInfo, _Mapping]]] = ..., objective: _Optional[str] = ..., predicted: _Optional[_Union[Prediction, _Mapping]] = ..., left_out: _Optional[_Iterable[_Union[LeftOutNode, _Mapping]]] = ..., baselines: _Optional[_Iterable[_Union[PlanOptionInfo, _Mapping]]] = ..., energy_j: _Optional[float] = ..., energy_basis: _Optional[str] = ..., plan_note: _Optional[str] = ..., expert_load: _Optional[str] = ..., power_notes: _Optional[_Iterable[str]] = ...) -> None: ...

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
