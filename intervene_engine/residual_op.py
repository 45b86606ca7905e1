"""The per-layer op that rewrites the residual stream of selected rows.

It is an opaque `torch.library.custom_op` on purpose: a plain Python hook is
traced once by torch.compile while idle and baked in as a no-op, so the
intervention would silently do nothing. An opaque op is called at run time on
every step and reads the step's plan.

vLLM decoder layers return (hidden_states, residual); the next layer's fused
add+norm takes the stream as hidden_states + residual. For a selected row we
compute h = hidden + residual in fp32, h' = h + alpha (W h + b - h), then store
residual = h' (model dtype) and hidden = 0. Unselected rows are not touched.
W h + b - h is computed in the form the map was stored (step_plan.RowGroup): the matmuls
in the bank's (the engine's) dtype, whose GEMMs accumulate in fp32, the update in fp32; a
shift-only map adds its bias with no matmul.
"""

from contextlib import contextmanager

import torch

from intervene_engine.step_plan import StepPlan

_active_plan: StepPlan | None = None


@contextmanager
def active_plan(plan: StepPlan | None):
    global _active_plan
    _active_plan = plan
    try:
        yield
    finally:
        _active_plan = None


@torch.library.custom_op("lingosteer::steer_residual", mutates_args=("hidden_states", "residual"))
def steer_residual(hidden_states: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    plan = _active_plan
    if plan is None:
        return
    for group in plan.by_layer.get(layer, ()):
        stream = hidden_states.index_select(0, group.rows).float()
        stream += residual.index_select(0, group.rows).float()
        if group.down is None:
            update = group.bias.float().expand_as(stream)
        else:
            update = torch.mm(stream.to(group.down.dtype), group.down)
            if group.up is not None:
                update = torch.mm(update, group.up)
            update = update.float().add_(group.bias)
        shifted = torch.addcmul(stream, update, group.alphas)
        residual.index_copy_(0, group.rows, shifted.to(residual.dtype))
        hidden_states.index_fill_(0, group.rows, 0)


@steer_residual.register_fake
def _(hidden_states: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    return None
