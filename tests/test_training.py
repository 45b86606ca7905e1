"""training/: attention backends agree, masking and schedule follow the recipe, runs are deterministic."""

import math

import numpy as np
import pytest
import torch

from lingosteer import config_path
from training.config import TrainingConfig, load_training_config
from training.corpus import SPECIAL_ROLES, build_corpus, default_tokenizer_path, load_tokenizer
from training.model import MaskedLMEncoder, reference_attention, sdpa_attention, xformers_attention, xformers_available
from training.train import evaluate_mlm, learning_rate_factor, mask_tokens, pad_batch, train_run

TINY = TrainingConfig(
    hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=24, dropout=0.0,
    learning_rate=3e-3, steps=30, warmup_steps=3, batch_size=16, sentences_per_language=None,
    vocab_limit=600, eval_batch_size=64,
)


@pytest.fixture(scope="module")
def corpus(data_dir):
    return build_corpus(("eng_Latn", "swh_Latn"), TINY.max_length, TINY.vocab_limit, data_dir=data_dir)


def _attention_inputs(seed=0, batch=3, heads=2, time=7, dim=16):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, time, dim, generator=generator) for _ in range(3))
    mask = torch.ones(batch, time, dtype=torch.bool)
    mask[1, 5:] = False  # padded sentences
    mask[2, 2:] = False
    return q, k, v, mask


def test_sdpa_matches_reference_attention_with_padding():
    q, k, v, mask = _attention_inputs()
    expected = reference_attention(q, k, v, mask)
    torch.testing.assert_close(sdpa_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)
    # Padding matters: without the mask the result differs, so the comparison above can fail.
    assert not torch.allclose(reference_attention(q, k, v, torch.ones_like(mask)), expected, atol=1e-3)


@pytest.mark.skipif(not xformers_available(),
                    reason="xformers memory-efficient attention needs xformers and a CUDA device")
def test_xformers_matches_sdpa():
    q, k, v, mask = (t.cuda() for t in _attention_inputs())
    torch.testing.assert_close(xformers_attention(q, k, v, mask), sdpa_attention(q, k, v, mask), rtol=1e-3, atol=1e-4)


def test_encoder_backends_give_the_same_loss(corpus):
    torch.manual_seed(0)
    sdpa = MaskedLMEncoder(TINY, corpus.vocab_size, corpus.pad_id, "sdpa").eval()
    reference = MaskedLMEncoder(TINY, corpus.vocab_size, corpus.pad_id, "reference").eval()
    reference.load_state_dict(sdpa.state_dict())
    batch = pad_batch(corpus.test["eng_Latn"][:8], corpus.pad_id)
    inputs, labels = mask_tokens(batch, corpus, 0.15, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert math.isclose(float(sdpa(inputs, labels)), float(reference(inputs, labels)), rel_tol=1e-5)


def test_configs_load_with_paper_defaults():
    paper = load_training_config(config_path("training", "paper.yaml"))
    assert (paper.num_layers, paper.hidden_size, paper.max_length) == (2, 768, 256)
    assert (paper.learning_rate, paper.steps, paper.warmup_steps) == (1e-5, 10_000, 2_500)
    assert paper.mask_probability == 0.15 and paper.sentences_per_language == 1_000_000
    cpu = load_training_config(config_path("training", "cpu.yaml"))
    assert cpu.steps < paper.steps and cpu.hidden_size < paper.hidden_size


def test_bad_config_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("hidden_size: 64\nnum_heads: 3\n")
    with pytest.raises(ValueError, match="not divisible"):
        load_training_config(path)
    path.write_text("hiden_size: 64\n")
    with pytest.raises(ValueError, match="unknown training config keys"):
        load_training_config(path)


def test_schedule_warms_up_then_decays_to_zero():
    config = TrainingConfig(steps=100, warmup_steps=10)
    factors = [learning_rate_factor(step, config) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.5, abs=0.01)  # halfway through the cosine
    assert factors[99] < 0.001
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_xlmr_tokenizer_ships_in_the_package():
    tokenizer = load_tokenizer(default_tokenizer_path())
    assert tokenizer.get_vocab_size() == 250_002
    assert tokenizer.token_to_id("<mask>") == 250_001 and tokenizer.token_to_id("<s>") == 0


def test_corpus_vocabulary_is_compact_and_shared(corpus):
    assert corpus.vocab_size == TINY.vocab_limit
    assert [corpus.pad_id, corpus.mask_id] == [SPECIAL_ROLES.index("pad"), SPECIAL_ROLES.index("mask")]
    unk = SPECIAL_ROLES.index("unk")
    for language in corpus.languages:
        ids = np.concatenate(corpus.train[language])
        assert ids.max() < corpus.vocab_size and ids.min() >= 0
        # Both languages keep their frequent tokens: most of each one's tokens are not <unk>.
        assert np.mean(ids == unk) < 0.5
        bos, eos = SPECIAL_ROLES.index("bos"), SPECIAL_ROLES.index("eos")
        assert all(s[0] == bos and s[-1] == eos for s in corpus.train[language])
        assert max(len(s) for s in corpus.train[language]) <= TINY.max_length
    assert len(corpus.test["eng_Latn"]) == 204


def test_masking_follows_bert_recipe(corpus):
    batch = pad_batch(corpus.train["eng_Latn"][:400], corpus.pad_id)
    inputs, labels = mask_tokens(batch, corpus, 0.15, torch.Generator().manual_seed(0))
    ordinary = batch >= corpus.num_special
    chosen = labels != -100
    assert not (chosen & ~ordinary).any()  # specials and padding are never targets
    assert chosen.sum() / ordinary.sum() == pytest.approx(0.15, abs=0.01)
    assert torch.equal(labels[chosen], batch[chosen])
    replaced = (inputs[chosen] == corpus.mask_id).float().mean()
    kept = (inputs[chosen] == batch[chosen]).float().mean()
    assert replaced == pytest.approx(0.8, abs=0.03) and kept == pytest.approx(0.1 + 0.1 / corpus.vocab_size, abs=0.03)
    assert torch.equal(inputs[~chosen], batch[~chosen])


def test_pairs_get_half_the_data_of_each_language(corpus):
    total = corpus.max_sentences_per_run()
    single = corpus.training_sentences(("eng_Latn",), total)
    pair = corpus.training_sentences(("eng_Latn", "swh_Latn"), total)
    assert len(single["eng_Latn"]) == total
    assert len(pair["eng_Latn"]) == len(pair["swh_Latn"]) == total // 2
    with pytest.raises(ValueError, match="training sentences"):
        corpus.training_sentences(("eng_Latn",), total + 1)


def test_train_run_is_deterministic_and_learns(corpus):
    first, _ = train_run(("eng_Latn", "swh_Latn"), TINY, corpus, seed=0)
    again, _ = train_run(("eng_Latn", "swh_Latn"), TINY, corpus, seed=0)
    other, _ = train_run(("eng_Latn", "swh_Latn"), TINY, corpus, seed=1)
    assert first.loss == again.loss
    assert first.loss != other.loss
    assert set(first.loss) == {"eng_Latn", "swh_Latn"}
    # Better than guessing uniformly over the vocabulary after 30 steps.
    assert all(loss < math.log(corpus.vocab_size) for loss in first.loss.values())
    assert first.training_sentences == {"eng_Latn": 1398, "swh_Latn": 1398}


def test_evaluation_is_repeatable(corpus):
    torch.manual_seed(0)
    model = MaskedLMEncoder(TINY, corpus.vocab_size, corpus.pad_id, "sdpa")
    assert evaluate_mlm(model, corpus, "swh_Latn", TINY) == evaluate_mlm(model, corpus, "swh_Latn", TINY)


def test_bad_run_languages_are_rejected(corpus):
    with pytest.raises(ValueError, match="one language or two"):
        train_run(("eng_Latn", "eng_Latn"), TINY, corpus, seed=0)
    with pytest.raises(ValueError, match="not in the sweep corpus"):
        train_run(("fra_Latn",), TINY, corpus, seed=0)
