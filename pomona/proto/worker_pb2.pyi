from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "seed", "logprobs", "top_logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    logprobs: bool
    top_logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., seed: _Optional[int] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("hostname", "platform", "memory_total_bytes", "memory_available_bytes", "pid", "mlx_device", "version", "gpu_working_set_bytes", "ring_port")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    MLX_DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GPU_WORKING_SET_BYTES_FIELD_NUMBER: _ClassVar[int]
    RING_PORT_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    platform: str
    memory_total_bytes: int
    memory_available_bytes: int
    pid: int
    mlx_device: str
    version: str
    gpu_working_set_bytes: int
    ring_port: int
    def __init__(self, hostname: _Optional[str] = ..., platform: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., pid: _Optional[int] = ..., mlx_device: _Optional[str] = ..., version: _Optional[str] = ..., gpu_working_set_bytes: _Optional[int] = ..., ring_port: _Optional[int] = ...) -> None: ...

class ProfileRequest(_message.Message):
    __slots__ = ("model_path", "prefill_chunk_tokens", "short_context", "long_context", "time_budget_s")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SHORT_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    LONG_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TIME_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    prefill_chunk_tokens: int
    short_context: int
    long_context: int
    time_budget_s: float
    def __init__(self, model_path: _Optional[str] = ..., prefill_chunk_tokens: _Optional[int] = ..., short_context: _Optional[int] = ..., long_context: _Optional[int] = ..., time_budget_s: _Optional[float] = ...) -> None: ...

class ComputeProfile(_message.Message):
    __slots__ = ("decode_layer_s", "decode_layer_long_s", "short_context", "long_context", "prefill_layer_s", "prefill_chunk_tokens", "embed_s", "head_s", "expert_s", "experts_per_token", "source")
    DECODE_LAYER_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_LAYER_LONG_S_FIELD_NUMBER: _ClassVar[int]
    SHORT_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    LONG_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PREFILL_LAYER_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EMBED_S_FIELD_NUMBER: _ClassVar[int]
    HEAD_S_FIELD_NUMBER: _ClassVar[int]
    EXPERT_S_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    decode_layer_s: _containers.RepeatedScalarFieldContainer[float]
    decode_layer_long_s: _containers.RepeatedScalarFieldContainer[float]
    short_context: int
    long_context: int
    prefill_layer_s: _containers.RepeatedScalarFieldContainer[float]
    prefill_chunk_tokens: int
    embed_s: float
    head_s: float
    expert_s: _containers.RepeatedScalarFieldContainer[float]
    experts_per_token: int
    source: str
    def __init__(self, decode_layer_s: _Optional[_Iterable[float]] = ..., decode_layer_long_s: _Optional[_Iterable[float]] = ..., short_context: _Optional[int] = ..., long_context: _Optional[int] = ..., prefill_layer_s: _Optional[_Iterable[float]] = ..., prefill_chunk_tokens: _Optional[int] = ..., embed_s: _Optional[float] = ..., head_s: _Optional[float] = ..., expert_s: _Optional[_Iterable[float]] = ..., experts_per_token: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class ProfileReply(_message.Message):
    __slots__ = ("compute", "cached", "elapsed_s", "power_measured", "idle_w", "busy_w", "power_meter", "power_note")
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    POWER_MEASURED_FIELD_NUMBER: _ClassVar[int]
    IDLE_W_FIELD_NUMBER: _ClassVar[int]
    BUSY_W_FIELD_NUMBER: _ClassVar[int]
    POWER_METER_FIELD_NUMBER: _ClassVar[int]
    POWER_NOTE_FIELD_NUMBER: _ClassVar[int]
    compute: ComputeProfile
    cached: bool
    elapsed_s: float
    power_measured: bool
    idle_w: float
    busy_w: float
    power_meter: str
    power_note: str
    def __init__(self, compute: _Optional[_Union[ComputeProfile, _Mapping]] = ..., cached: _Optional[bool] = ..., elapsed_s: _Optional[float] = ..., power_measured: _Optional[bool] = ..., idle_w: _Optional[float] = ..., busy_w: _Optional[float] = ..., power_meter: _Optional[str] = ..., power_note: _Optional[str] = ...) -> None: ...

class MeasureLinksRequest(_message.Message):
    __slots__ = ("targets", "small_bytes", "large_bytes", "small_rounds", "large_rounds", "timeout_s")
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    SMALL_BYTES_FIELD_NUMBER: _ClassVar[int]
    LARGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SMALL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LARGE_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[LinkTarget]
    small_bytes: int
    large_bytes: int
    small_rounds: int
    large_rounds: int
    timeout_s: float
    def __init__(self, targets: _Optional[_Iterable[_Union[LinkTarget, _Mapping]]] = ..., small_bytes: _Optional[int] = ..., large_bytes: _Optional[int] = ..., small_rounds: _Optional[int] = ..., large_rounds: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class LinkTarget(_message.Message):
    __slots__ = ("name", "address")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class LinkMeasurement(_message.Message):
    __slots__ = ("target", "rtt_median_s", "rtt_p90_s", "bandwidth_bytes_per_s", "error")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    RTT_MEDIAN_S_FIELD_NUMBER: _ClassVar[int]
    RTT_P90_S_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    target: str
    rtt_median_s: float
    rtt_p90_s: float
    bandwidth_bytes_per_s: float
    error: str
    def __init__(self, target: _Optional[str] = ..., rtt_median_s: _Optional[float] = ..., rtt_p90_s: _Optional[float] = ..., bandwidth_bytes_per_s: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class MeasureLinksReply(_message.Message):
    __slots__ = ("links",)
    LINKS_FIELD_NUMBER: _ClassVar[int]
    links: _containers.RepeatedCompositeFieldContainer[LinkMeasurement]
    def __init__(self, links: _Optional[_Iterable[_Union[LinkMeasurement, _Mapping]]] = ...) -> None: ...

class LoadShardRequest(_message.Message):
    __slots__ = ("model_path", "layer_start", "layer_end", "is_first", "is_last", "next_address", "stage_index", "stage_count", "node_name", "experts", "remote_experts", "experts_only", "next_node", "micro_batches", "transport", "ring_hosts", "prompt_cache_tokens")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    IS_FIRST_FIELD_NUMBER: _ClassVar[int]
    IS_LAST_FIELD_NUMBER: _ClassVar[int]
    NEXT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    STAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_ONLY_FIELD_NUMBER: _ClassVar[int]
    NEXT_NODE_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    RING_HOSTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    layer_start: int
    layer_end: int
    is_first: bool
    is_last: bool
    next_address: str
    stage_index: int
    stage_count: int
    node_name: str
    experts: _containers.RepeatedCompositeFieldContainer[ExpertGroup]
    remote_experts: _containers.RepeatedCompositeFieldContainer[RemoteExperts]
    experts_only: bool
    next_node: str
    micro_batches: int
    transport: str
    ring_hosts: _containers.RepeatedScalarFieldContainer[str]
    prompt_cache_tokens: int
    def __init__(self, model_path: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., is_first: _Optional[bool] = ..., is_last: _Optional[bool] = ..., next_address: _Optional[str] = ..., stage_index: _Optional[int] = ..., stage_count: _Optional[int] = ..., node_name: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[ExpertGroup, _Mapping]]] = ..., remote_experts: _Optional[_Iterable[_Union[RemoteExperts, _Mapping]]] = ..., experts_only: _Optional[bool] = ..., next_node: _Optional[str] = ..., micro_batches: _Optional[int] = ..., transport: _Optional[str] = ..., ring_hosts: _Optional[_Iterable[str]] = ..., prompt_cache_tokens: _Optional[int] = ...) -> None: ...

class ExpertGroup(_message.Message):
    __slots__ = ("layer", "expert_ids")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., expert_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RemoteExperts(_message.Message):
    __slots__ = ("layer", "node", "address", "expert_ids")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    node: str
    address: str
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., node: _Optional[str] = ..., address: _Optional[str] = ..., expert_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class LoadProgress(_message.Message):
    __slots__ = ("fraction", "message", "done", "error", "parameter_bytes", "rss_bytes")
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    fraction: float
    message: str
    done: bool
    error: str
    parameter_bytes: int
    rss_bytes: int
    def __init__(self, fraction: _Optional[float] = ..., message: _Optional[str] = ..., done: _Optional[bool] = ..., error: _Optional[str] = ..., parameter_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("counters_only",)
    COUNTERS_ONLY_FIELD_NUMBER: _ClassVar[int]
    counters_only: bool
    def __init__(self, counters_only: _Optional[bool] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("loaded", "layer_start", "layer_end", "is_first", "is_last", "active_requests", "parameter_bytes", "rss_bytes", "cache_bytes", "model_path", "busy_s", "decode_busy_s", "decode_steps", "energy_measured", "energy_j", "power_meter", "batch_steps", "batch_rows", "prompt_cache_bytes")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    IS_FIRST_FIELD_NUMBER: _ClassVar[int]
    IS_LAST_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    BUSY_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_BUSY_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_MEASURED_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    POWER_METER_FIELD_NUMBER: _ClassVar[int]
    BATCH_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    loaded: bool
    layer_start: int
    layer_end: int
    is_first: bool
    is_last: bool
    active_requests: int
    parameter_bytes: int
    rss_bytes: int
    cache_bytes: int
    model_path: str
    busy_s: float
    decode_busy_s: float
    decode_steps: int
    energy_measured: bool
    energy_j: float
    power_meter: str
    batch_steps: int
    batch_rows: int
    prompt_cache_bytes: int
    def __init__(self, loaded: _Optional[bool] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., is_first: _Optional[bool] = ..., is_last: _Optional[bool] = ..., active_requests: _Optional[int] = ..., parameter_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., model_path: _Optional[str] = ..., busy_s: _Optional[float] = ..., decode_busy_s: _Optional[float] = ..., decode_steps: _Optional[int] = ..., energy_measured: _Optional[bool] = ..., energy_j: _Optional[float] = ..., power_meter: _Optional[str] = ..., batch_steps: _Optional[int] = ..., batch_rows: _Optional[int] = ..., prompt_cache_bytes: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShutdownReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StartRequest(_message.Message):
    __slots__ = ("prompt_token_ids", "sampling", "max_tokens", "eos_token_ids", "prefill_chunk_tokens", "generated_before", "max_batch", "evict", "reuse_entry", "reuse_tokens", "keep")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    EVICT_FIELD_NUMBER: _ClassVar[int]
    REUSE_ENTRY_FIELD_NUMBER: _ClassVar[int]
    REUSE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    max_tokens: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prefill_chunk_tokens: int
    generated_before: int
    max_batch: int
    evict: _containers.RepeatedScalarFieldContainer[str]
    reuse_entry: str
    reuse_tokens: int
    keep: bool
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_tokens: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., prefill_chunk_tokens: _Optional[int] = ..., generated_before: _Optional[int] = ..., max_batch: _Optional[int] = ..., evict: _Optional[_Iterable[str]] = ..., reuse_entry: _Optional[str] = ..., reuse_tokens: _Optional[int] = ..., keep: _Optional[bool] = ...) -> None: ...

class Activations(_message.Message):
    __slots__ = ("hidden",)
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DecodeStep(_message.Message):
    __slots__ = ("batch", "step", "request_ids", "hidden")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    batch: int
    step: int
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    hidden: Tensor
    def __init__(self, batch: _Optional[int] = ..., step: _Optional[int] = ..., request_ids: _Optional[_Iterable[str]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PrefillRows(_message.Message):
    __slots__ = ("request_ids", "lengths", "hidden")
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    hidden: Tensor
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ..., lengths: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DecodeTokens(_message.Message):
    __slots__ = ("batch", "step", "request_ids", "token_ids")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    batch: int
    step: int
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, batch: _Optional[int] = ..., step: _Optional[int] = ..., request_ids: _Optional[_Iterable[str]] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class EndRequest(_message.Message):
    __slots__ = ("origin", "finished")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    origin: int
    finished: bool
    def __init__(self, origin: _Optional[int] = ..., finished: _Optional[bool] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageMessage(_message.Message):
    __slots__ = ("request_id", "start", "activations", "end", "cancel", "decode_step", "decode_tokens", "prefill_rows")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ROWS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    start: StartRequest
    activations: Activations
    end: EndRequest
    cancel: CancelRequest
    decode_step: DecodeStep
    decode_tokens: DecodeTokens
    prefill_rows: PrefillRows
    def __init__(self, request_id: _Optional[str] = ..., start: _Optional[_Union[StartRequest, _Mapping]] = ..., activations: _Optional[_Union[Activations, _Mapping]] = ..., end: _Optional[_Union[EndRequest, _Mapping]] = ..., cancel: _Optional[_Union[CancelRequest, _Mapping]] = ..., decode_step: _Optional[_Union[DecodeStep, _Mapping]] = ..., decode_tokens: _Optional[_Union[DecodeTokens, _Mapping]] = ..., prefill_rows: _Optional[_Union[PrefillRows, _Mapping]] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResultsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertRequest(_message.Message):
    __slots__ = ("layer", "hidden", "pair_rows", "pair_experts", "dispatch_id")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    PAIR_ROWS_FIELD_NUMBER: _ClassVar[int]
    PAIR_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_ID_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: Tensor
    pair_rows: _containers.RepeatedScalarFieldContainer[int]
    pair_experts: _containers.RepeatedScalarFieldContainer[int]
    dispatch_id: int
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., pair_rows: _Optional[_Iterable[int]] = ..., pair_experts: _Optional[_Iterable[int]] = ..., dispatch_id: _Optional[int] = ...) -> None: ...

class ExpertReply(_message.Message):
    __slots__ = ("output", "error", "dispatch_id")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_ID_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    error: str
    dispatch_id: int
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., error: _Optional[str] = ..., dispatch_id: _Optional[int] = ...) -> None: ...

class ExpertStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerExpertTokens(_message.Message):
    __slots__ = ("layer", "expert_ids", "tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., expert_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class LinkTraffic(_message.Message):
    __slots__ = ("node", "dispatches", "bytes_sent", "bytes_received")
    NODE_FIELD_NUMBER: _ClassVar[int]
    DISPATCHES_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    node: str
    dispatches: int
    bytes_sent: int
    bytes_received: int
    def __init__(self, node: _Optional[str] = ..., dispatches: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class ExpertStatsReply(_message.Message):
    __slots__ = ("layers", "links")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerExpertTokens]
    links: _containers.RepeatedCompositeFieldContainer[LinkTraffic]
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerExpertTokens, _Mapping]]] = ..., links: _Optional[_Iterable[_Union[LinkTraffic, _Mapping]]] = ...) -> None: ...

class PingMessage(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class TokenLogprobs(_message.Message):
    __slots__ = ("logprob", "top_token_ids", "top_logprobs")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprob: _Optional[float] = ..., top_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class TokenEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[TokenEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[TokenEvent, _Mapping]]] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("request_id", "token_id", "finish_reason", "error", "logprobs", "cached_prompt_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_id: int
    finish_reason: str
    error: str
    logprobs: TokenLogprobs
    cached_prompt_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., token_id: _Optional[int] = ..., finish_reason: _Optional[str] = ..., error: _Optional[str] = ..., logprobs: _Optional[_Union[TokenLogprobs, _Mapping]] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...
