"""Which flattened rows of one model step get which intervention.

Built once per step from the model runner's batch (a loop over requests, never
over tokens), consumed by the per-layer op. Request i owns rows
[query_start[i], query_start[i+1]); those rows hold absolute positions
num_computed[i] + 0, 1, ... — so "last prompt token" stays correct when chunked
prefill puts it in a later step than the rest of the prompt.

What the op reads is data in buffers allocated once per worker and filled in place
before each forward, as vLLM's runner does with its own inputs (and vLLM's LoRA with
its per-token adapter index): each row's bank slot (0: the no-op slot) and its alpha at
each layer (0: not steered there). Host memory (pinned on a GPU machine) is copied to
the device in one transfer per buffer; the rows a step steers change only contents, never
a shape.
"""

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.utils import CpuGpuBuffer

from intervene_engine.bank import DeviceBank
from intervene_engine.request_spec import InterventionRequest
from intervene_engine.store import LoadedIntervention


@dataclass(frozen=True)
class SlotGroup:
    """Steered rows that share a slot and a set of layers: rows order[start:end] of their pass."""

    slot: int
    rank: int  # columns of the slot to multiply (0: a shift map, bias only)
    layers: frozenset[int]
    start: int
    end: int


@dataclass(frozen=True)
class BankPass:
    """One bank's steering of one step: what the op reads, for rows [0, n) of the step."""

    slot: torch.Tensor  # int64 [max_rows]: each row's slot in `bank` (0: not steered)
    alpha: torch.Tensor  # fp32 [max_rows, L]: each row's alpha at each model layer (0: not steered there)
    bank: DeviceBank
    matmul: bool  # False: every steered row's slot holds a shift map, so the op adds biases only
    # Eager steps (no CUDA graph captures the forward): the steered rows grouped by slot, so the op
    # multiplies only those rows, each by its own slot. None: the graph-safe path, every row by every slot.
    groups: tuple[SlotGroup, ...] | None = None
    order: torch.Tensor | None = None  # int64 [max_rows]: the groups' rows, one group after the other


@dataclass(frozen=True)
class StepPlan:
    # The worker's bank, from persistent buffers; then, when a step mixes more versions than it has
    # slots, a bank of the step's own for the rest (`DeviceBank.overflow_bank`).
    passes: tuple[BankPass, ...]


@dataclass(frozen=True)
class SteeredRows:
    """Rows of one request, steered from one slot with one alpha at some layers."""

    rows: np.ndarray
    slot: int
    alpha: float
    layers: tuple[int, ...]


@dataclass(frozen=True)
class ScheduledRequest:
    """The part of the runner's state the plan needs about one request in this step."""

    first_row: int
    num_rows: int
    num_computed: int  # tokens already in the KV cache = position of first_row
    prompt_len: int
    first_steerable: int  # 1 when the prompt starts with BOS: never steered by "prompt" / "all"
    spec: InterventionRequest  # resolved against the intervention's serving defaults
    intervention: LoadedIntervention  # its map on the host (`InterventionStore.hold`)


def selected_rows(req: ScheduledRequest) -> np.ndarray:
    """Row indices (into the flattened step) that this request wants intervened."""
    start, end = req.num_computed, req.num_computed + req.num_rows
    # The steered positions, cut to this step's [start, end).
    spans = [(max(lo, start), end if hi is None else min(hi, end))
             for lo, hi in req.spec.spans(req.prompt_len, req.first_steerable)]
    offset = req.first_row - start
    parts = [np.arange(lo + offset, hi + offset) for lo, hi in spans if lo < hi]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def write_rows(slot: np.ndarray, alpha: np.ndarray, parts: list[SteeredRows]) -> int:
    """Write `parts` into host arrays that are zero elsewhere; the end of the rows written."""
    end = 0
    for part in parts:
        slot[part.rows] = part.slot
        alpha[np.ix_(part.rows, part.layers)] = part.alpha
        end = max(end, int(part.rows.max()) + 1)
    return end


def group_rows(order: np.ndarray, parts: list[SteeredRows], bank: DeviceBank) -> tuple[SlotGroup, ...]:
    """Write `parts`' rows into `order` grouped by (slot, layers); the groups."""
    grouped = defaultdict(list)
    for part in parts:
        grouped[(part.slot, part.layers)].append(part.rows)
    groups, start = [], 0
    for (slot, layers), rows in grouped.items():
        rows = np.concatenate(rows)
        order[start:start + rows.size] = rows
        groups.append(SlotGroup(slot, bank.rank_of[slot], frozenset(layers), start, start + rows.size))
        start += rows.size
    return tuple(groups)


class StepBuffers:
    """Each row's slot and per-layer alpha for one step of at most `max_rows` rows (vLLM's
    max_num_batched_tokens), and the steered rows grouped by slot for eager steps; each row is
    steered by at most one request. Slot and alpha are zero outside the step's steered rows, on
    the host and on the device, so the op may read any [0, n)."""

    def __init__(self, max_rows: int, num_layers: int, device: torch.device):
        self.slot = CpuGpuBuffer(max_rows, dtype=torch.int64, device=device)
        self.alpha = CpuGpuBuffer(max_rows, num_layers, dtype=torch.float32, device=device)
        self.order = CpuGpuBuffer(max_rows, dtype=torch.int64, device=device)
        self._end = 0  # rows [0, _end) may be non-zero: the last fill's
        # The host buffers are refilled next step: first wait until this step's copies are done.
        self._copied = None if device.type == "cpu" else torch.Event(device=device, blocking=True)

    def fill(self, parts: list[SteeredRows], bank: DeviceBank, graph_safe: bool) -> BankPass:
        """Write this step's rows and copy them to the device, clearing the previous step's."""
        if self._copied is not None:
            self._copied.synchronize()
        self.slot.np[:self._end] = 0
        self.alpha.np[:self._end] = 0
        end = write_rows(self.slot.np, self.alpha.np, parts)
        copied = max(end, self._end)
        self.slot.copy_to_gpu(copied)
        self.alpha.copy_to_gpu(copied)
        self._end = end
        groups = None
        if not graph_safe:
            groups = group_rows(self.order.np, parts, bank)
            self.order.copy_to_gpu(groups[-1].end)
        if self._copied is not None:
            self._copied.record()
        return BankPass(self.slot.gpu, self.alpha.gpu, bank, any(bank.has_matrix[part.slot] for part in parts),
                        groups, self.order.gpu)


def build_step_plan(requests: list[ScheduledRequest], buffers: StepBuffers, bank: DeviceBank,
                    pinned: frozenset[str] = frozenset(), graph_safe: bool = False) -> StepPlan | None:
    """The step's passes, copying maps into bank slots where needed (None: no row is steered).
    `graph_safe`: plan for the op's graph-safe path (`residual_op.steer_rows`) alone."""
    steered = []  # (rows, version, spec) per request with a row to steer
    maps = {}
    for req in requests:
        rows = selected_rows(req)
        # req.spec is resolved (`request_spec.resolve`): its alpha and layers are what the request gets.
        if rows.size == 0 or req.spec.alpha == 0:  # alpha 0 is the plain run
            continue
        steered.append((rows, req.intervention.version, req.spec))
        maps[req.intervention.version] = req.intervention.compact
    if not steered:
        return None
    slots, left_over = bank.assign(maps, set(pinned))

    def parts(slot_of: dict[str, int]) -> list[SteeredRows]:
        return [SteeredRows(rows, slot_of[version], spec.alpha, spec.layers)
                for rows, version, spec in steered if version in slot_of]

    passes = []
    if slots:
        passes.append(buffers.fill(parts(slots), bank, graph_safe))
    if left_over:  # a bank, and buffers, of the step's own
        extra, extra_slots = bank.overflow_bank(left_over)
        extra_buffers = StepBuffers(*buffers.alpha.np.shape, bank.device)
        passes.append(extra_buffers.fill(parts(extra_slots), extra, graph_safe))
    return StepPlan(tuple(passes))
