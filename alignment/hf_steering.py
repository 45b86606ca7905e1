"""Apply an intervention to an HF transformers model with forward hooks.

The independent reference for the vLLM plugin (same formula, no vLLM code), and
the INCLINE-style implementation benchmarks compare against. The update runs in
fp32 on the selected token positions of each decoder layer's output, layer after
layer on the already-steered stream, as the plugin does:
h' = h + alpha * (D h + b), with D = W - I.

`layer_hooks`, `hidden_of` and `with_hidden` are the one place that registers hooks on
decoder layers and reads or replaces a layer's hidden states (`evaluation.incline` uses them too).
"""

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch

from alignment.artifact import Intervention
from alignment.hidden_states import decoder_layers


@contextmanager
def layer_hooks(model: torch.nn.Module, layers: Iterable[int], hook_of_layer: Callable[[int], Callable]):
    """Within the block, decoder layer `layer` runs `hook_of_layer(layer)` as a forward hook, for each of
    `layers`; the hooks are removed on exit, also when the block raises."""
    _, modules = decoder_layers(model)
    handles = [modules[layer].register_forward_hook(hook_of_layer(layer)) for layer in layers]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def hidden_of(output) -> torch.Tensor:
    """A decoder layer's hidden states [batch, seq, d]: some models return them alone, others first in a tuple."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output, hidden: torch.Tensor):
    """The layer's `output` with its hidden states replaced by `hidden`, in the form the layer returned it."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def steered(
    model: torch.nn.Module,
    intervention: Intervention,
    positions: torch.Tensor,
    alpha: float | None = None,
    layers: list[int] | None = None,
):
    """Within the block, `model(...)` steers the tokens where `positions` ([batch, seq] bool) is True."""
    alpha = intervention.serving.alpha if alpha is None else alpha
    with layer_hooks(model, intervention.layers if layers is None else layers,
                     lambda layer: _steer_hook(*intervention.delta(layer), alpha, positions)):
        yield model


def _steer_hook(delta: torch.Tensor, bias: torch.Tensor, alpha: float, positions: torch.Tensor):
    def hook(module, inputs, output):
        hidden = hidden_of(output)
        stream = hidden[positions].float()
        shifted = stream + alpha * (stream @ delta.T.to(stream.device) + bias.to(stream.device))
        hidden = hidden.clone()
        hidden[positions] = shifted.to(hidden.dtype)
        return with_hidden(output, hidden)

    return hook
