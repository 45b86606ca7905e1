"""The per-layer op that rewrites the residual stream of steered rows.

vLLM decoder layers return (hidden_states, residual); the next layer's fused add+norm
takes the stream as hidden_states + residual. For a steered row we compute
h = hidden + residual in fp32, h' = h + alpha (W h + b - h), then store residual = h'
(model dtype) and hidden = 0. Other rows are not touched, bit for bit.

`steer_rows` is graph safe: it reads only tensors (each row's slot and alpha, the bank's
slots: `step_plan.BankPass`), and the kernels it launches and their shapes depend on the
number of rows and the bank's size, never on which rows are steered, by which language,
alpha, layers or positions. A CUDA graph captured through it replays correctly when only the
buffers' contents change (bench/graph_safety.py traces it once and replays it with
torch.compile(fullgraph=True)). W h + b - h is computed in the bank's (the engine's) dtype,
whose GEMMs accumulate in fp32, and the update in fp32.

The graph-safe path pays for every slot on every row of a steered step. Where no CUDA graph
captures the forward (CPU, and `--enforce-eager` on GPU: every configuration the plugin runs in
today, vllm_compat.check_runner), `steer_groups` does the same arithmetic from the same bank
on the steered rows only, each group of rows by its own slot, with row indices the host
grouped when it planned the step (`step_plan.SlotGroup`). tests/test_plugin_engine.py checks
both paths in a real engine against the HF reference.

`steer_residual` is the opaque `torch.library.custom_op` the decoder layers call: a plain
Python hook would be traced once by vLLM's torch.compile while idle and baked in as a
no-op. It takes the step's plan from `active_plan`; a step with no steered row has none
and returns at once, the separate path vLLM's LoRA also keeps for batches without adapters.
"""

from contextlib import contextmanager

import torch

from intervene_engine.step_plan import BankPass, StepPlan

_active_plan: StepPlan | None = None


@contextmanager
def active_plan(plan: StepPlan | None):
    global _active_plan
    _active_plan = plan
    try:
        yield
    finally:
        _active_plan = None


def steer_rows(hidden: torch.Tensor, residual: torch.Tensor, slot: torch.Tensor, alpha: torch.Tensor,
               down: torch.Tensor, up: torch.Tensor | None, bias: torch.Tensor, slot_ids: torch.Tensor,
               matmul: bool = True) -> None:
    """Steer each row from its slot at one layer, in place.

    hidden, residual [n, d]; slot int64 [n] (0: not steered); alpha fp32 [n] (0: not steered);
    one layer of the bank: down [d, S R], up [S R, d] (None: a full bank, R = d), bias [S + 1, d];
    slot_ids [S] = 1 ... S. `matmul` False: every steered slot holds a shift map (biases only).
    """
    stream = hidden.float() + residual.float()
    update = bias.index_select(0, slot).float()
    if matmul:
        n, num_slots = stream.shape[0], slot_ids.shape[0]
        # Every row times every slot's map, in one GEMM; each row then keeps its own slot's part.
        per_slot = torch.mm(stream.to(down.dtype), down).view(n, num_slots, -1)
        if up is None:  # full maps: the row's own slot's D h (slot 0 reads slot 1; its alpha is 0)
            own = (slot - 1).clamp(min=0).view(n, 1, 1).expand(n, 1, per_slot.shape[2])
            update += per_slot.gather(1, own).view(n, -1).float()
        else:  # low rank: zero the other slots' V h, then one GEMM with every slot's U
            other = (slot.unsqueeze(1) != slot_ids).unsqueeze(2)
            update += torch.mm(per_slot.masked_fill(other, 0).view(n, -1), up).float()
    steered = (alpha != 0).unsqueeze(1)
    shifted = torch.addcmul(stream, update, alpha.unsqueeze(1))
    residual.copy_(torch.where(steered, shifted.to(residual.dtype), residual))
    hidden.masked_fill_(steered, 0)


def steer_groups(hidden: torch.Tensor, residual: torch.Tensor, layer: int, step: BankPass) -> None:
    """Steer the pass's steered rows at one layer, in place: each group of rows by its own slot only."""
    bank = step.bank
    for group in step.groups:
        if layer not in group.layers:
            continue
        rows = step.order[group.start:group.end]
        stream = hidden.index_select(0, rows).float()
        stream += residual.index_select(0, rows).float()
        update = bank.bias[layer, group.slot].float().expand_as(stream)
        if group.rank:
            first = (group.slot - 1) * bank.rank_cap
            product = torch.mm(stream.to(bank.dtype), bank.down[layer, :, first:first + group.rank])
            if bank.up is not None:
                product = torch.mm(product, bank.up[layer, first:first + group.rank])
            update = product.float() + update
        shifted = torch.addcmul(stream, update, step.alpha[rows, layer].unsqueeze(1))
        residual.index_copy_(0, rows, shifted.to(residual.dtype))
        hidden.index_fill_(0, rows, 0)


@torch.library.custom_op("lingosteer::steer_residual", mutates_args=("hidden_states", "residual"))
def steer_residual(hidden_states: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    plan = _active_plan
    if plan is None:
        return
    rows = hidden_states.shape[0]
    for step in plan.passes:
        bank = step.bank
        if step.groups is not None:
            steer_groups(hidden_states, residual, layer, step)
        else:
            steer_rows(hidden_states, residual, step.slot[:rows], step.alpha[:rows, layer], bank.down[layer],
                       None if bank.up is None else bank.up[layer], bank.bias[layer], bank.slot_ids, step.matmul)


@steer_residual.register_fake
def _(hidden_states: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    return None
