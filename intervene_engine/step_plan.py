"""Which flattened rows of one model step get which intervention.

Built once per step from the model runner's batch (a loop over requests, never
over tokens), consumed by the per-layer op. Request i owns rows
[query_start[i], query_start[i+1]); those rows hold absolute positions
num_computed[i] + 0, 1, ... — so "last prompt token" stays correct when chunked
prefill puts it in a later step than the rest of the prompt.

The plan's row indices and alphas live in buffers allocated once per worker and
filled in place each step, as vLLM's runner does with its own inputs: host memory
(pinned on a GPU machine) copied to the device in one transfer per buffer.
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
class RowGroup:
    """Rows that share one intervention at one layer: update = rows @ down (@ up) + bias, in the bank's dtype."""

    rows: torch.Tensor  # int64 [n]
    alphas: torch.Tensor  # fp32 [n, 1]
    down: torch.Tensor | None  # [d, r]: D^T (full) or V^T (low rank); None: a shift, no matmul
    up: torch.Tensor | None  # [r, d]: U^T (low rank)
    bias: torch.Tensor  # [d]


@dataclass(frozen=True)
class StepPlan:
    by_layer: dict[int, list[RowGroup]]


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


class StepBuffers:
    """Row indices and alphas of one step's steered rows; a step has at most `max_rows` rows
    (vLLM's max_num_batched_tokens), and each row is steered by at most one request."""

    def __init__(self, max_rows: int, device: torch.device):
        self.rows = CpuGpuBuffer(max_rows, dtype=torch.int64, device=device)
        self.alphas = CpuGpuBuffer(max_rows, 1, dtype=torch.float32, device=device)
        # The host buffers are refilled next step: first wait until this step's copies are done.
        self._copied = None if device.type == "cpu" else torch.Event(device=device, blocking=True)

    def fill(self, parts: list[tuple[np.ndarray, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows and alphas of `parts` ((rows, alpha) each), one after the other, on the device."""
        if self._copied is not None:
            self._copied.synchronize()
        end = 0
        for rows, alpha in parts:
            self.rows.np[end:end + rows.size] = rows
            self.alphas.np[end:end + rows.size] = alpha
            end += rows.size
        if self._copied is None:  # CPU: the host buffers are the device's
            return self.rows.cpu[:end], self.alphas.cpu[:end]
        rows, alphas = self.rows.copy_to_gpu(end), self.alphas.copy_to_gpu(end)
        self._copied.record()
        return rows, alphas


def build_step_plan(requests: list[ScheduledRequest], buffers: StepBuffers, bank: DeviceBank,
                    pinned: frozenset[str] = frozenset()) -> StepPlan | None:
    """The step's row groups, reading each version's map from its bank slot (copied in if needed)."""
    # Group by (version, layers): one gather + matmul per group and layer.
    grouped: dict[tuple, list[tuple[np.ndarray, float]]] = defaultdict(list)
    interventions: dict[str, LoadedIntervention] = {}
    for req in requests:
        rows = selected_rows(req)
        if rows.size == 0:
            continue
        intervention = req.intervention
        # req.spec is resolved (`request_spec.resolve`): its alpha and layers are what the request gets.
        grouped[(intervention.version, req.spec.layers)].append((rows, req.spec.alpha))
        interventions[intervention.version] = intervention
    if not grouped:
        return None
    views = bank.views({version: i.compact for version, i in interventions.items()}, set(pinned))
    # Each group's rows are one contiguous slice of the step's buffers.
    rows, alphas = buffers.fill([part for parts in grouped.values() for part in parts])
    by_layer: dict[int, list[RowGroup]] = defaultdict(list)
    start = 0
    for (version, layers), parts in grouped.items():
        end = start + sum(part_rows.size for part_rows, _ in parts)
        view = views[version]
        for layer in layers:
            i = view.index[layer]
            by_layer[layer].append(RowGroup(
                rows[start:end], alphas[start:end], None if view.down is None else view.down[i],
                None if view.up is None else view.up[i], view.bias[i],
            ))
        start = end
    return StepPlan(dict(by_layer))
