"""Pooled residual-stream states from HF transformers, checked against HF's own outputs."""

import numpy as np
import pytest
import torch

from alignment.hidden_states import extract_hidden_states, extract_pooled_states, load_model_and_tokenizer

SENTENCES = [
    "Habari ya asubuhi, rafiki yangu.",
    "The cat sat on the mat because it was tired after a very long day outside.",
    "Ciao",
    "我们明天去北京。",
]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model_and_tokenizer(request, tiny_model_dir):
    return load_model_and_tokenizer(tiny_model_dir(request.param))


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padded_batch_equals_each_sentence_alone(model_and_tokenizer, pooling):
    model, tokenizer = model_and_tokenizer
    lengths = [len(tokenizer(s)["input_ids"]) for s in SENTENCES]
    assert len(set(lengths)) > 1  # the batch really gets padded
    batched = extract_hidden_states(model, tokenizer, SENTENCES, pooling=pooling, batch_size=4, progress=False)
    alone = np.concatenate(
        [extract_hidden_states(model, tokenizer, [s], pooling=pooling, batch_size=1, progress=False)
         for s in SENTENCES],
        axis=1,
    )
    np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=1e-4)


def test_states_are_the_residual_stream_after_each_layer(model_and_tokenizer):
    """Layer l = HF hidden_states[l + 1] before the final norm; BOS excluded from the mean."""
    model, tokenizer = model_and_tokenizer
    sentence = SENTENCES[1]
    ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tokenizer.bos_token_id  # the tokenizer adds BOS, which pooling must skip
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states
    num_layers = model.config.num_hidden_layers
    ours = extract_hidden_states(model, tokenizer, [sentence], progress=False)
    last = extract_hidden_states(model, tokenizer, [sentence], pooling="last", progress=False)
    assert ours.shape == (num_layers, 1, model.config.hidden_size) and ours.dtype == np.float32
    for layer in range(num_layers - 1):
        np.testing.assert_allclose(ours[layer, 0], reference[layer + 1][0, 1:].mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(last[layer, 0], reference[layer + 1][0, -1].numpy(), atol=1e-5)
    # HF normalises its last entry; the residual stream is what comes before that norm.
    decoder = model.get_decoder()
    with torch.no_grad():
        stream = {}
        handle = decoder.layers[-1].register_forward_hook(lambda m, a, out: stream.update(h=out))
        model(input_ids=ids)
        handle.remove()
        normed = decoder.norm(stream["h"])
    np.testing.assert_allclose(ours[-1, 0], stream["h"][0, 1:].mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(normed[0, 1:].mean(0).numpy(), reference[-1][0, 1:].mean(0).numpy(), atol=1e-5)
    assert not np.allclose(ours[-1, 0], reference[-1][0, 1:].mean(0).numpy(), atol=1e-3)


def test_layer_selection_and_order(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    everything = extract_hidden_states(model, tokenizer, SENTENCES[:2], progress=False)
    chosen = extract_hidden_states(model, tokenizer, SENTENCES[:2], layers=[1, 0], progress=False)
    np.testing.assert_allclose(chosen, everything[[1, 0]], atol=1e-6)


def test_bad_input_is_refused(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="out of range"):
        extract_hidden_states(model, tokenizer, SENTENCES, layers=[99], progress=False)
    with pytest.raises(ValueError, match="pooling"):
        extract_hidden_states(model, tokenizer, SENTENCES, pooling="max", progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        extract_hidden_states(model, tokenizer, ["fine", "  "], progress=False)
    with pytest.raises(FileNotFoundError, match="config.json"):
        extract_hidden_states("/nonexistent/model", None, SENTENCES, progress=False)


def test_one_pass_gives_every_pooling(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    both = extract_pooled_states(model, tokenizer, SENTENCES, poolings=("mean", "last"), batch_size=3, progress=False)
    for pooling in ("mean", "last"):
        alone = extract_hidden_states(model, tokenizer, SENTENCES, pooling=pooling, batch_size=3, progress=False)
        np.testing.assert_array_equal(both[pooling], alone)
    assert not np.allclose(both["mean"], both["last"])
