"""Expert parallelism on the worker: routed experts of MoE layers held by several nodes.

Each family's routing code stays mlx-lm's own: only the expert module (mlx-lm's ``SwitchGLU``,
called as ``experts(x, indices)`` after routing) is replaced on the stage node by a
``DistributedSwitchGLU``. Per call it evaluates the routing, sends every token's hidden state once
to each node holding one of its chosen experts (all nodes at once), runs the local experts
meanwhile, and puts each (token, expert) output where the original module would have: the
family's own code then weights and sums them exactly as the reference does.

Nodes load only the experts they hold: the stacked expert tensors (and the scales and biases of
quantized checkpoints) are read row by row straight from the safetensors files, so the other
experts' bytes are never read.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from pomona.errors import ModelError
from pomona.proto import worker_pb2

from .link import LinkBroken
from .wire import decode_tensor, encode_tensor, host_view, tensor_from_host

log = logging.getLogger(__name__)

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32,
           "I32": np.int32, "U8": np.uint8}  # fmt: skip


class SafetensorsIndex:
    """Where each tensor of a checkpoint directory lies on disk, read from the files' headers."""

    def __init__(self, directory: Path):
        self.tensors: dict[str, tuple[Path, str, list[int], int]] = {}
        for path in sorted(directory.glob("*.safetensors")):
            with open(path, "rb") as file:
                (length,) = struct.unpack("<Q", file.read(8))
                header = json.loads(file.read(length))
            for name, entry in header.items():
                if name != "__metadata__":
                    start = 8 + length + entry["data_offsets"][0]
                    self.tensors[name] = (path, entry["dtype"], entry["shape"], start)

    def read_rows(self, name: str, rows: list[int]) -> mx.array:
        """Rows (along axis 0) of a stacked tensor, reading only their bytes."""
        if name not in self.tensors:
            raise ModelError(
                f"the checkpoint has no tensor {name}: expert parallelism needs stacked expert "
                "tensors as mlx-lm writes them (convert the model with mlx_lm.convert)"
            )
        path, dtype, shape, start = self.tensors[name]
        numpy_dtype = _DTYPES[dtype]
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(numpy_dtype).itemsize
        with open(path, "rb") as file:
            chunks = []
            for row in rows:
                file.seek(start + row * row_bytes)
                chunks.append(np.frombuffer(file.read(row_bytes), dtype=numpy_dtype))
        array = mx.array(np.stack(chunks).reshape(len(rows), *shape[1:]))
        return array.view(mx.bfloat16) if dtype == "BF16" else array


def keep_experts(module: nn.Module, module_path: str, index: SafetensorsIndex, ids: list[int]):
    """Replace a SwitchGLU's stacked (lazy) parameters by the rows of the experts ``ids``."""
    for projection_name, projection in module.children().items():
        if not isinstance(projection, nn.Module):
            continue
        for name in ("weight", "scales", "biases", "bias"):
            if name in projection:
                projection[name] = index.read_rows(f"{module_path}.{projection_name}.{name}", ids)


def _add_counts(target: dict[int, int], per_expert: list[int]) -> None:
    """Add a device counter's figures (tokens of expert 0, 1, ...) into `target` (a defaultdict)."""
    for expert, count in enumerate(per_expert):
        if count:
            target[expert] += count


class ExpertStats:
    """Tokens computed per (layer, expert) on this node, and traffic per dispatch link."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.tokens: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.links: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        # Layers counted on the device (worker.expert_counts): read under the engine's MLX lock.
        self._counters: list[tuple[int, Callable[[], list[int]]]] = []

    def add_counter(self, layer: int, read: Callable[[], list[int]]) -> None:
        with self._lock:
            self._counters.append((layer, read))

    def fold_counters(self) -> None:
        """Move the device counters' figures into `tokens` and drop them (the shard is going)."""
        with self._lock:
            counters, self._counters = self._counters, []
        figures = [(layer, read()) for layer, read in counters]
        with self._lock:
            for layer, per_expert in figures:
                _add_counts(self.tokens[layer], per_expert)

    def count_tokens(self, layer: int, experts: np.ndarray) -> None:
        ids, counts = np.unique(experts, return_counts=True)
        with self._lock:
            for expert, count in zip(ids.tolist(), counts.tolist()):
                self.tokens[layer][expert] += count

    def count_link(self, node: str, sent: int, received: int) -> None:
        with self._lock:
            entry = self.links[node]
            entry[0] += 1
            entry[1] += sent
            entry[2] += received

    def to_proto(self) -> worker_pb2.ExpertStatsReply:
        """Everything counted so far (call it where MLX may run: it reads device counters)."""
        with self._lock:
            counters = list(self._counters)
        live = [(layer, read()) for layer, read in counters]
        with self._lock:
            reply = worker_pb2.ExpertStatsReply()
            totals = {layer: defaultdict(int, counts) for layer, counts in self.tokens.items()}
            for layer, per_expert in live:
                _add_counts(totals.setdefault(layer, defaultdict(int)), per_expert)
            for layer in sorted(totals):
                counts = totals[layer]
                ids = sorted(counts)
                reply.layers.add(layer=layer, expert_ids=ids, tokens=[counts[i] for i in ids])
            for node in sorted(self.links):
                dispatches, sent, received = self.links[node]
                reply.links.add(
                    node=node, dispatches=dispatches, bytes_sent=sent, bytes_received=received
                )
            return reply


class ExpertTable:
    """Which holder computes each expert of a layer: this node or one of its links."""

    def __init__(self, num_experts: int, local_ids: list[int], remote: dict[str, list[int]]):
        self._local_ids, self._remote = list(local_ids), {n: list(ids) for n, ids in remote.items()}
        self.local_index = np.full(num_experts, -1, dtype=np.int32)
        self.local_index[local_ids] = np.arange(len(local_ids), dtype=np.int32)
        self.holders: list[list[str]] = [[] for _ in range(num_experts)]
        for node, ids in remote.items():
            for expert in ids:
                self.holders[expert].append(node)
        self.nodes = sorted(remote)
        missing = [e for e in range(num_experts) if self.local_index[e] < 0 and not self.holders[e]]
        if missing:
            raise ModelError(f"experts {missing} are held by no node")
        # Replicas take turns call by call: row c of the table gives each expert's owner on calls
        # c, c + period, ... (-1: local), so a call looks its owners up in one numpy gather.
        counts = [len(h) for h in self.holders if h]
        self._period = math.lcm(*counts) if counts else 1
        self._table = np.full((self._period, num_experts), -1, dtype=np.int32)
        for expert, holders in enumerate(self.holders):
            if self.local_index[expert] < 0:
                for call in range(self._period):
                    self._table[call, expert] = self.nodes.index(holders[call % len(holders)])
        self._calls = 0

    def without(self, down: frozenset[str]) -> ExpertTable | None:
        """This table with the nodes `down` gone (their experts served by the other holders),
        or None when some expert would be left with no holder."""
        remote = {node: ids for node, ids in self._remote.items() if node not in down}
        try:
            return ExpertTable(len(self.local_index), self._local_ids, remote)
        except ModelError:
            return None

    def owners(self, experts: np.ndarray) -> np.ndarray:
        """Per pair: -1 for a local expert, else the index of the node (in ``nodes``) that runs it."""
        self._calls += 1
        return self._table[self._calls % self._period][experts]


class DistributedSwitchGLU(nn.Module):
    """Drop-in for mlx-lm's SwitchGLU whose experts live on several nodes.

    A holder whose link is down is skipped while its experts have other holders (replicas): a
    dispatch it cannot answer goes again to those, at once; an expert with no live holder fails
    the layer (and so its requests), naming the node."""

    def __init__(self, layer: int, local: nn.Module | None, table: ExpertTable, dispatcher):
        super().__init__()
        self.layer = layer
        if local is not None:
            self.local = local  # mlx-lm's SwitchGLU holding only this node's experts
        self._table = table
        self._dispatcher = dispatcher
        self._tables: dict[frozenset[str], ExpertTable | None] = {frozenset(): table}

    def _table_without(self, down: frozenset[str]) -> ExpertTable | None:
        if down not in self._tables:
            self._tables[down] = self._table.without(down)
            if self._tables[down] is not None:
                names = ", ".join(repr(node) for node in sorted(down))
                log.warning("layer %d: expert node %s is down; its experts go to their replicas",
                            self.layer, names)
        return self._tables[down]

    def _down(self) -> frozenset[str]:
        links = self._dispatcher.links
        return frozenset(node for node in self._table.nodes if node in links and links[node].broken)

    def _send(self, table, owner, pairs, experts, rows, host, dtype, sent, down) -> None:
        """Send `pairs` (indices into the layer's pairs; `owner` gives their nodes in `table`),
        each destination once with its tokens; a node found down is retried via the replicas."""
        dispatcher = self._dispatcher
        for node_index, node in enumerate(table.nodes):
            mine = pairs[owner == node_index]
            if not mine.size:
                continue
            tokens, pair_rows = np.unique(rows[mine], return_inverse=True)
            request = worker_pb2.ExpertRequest(
                layer=self.layer, hidden=tensor_from_host(host[tokens], dtype),
                pair_rows=pair_rows.astype(np.int32).tolist(),
                pair_experts=experts[mine].tolist(),
            )
            try:
                dispatch_id = dispatcher.send(node, request)
            except LinkBroken:
                self._resend(node, mine, experts, rows, host, dtype, sent, down)
                continue
            sent.append((node, mine, dispatch_id, request.ByteSize()))

    def _resend(self, node, pairs, experts, rows, host, dtype, sent, down) -> None:
        down |= {node}
        table = self._table_without(frozenset(down))
        if table is None:
            raise LinkBroken(f"expert {self._dispatcher.links[node].broken or 'node ' + repr(node)}")
        self._send(table, table.owners(experts[pairs]), pairs, experts, rows, host, dtype, sent, down)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        k, width = indices.shape[-1], x.shape[-1]
        flat = x.reshape(-1, width)  # [tokens, D]
        experts = np.array(indices.reshape(-1)).astype(np.int32)  # [tokens * k]: routing decided
        rows = np.repeat(np.arange(flat.shape[0], dtype=np.int32), k)
        down = set(self._down())
        table = self._table_without(frozenset(down))
        if table is None:
            raise LinkBroken(f"expert {' and '.join(self._dispatcher.links[n].broken for n in sorted(down))}")
        owner = table.owners(experts)
        dispatcher = self._dispatcher
        sent = []  # (node, pairs, dispatch id, bytes sent)
        parts = []  # (pairs, output [pairs, D])
        try:
            host = dtype = None
            if (owner >= 0).any():
                # One host view of the tokens (already evaluated with the routing); each
                # destination gets its rows from it, each token once however many of its
                # experts the node holds.
                host, dtype = host_view(flat)
                remote = np.nonzero(owner >= 0)[0]
                self._send(table, owner[remote], remote, experts, rows, host, dtype, sent, down)
            local_pairs = np.nonzero(owner < 0)[0]
            if local_pairs.size:
                # Computed while the remote nodes work; evaluated once their replies are in.
                local_ids = mx.array(self._table.local_index[experts[local_pairs]])[:, None]
                output = self.local(flat[mx.array(rows[local_pairs])], local_ids)[:, 0]
                mx.async_eval(output)
                parts.append((local_pairs, output))
                dispatcher.stats.count_tokens(self.layer, experts[local_pairs])
            while sent:
                node, pairs, dispatch_id, sent_bytes = sent.pop(0)
                try:
                    reply = dispatcher.receive(node, dispatch_id)
                except LinkBroken:
                    self._resend(node, pairs, experts, rows, host, dtype, sent, down)
                    continue
                parts.append((pairs, decode_tensor(reply.output)))
                dispatcher.stats.count_link(node, sent_bytes, reply.ByteSize())
        except BaseException:
            dispatcher.abandon([dispatch_id for _, _, dispatch_id, _ in sent])
            raise
        # Every (token, expert) output where SwitchGLU puts it: one gather over the parts.
        order = np.concatenate([pairs for pairs, _ in parts])
        outputs = mx.concatenate([output.astype(x.dtype) for _, output in parts])
        combined = outputs if len(parts) == 1 and (order == np.arange(order.size)).all() else (
            outputs[mx.array(np.argsort(order).astype(np.int32))]
        )
        return combined.reshape(*indices.shape, width)  # [..., k, D] like SwitchGLU


class ExpertHost:
    """The experts this node holds for MoE layers that other nodes run."""

    def __init__(self, modules: dict[int, tuple[nn.Module, np.ndarray]], stats: ExpertStats):
        self.modules = modules  # layer -> (SwitchGLU with the held experts, global -> local id)
        self.stats = stats

    def compute(self, request: worker_pb2.ExpertRequest) -> worker_pb2.ExpertReply:
        if request.layer not in self.modules:
            return worker_pb2.ExpertReply(error=f"this node holds no experts of layer {request.layer}")
        module, local_index = self.modules[request.layer]
        experts = np.array(request.pair_experts, dtype=np.int32)
        local = local_index[experts]
        if (local < 0).any():
            missing = sorted(set(experts[local < 0].tolist()))
            return worker_pb2.ExpertReply(error=f"experts {missing} of layer {request.layer} not held")
        hidden = decode_tensor(request.hidden)  # [tokens, D]
        rows = mx.array(np.array(request.pair_rows, dtype=np.int32))
        output = module(hidden[rows], mx.array(local)[:, None])[:, 0]  # [pairs, D]
        self.stats.count_tokens(request.layer, experts)
        return worker_pb2.ExpertReply(output=encode_tensor(output))
