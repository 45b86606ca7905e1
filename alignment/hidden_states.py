"""Sentence representations per decoder layer, read from the residual stream.

Layer `l` is the OUTPUT of decoder layer `l` (0-based): the residual stream that
flows into layer `l + 1`, which is what the serving hook in vLLM sees and edits.
We capture it with forward hooks on the decoder layers rather than with
`output_hidden_states`, because HF applies the final norm to the last entry of
that tuple, and the normed state is not the residual stream.

Pooling over a sentence's tokens:
- "mean" (INCLINE): mean over the sentence's own tokens. Special tokens the
  tokenizer adds (BOS for Llama/Gemma) are excluded: their state does not depend
  on the sentence, so including them only pulls every sentence toward one point.
- "last": the state of the last non-special token (where INCLINE intervenes).

Sentences are batched by token length (results come back in input order) and
right-padded so that real tokens keep positions 0..n-1, exactly as
when a sentence runs alone; with causal attention, padding after a token cannot
change it. The model runs in float32 and pooling accumulates in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

POOLINGS = ("mean", "last")


class _StopForward(Exception):
    """Raised by the hook of the deepest requested layer: nothing after it is needed."""


def load_model_and_tokenizer(model_dir: str | Path):
    """Load an HF causal LM in float32 for extraction, with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def decoder_layers(model):
    """The ModuleList of decoder layers of a causal LM (Llama, Qwen2, Gemma 3, ...)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return decoder, layers


def extract_hidden_states(
    model_dir_or_model,
    tokenizer,
    sentences: Sequence[str],
    layers: Sequence[int] | None = None,
    pooling: str = "mean",
    batch_size: int = 16,
    progress: bool = True,
) -> np.ndarray:
    """Pooled residual-stream states: float32 array [n_layers, n_sentences, hidden_size].

    `model_dir_or_model` is an HF model directory (loaded in float32; `tokenizer` may
    then be None) or an already loaded model. `layers` (default: all) are 0-based
    decoder layer indices; the output follows their order.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return extract_pooled_states(model_dir_or_model, tokenizer, sentences, layers, (pooling,),
                                 batch_size, progress)[pooling]


def extract_pooled_states(
    model_dir_or_model,
    tokenizer,
    sentences: Sequence[str],
    layers: Sequence[int] | None = None,
    poolings: Sequence[str] = POOLINGS,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """{pooling: states [n_layers, n_sentences, hidden_size]} from one forward pass per batch."""
    import torch
    from tqdm.auto import tqdm

    poolings = tuple(poolings)
    bad_poolings = [p for p in poolings if p not in POOLINGS]
    if bad_poolings or not poolings:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {bad_poolings or poolings!r}")
    if isinstance(model_dir_or_model, (str, Path)):
        model, loaded_tokenizer = load_model_and_tokenizer(model_dir_or_model)
        tokenizer = tokenizer or loaded_tokenizer
    else:
        model = model_dir_or_model
    if tokenizer is None:
        raise ValueError("a tokenizer is required when passing a loaded model")
    if isinstance(sentences, str):
        raise ValueError("sentences must be a sequence of strings, not one string")
    sentences = list(sentences)
    if any(not isinstance(s, str) or not s.strip() for s in sentences):
        raise ValueError("sentences must be non-empty strings")

    decoder, modules = decoder_layers(model)
    num_layers = len(modules)
    layers = list(range(num_layers)) if layers is None else [int(layer_index) for layer_index in layers]
    bad = [layer_index for layer_index in layers if not 0 <= layer_index < num_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range: "
                         f"the model has {num_layers} layers (0..{num_layers - 1})")
    hidden_size = model.config.get_text_config().hidden_size
    out = {p: np.empty((len(layers), len(sentences), hidden_size), dtype=np.float32) for p in poolings}
    if not sentences:
        return out

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    deepest = max(layers)
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer_index):
        def hook(module, args, output):
            captured[layer_index] = output[0] if isinstance(output, tuple) else output
            if layer_index == deepest:
                raise _StopForward

        return hook

    handles = [modules[layer_index].register_forward_hook(make_hook(layer_index))
               for layer_index in sorted(set(layers))]
    try:
        # Batch sentences of similar length together: less padding, less wasted compute.
        encoded_all = [tokenizer(s, return_special_tokens_mask=True) for s in sentences]
        order = sorted(range(len(sentences)), key=lambda i: len(encoded_all[i]["input_ids"]))
        batches = range(0, len(sentences), batch_size)
        for start in tqdm(batches, desc=f"hidden states ({'+'.join(poolings)})", disable=not progress, unit="batch"):
            batch = order[start : start + batch_size]
            encoded = [encoded_all[i] for i in batch]
            input_ids, attention, keep = _right_pad(encoded, pad_id)
            if not keep.any(dim=1).all():
                raise ValueError("a sentence has no tokens besides special tokens")
            captured.clear()
            with torch.no_grad():
                try:
                    decoder(input_ids=input_ids, attention_mask=attention, use_cache=False)
                except _StopForward:
                    pass
            weights = keep.to(torch.float32)
            last = torch.where(keep, torch.arange(keep.shape[1]), -1).max(dim=1).values
            for row, layer in enumerate(layers):
                states = captured[layer].to(torch.float32)
                if "mean" in out:
                    pooled = (states * weights[:, :, None]).sum(1) / weights.sum(1, keepdim=True)
                    out["mean"][row, batch] = pooled.numpy()
                if "last" in out:
                    out["last"][row, batch] = states[torch.arange(len(batch)), last].numpy()
    finally:
        for handle in handles:
            handle.remove()
    return out


def _right_pad(encoded, pad_id):
    """Stack tokenized sentences, padding on the right: (input_ids, attention_mask, pool mask)."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    ids = [torch.tensor(e["input_ids"], dtype=torch.long) for e in encoded]
    input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_id)
    attention = pad_sequence([torch.ones_like(row) for row in ids], batch_first=True)
    keep = pad_sequence([torch.tensor(e["special_tokens_mask"]) == 0 for e in encoded], batch_first=True)
    return input_ids, attention, keep
