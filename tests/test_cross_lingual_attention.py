"""training/model.py: structured cross-lingual attention (Q_cross, masks M1/M2, structured attention dropout)."""

import pytest
import torch

from training.config import CrossLingualAttentionConfig, TrainingConfig
from training.model import MaskedLMEncoder, cross_lingual_masks, reference_attention, structured_attention

TINY = TrainingConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_length=12, dropout=0.0,
                      steps=10, warmup_steps=1)
VOCAB, PAD = 40, 1
# <s> and two English tokens, then three tokens of a second language, then padding.
LANGUAGES = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0]])
SAME = LANGUAGES[0, :, None] == LANGUAGES[0, None, :]
FIRST = torch.zeros(8, 8, dtype=torch.bool)
FIRST[0, :] = FIRST[:, 0] = True


def _inputs(batch=4, time=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, time), generator=generator)
    ids[:, 0] = 0
    ids[1, 6:] = PAD
    return ids


def _encoder(seed=0, **options):
    torch.manual_seed(seed)
    return MaskedLMEncoder(TINY, VOCAB, PAD, "reference", CrossLingualAttentionConfig(**options))


def test_masks_on_a_hand_made_language_pattern():
    split = CrossLingualAttentionConfig(cross_query=True, cross_dropout=1.0)
    m1, m2 = cross_lingual_masks(LANGUAGES, split, training=True)
    # p = 1: Q keeps the same-language pairs and the first token's row and column, Q_cross the rest.
    assert torch.equal(m1[0], SAME | FIRST)
    assert torch.equal(m2[0], ~SAME)
    # Eval: dropout off, Q attends every pair, Q_cross still the cross-language ones.
    m1, m2 = cross_lingual_masks(LANGUAGES, split, training=False)
    assert m1.all() and torch.equal(m2[0], ~SAME)
    # Without Q_cross there is no M2; overlap 1 puts every pair of a code-switched row in M2,
    # none of a one-language row.
    assert cross_lingual_masks(LANGUAGES, CrossLingualAttentionConfig(cross_dropout=0.5), True)[1] is None
    both = torch.cat([LANGUAGES, torch.zeros_like(LANGUAGES)])
    _, m2 = cross_lingual_masks(both, CrossLingualAttentionConfig(cross_query=True, cross_query_overlap=1.0), True)
    assert m2[0].all() and not m2[1].any()


def test_interfering_masks_overlap_at_random_and_first_token_keeps_full_attention():
    torch.manual_seed(0)
    settings = CrossLingualAttentionConfig(cross_query=True, cross_dropout=0.5, cross_query_overlap=0.25)
    m1, m2 = cross_lingual_masks(LANGUAGES.repeat(2000, 1), settings, training=True)
    assert m1[:, 0, :].all() and m1[:, :, 0].all()  # the first token's pairs are never dropped
    droppable, joinable = ~SAME & ~FIRST, SAME
    assert (~m1[:, droppable]).float().mean() == pytest.approx(0.5, abs=0.02)
    assert m1[:, SAME].all() and m2[:, ~SAME].all()
    assert m2[:, joinable].float().mean() == pytest.approx(0.25, abs=0.02)
    # Masks differ between draws: a fresh dropout pattern for every forward pass.
    again, _ = cross_lingual_masks(LANGUAGES.repeat(2000, 1), settings, training=True)
    assert not torch.equal(m1, again)


def test_structured_attention_sums_the_exponentials_of_both_masks():
    generator = torch.Generator().manual_seed(0)
    q, q_cross, k, v = (torch.randn(1, 2, 8, 4, generator=generator) for _ in range(4))
    keys = torch.ones(1, 8, dtype=torch.bool)
    keys[0, 7] = False
    m1, m2 = (SAME | FIRST)[None], (~SAME | torch.eye(8, dtype=torch.bool))[None]  # overlap on the diagonal
    expected_weights = (m1[:, None] * torch.exp(q @ k.transpose(-2, -1) / 2)
                        + m2[:, None] * torch.exp(q_cross @ k.transpose(-2, -1) / 2)) * keys[:, None, None, :]
    expected = expected_weights / expected_weights.sum(-1, keepdim=True) @ v
    torch.testing.assert_close(structured_attention(q, q_cross, k, v, keys, m1, m2), expected)
    # One query with every pair allowed is plain attention.
    every = torch.ones(1, 8, 8, dtype=torch.bool)
    plain = reference_attention(q, k, v, keys)
    torch.testing.assert_close(structured_attention(q, None, k, v, keys, every, None), plain)


@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_gradients_reach_q_cross_only_through_code_switched_inputs(overlap):
    model = _encoder(cross_query=True, cross_dropout=0.3, cross_query_overlap=overlap).train()
    ids = _inputs()
    labels = torch.where(torch.rand(ids.shape) < 0.5, ids, torch.full_like(ids, -100))

    def cross_query_gradients(language_ids):
        model.zero_grad(set_to_none=True)
        model(ids, labels, language_ids).backward()
        return [layer.attention.query_cross.weight.grad for layer in model.layers]

    one_language = torch.zeros_like(ids)
    assert all(grad is None or not grad.any() for grad in cross_query_gradients(one_language))
    assert all(grad is None or not grad.any() for grad in cross_query_gradients(None))
    mixed = one_language.clone()
    mixed[:, 4:] = 1
    assert all(grad is not None and grad.abs().sum() > 0 for grad in cross_query_gradients(mixed))
    # Q itself keeps learning from one-language inputs.
    cross_query_gradients(one_language)
    assert model.layers[0].attention.qkv.weight.grad.abs().sum() > 0


def test_structured_dropout_is_off_in_eval_mode():
    ids, mixed = _inputs(), torch.zeros(4, 8, dtype=torch.long)
    mixed[:, 4:] = 1
    dropped = _encoder(cross_dropout=1.0)
    plain = _encoder()
    dropped.load_state_dict(plain.state_dict())
    dropped.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropped.encode(ids, mixed), plain.encode(ids, mixed))
        assert torch.equal(dropped.encode(ids, mixed), dropped.encode(ids, mixed))
        # In training mode the dropout acts, so the comparison above can fail.
        assert not torch.allclose(dropped.train().encode(ids, mixed), plain.train().encode(ids, mixed), atol=1e-4)


def test_options_off_is_bit_identical_to_the_plain_encoder():
    default = _encoder(seed=3)
    torch.manual_seed(3)
    unconfigured = MaskedLMEncoder(TINY, VOCAB, PAD, "reference")
    assert list(default.state_dict()) == list(unconfigured.state_dict())
    assert not any("query_cross" in key for key in default.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), unconfigured.state_dict().values()))
    ids, mixed = _inputs(), torch.zeros(4, 8, dtype=torch.long)
    mixed[:, 4:] = 1
    labels = torch.where(ids > 20, ids, torch.full_like(ids, -100))
    for model in (default.eval(), default.train()):
        with torch.no_grad():
            torch.manual_seed(0)
            plain = model(ids, labels)
            torch.manual_seed(0)
            assert torch.equal(model(ids, labels, mixed), plain)  # the ids are ignored with the options off
    # With Q_cross the state dict gains exactly one projection per layer.
    extra = set(_encoder(cross_query=True).state_dict()) - set(default.state_dict())
    layers = range(TINY.num_layers)
    assert extra == {f"layers.{i}.attention.query_cross.{p}" for i in layers for p in ("weight", "bias")}


def test_bad_settings_and_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="cross_dropout"):
        CrossLingualAttentionConfig(cross_dropout=1.5)
    with pytest.raises(ValueError, match="needs cross_query"):
        CrossLingualAttentionConfig(cross_query_overlap=0.2)
    with pytest.raises(ValueError, match="must match input_ids"):
        _encoder(cross_query=True).encode(_inputs(), torch.zeros(4, 7, dtype=torch.long))
    assert not CrossLingualAttentionConfig().enabled and CrossLingualAttentionConfig(cross_dropout=0.1).enabled
