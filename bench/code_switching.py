"""Code-switched topic matching: does structured cross-lingual attention (arXiv 2310.15258) help a small encoder?

    python bench/code_switching.py --out docs/code-switching

Task: do two SIB-200 sentences share a topic (7 topics; balanced pairs, chance 50%)? The first
sentence and the second are in the same language (monolingual) or in two (code-switched), and
the input is `<s> first </s> second </s>` with per-token language ids. Every seed:
1. one encoder is MLM-pretrained on English and the evaluation languages (the training
   config's recipe, sentences from `build_corpus`), shared by the arms;
2. each arm continues MLM for `--code-switched-steps` steps on translation pairs
   `<s> x_A </s> x_B </s>` (the same FLORES sentence in two languages, SIB-200 train+dev), with
   its options on (Q_cross starts as a copy of Q): the paper's pretraining of the cross-lingual
   query; the baseline takes the same steps with the options off;
3. each arm is fine-tuned on English-English pairs of SIB-200 train+dev sentences only
   (a linear classifier on the first token's final state);
4. every arm is scored on the same SIB-200 test pairs, English-English, X-X, English-X and
   X-English: accuracy with a bootstrap 95% CI over the test pairs (pooled over seeds and
   languages), and each arm's paired difference to the baseline.
Writes code_switching.json and code_switching.md into --out; docs/code-switching.md states the
decision rule.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lingosteer import config_path
from lingosteer.data import load_sib200
from lingosteer.files import write_text_atomic
from lingosteer.markdown import markdown_table
from lingosteer.stats import bootstrap_delta_ci, bootstrap_mean_ci
from training.config import CrossLingualAttentionConfig, TrainingConfig, load_training_config
from training.corpus import SPECIAL_ROLES, SweepCorpus, build_corpus, compact_ids, load_tokenizer, tokenize
from training.model import MaskedLMEncoder
from training.train import configure_optimizer, mask_tokens, train_step

ENGLISH = "eng_Latn"
BOS, EOS = SPECIAL_ROLES.index("bos"), SPECIAL_ROLES.index("eos")
RESAMPLES = 2000  # bootstrap resamples of every CI


def arms(dropout: float, overlap: float) -> dict[str, CrossLingualAttentionConfig]:
    return {
        "baseline": CrossLingualAttentionConfig(),
        "cross_query": CrossLingualAttentionConfig(cross_query=True, cross_query_overlap=overlap),
        "dropout": CrossLingualAttentionConfig(cross_dropout=dropout),
        "both": CrossLingualAttentionConfig(cross_query=True, cross_dropout=dropout, cross_query_overlap=overlap),
    }


class PairClassifier(nn.Module):
    """Same topic or not, from the first token's final hidden state."""

    def __init__(self, encoder: MaskedLMEncoder, hidden_size: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, language_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.encode(input_ids, language_ids)[:, 0])


def optimize(model: nn.Module, config: TrainingConfig, step_loss, steps: int) -> float:
    """`steps` steps of the sweep's training recipe (its schedule fitted to `steps`); the last step's loss."""
    config = config.replace(steps=steps, warmup_steps=min(config.warmup_steps, steps))
    optimizer, schedule = configure_optimizer(model, config)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = step_loss()
        train_step(model, loss, optimizer, schedule, config.grad_clip)
    return loss.item()


def pair_batch(pairs: list[tuple[np.ndarray, np.ndarray, int, int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first body, second body, first language, second language) -> `<s> a </s> b </s>` ids and language ids."""
    rows = [np.concatenate([[BOS], a, [EOS], b, [EOS]]) for a, b, _, _ in pairs]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    languages = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, (a, _, first, second)) in enumerate(zip(rows, pairs)):
        ids[i, : len(row)] = torch.from_numpy(row)
        languages[i, : len(a) + 2], languages[i, len(a) + 2 :] = first, second
    return ids, languages


def balanced_pairs(topics: np.ndarray, rng: np.random.Generator, count: int) -> list[tuple[int, int, int]]:
    """(i, j, same topic?) with half of the pairs sharing a topic."""
    pairs = []
    for n in range(count):
        i = int(rng.integers(len(topics)))
        same = n % 2 == 0
        candidates = np.flatnonzero((topics == topics[i]) == same)
        candidates = candidates[candidates != i]
        pairs.append((i, int(rng.choice(candidates)), int(same)))
    return pairs


def fine_tune_splits(evaluate_on: str) -> tuple[str, ...]:
    """SIB-200 splits fine-tuned on: train+dev when test is scored, train alone when dev is (choosing a recipe)."""
    return ("train", "dev") if evaluate_on == "test" else ("train",)


def scored_pairs(topics: np.ndarray, count: int) -> list[tuple[int, int, int]]:
    """The evaluated pairs: the same for every seed, arm and the lexical reference."""
    return balanced_pairs(topics, np.random.default_rng(1234), count)


def load_task(languages: list[str], corpus: SweepCorpus, tokenizer_path, data_dir, body_length: int,
              evaluate_on: str = "test") -> dict:
    """Bodies (compact ids without <s> </s>) of the fine-tuning and scored SIB-200 sentences per language, parallel;
    topic labels. Scored on "test": fine-tuned on train+dev. Scored on "dev" (choosing a recipe): train only."""
    tokenizer = load_tokenizer(tokenizer_path)
    task = {"train": {}, "test": {}}
    for split, splits in (("train", fine_tune_splits(evaluate_on)), ("test", (evaluate_on,))):
        english = load_sib200(ENGLISH, splits, data_dir)
        order = [row.index_id for row in english]
        names = sorted({row.category for row in english})
        task[f"{split}_topics"] = np.array([names.index(row.category) for row in english])
        for language in languages:
            rows = {row.index_id: row.text for row in load_sib200(language, splits, data_dir)}
            if sorted(rows) != sorted(order):
                raise ValueError(f"SIB-200 {language} {'+'.join(splits)} does not hold the English sentences")
            ids = compact_ids(tokenize(tokenizer, [rows[i] for i in order], body_length + 2), corpus.vocabulary)
            task[split][language] = [sentence[1:-1] for sentence in ids]
    return task


def lexical_reference(data_dir, evaluate_on: str, test_pairs: int, rng: np.random.Generator) -> dict:
    """What English bag-of-character-n-grams features learn from the same labels, without any encoder.

    "topic": 7-way topic of one sentence (logistic regression on TF-IDF), scored on the evaluated split.
    "pair": the task itself, a logistic regression on [|a - b|, a * b] fitted on balanced English pairs of the
    fine-tuning sentences, scored on the arms' pairs. "pair_by_topic": two topic predictions compared. Tells whether
    the labels at hand carry enough signal for a pair model at all.
    """
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    fine_tune = load_sib200(ENGLISH, fine_tune_splits(evaluate_on), data_dir)
    scored = load_sib200(ENGLISH, (evaluate_on,), data_dir)
    names = sorted({row.category for row in fine_tune})
    train_topics = np.array([names.index(row.category) for row in fine_tune])
    test_topics = np.array([names.index(row.category) for row in scored])
    features = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2, sublinear_tf=True)
    train_x = features.fit_transform([row.text for row in fine_tune])
    test_x = features.transform([row.text for row in scored])

    def pair_features(x, pairs):
        first, second = x[[i for i, _, _ in pairs]], x[[j for _, j, _ in pairs]]
        return hstack([abs(first - second), first.multiply(second)]).tocsr()

    topic_model = LogisticRegression(max_iter=2000, C=10.0).fit(train_x, train_topics)
    predicted = topic_model.predict(test_x)
    train_pairs = balanced_pairs(train_topics, rng, 16_000)
    pair_model = LogisticRegression(max_iter=1000).fit(pair_features(train_x, train_pairs),
                                                        [same for _, _, same in train_pairs])
    pairs = scored_pairs(test_topics, test_pairs)
    labels = np.array([same for _, _, same in pairs])
    correct = {
        "topic": (predicted == test_topics).astype(float),
        "pair": (pair_model.predict(pair_features(test_x, pairs)) == labels).astype(float),
        "pair_by_topic": ((predicted[[i for i, _, _ in pairs]] == predicted[[j for _, j, _ in pairs]]) == labels)
        .astype(float),
    }
    return {name: {"accuracy": float(c.mean()), "ci95": list(bootstrap_mean_ci([c], RESAMPLES, rng))}
            for name, c in correct.items()}


def run_seed(seed: int, args, config: TrainingConfig, corpus: SweepCorpus, task: dict, variants: dict) -> dict:
    """Per arm and condition, the [languages, test pairs] correctness of one seed."""
    languages = list(corpus.languages)
    others = [lang for lang in languages if lang != ENGLISH]
    code = {lang: i for i, lang in enumerate(languages)}
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pretrained = MaskedLMEncoder(config, corpus.vocab_size, corpus.pad_id, "sdpa")
    pool = [ids for sentences in corpus.training_sentences(tuple(languages), corpus.max_sentences_per_run()
                                                           * len(languages)).values() for ids in sentences]

    def mlm_loss(model, inputs, language_ids=None):
        masked, labels = mask_tokens(inputs, corpus, config.mask_probability, generator)
        return model(masked, labels, language_ids)

    def monolingual_batch():
        picks = torch.randint(len(pool), (config.batch_size,), generator=generator).tolist()
        width = max(len(pool[i]) for i in picks)
        ids = torch.full((len(picks), width), corpus.pad_id, dtype=torch.long)
        for row, i in enumerate(picks):
            ids[row, : len(pool[i])] = torch.from_numpy(pool[i])
        return ids

    optimize(pretrained, config, lambda: mlm_loss(pretrained, monolingual_batch()), config.steps)
    train_bodies, topics = task["train"], task["train_topics"]
    rng = np.random.default_rng(seed)
    test_pairs = scored_pairs(task["test_topics"], args.test_pairs)
    labels = np.array([same for _, _, same in test_pairs])
    conditions = {"eng-eng": [(ENGLISH, ENGLISH)], "X-X": [(x, x) for x in others],
                  "eng-X": [(ENGLISH, x) for x in others], "X-eng": [(x, ENGLISH) for x in others]}
    results = {}
    for arm, options in variants.items():
        torch.manual_seed(seed)
        encoder = MaskedLMEncoder(config, corpus.vocab_size, corpus.pad_id, "sdpa", options)
        encoder.load_state_dict(pretrained.state_dict(), strict=False)
        if options.cross_query:
            encoder.copy_query_to_cross_query()

        def translation_batch():
            chosen = []
            for _ in range(config.batch_size):
                i = int(rng.integers(len(topics)))
                first, second = rng.choice(len(languages), size=2, replace=False)
                chosen.append((train_bodies[languages[first]][i], train_bodies[languages[second]][i],
                               int(first), int(second)))
            return pair_batch(chosen, corpus.pad_id)

        optimize(encoder, config, lambda: mlm_loss(encoder, *translation_batch()), args.code_switched_steps)
        classifier = PairClassifier(encoder, config.hidden_size)

        def english_batch():
            chosen = balanced_pairs(topics, rng, config.batch_size)
            ids, language_ids = pair_batch(
                [(train_bodies[ENGLISH][i], train_bodies[ENGLISH][j], code[ENGLISH], code[ENGLISH])
                 for i, j, _ in chosen], corpus.pad_id)
            return F.cross_entropy(classifier(ids, language_ids), torch.tensor([same for _, _, same in chosen]))

        optimize(classifier, config.replace(learning_rate=args.fine_tune_lr), english_batch, args.fine_tune_steps)
        classifier.eval()
        results[arm] = {}
        with torch.no_grad():
            for condition, language_pairs in conditions.items():
                rows = []
                for first, second in language_pairs:
                    ids, language_ids = pair_batch(
                        [(task["test"][first][i], task["test"][second][j], code[first], code[second])
                         for i, j, _ in test_pairs], corpus.pad_id)
                    rows.append((classifier(ids, language_ids).argmax(-1).numpy() == labels).astype(float))
                results[arm][condition] = np.stack(rows)
    return results


def summarize(per_seed: list[dict], args) -> dict:
    rng = np.random.default_rng(0)
    summary = {}
    for arm in per_seed[0]:
        summary[arm] = {}
        for condition in per_seed[0][arm]:
            correct = np.concatenate([seed_results[arm][condition] for seed_results in per_seed])
            # rows: languages x seeds, all scored on the same test pairs; a pair is resampled with all of its rows
            entry = {"accuracy": float(correct.mean()),
                     "ci95": list(bootstrap_mean_ci(correct, RESAMPLES, rng, shared_items=True))}
            if arm != "baseline":
                baseline = np.concatenate([seed_results["baseline"][condition] for seed_results in per_seed])
                entry["delta"] = float(correct.mean() - baseline.mean())
                entry["delta_ci95"] = list(bootstrap_delta_ci(list(zip(baseline, correct)), RESAMPLES))
            summary[arm][condition] = entry
    return summary


def markdown(summary: dict, lexical: dict, meta: dict) -> str:
    def cell(entry: dict) -> str:
        return f"{entry['accuracy']:.3f} [{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]"

    sections = [
        "# Code-switched topic matching: accuracy (chance 0.5), 95% bootstrap CI",
        f"Languages {', '.join(meta['languages'])}; seeds {meta['seeds']}; {meta['test_pairs']} pairs of SIB-200 "
        f"{meta['settings']['evaluate_on']}; {meta['seconds']:.0f} s.",
    ]
    if summary:
        conditions = list(summary["baseline"])
        accuracy = [[arm] + [cell(e) for e in summary[arm].values()] for arm in summary]
        deltas = [[arm] + [f"{e['delta']:+.3f} [{e['delta_ci95'][0]:+.3f}, {e['delta_ci95'][1]:+.3f}]"
                           for e in summary[arm].values()] for arm in summary if arm != "baseline"]
        sections.append(markdown_table(["arm", *conditions], accuracy))
        if deltas:
            sections += ["## Difference to the baseline (paired bootstrap 95% CI)",
                         markdown_table(["arm", *conditions], deltas)]
    sections += [
        "## Reference without an encoder: English TF-IDF (character 2-4-grams) + logistic regression",
        "topic: 7-way topic of one sentence (chance about 0.14); pair: the task itself, fitted on pairs of the "
        "fine-tuning sentences; pair by topic: two topic predictions compared.",
        markdown_table(["topic", "pair", "pair by topic"], [[cell(lexical[name]) for name in lexical]]),
    ]
    return "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for code_switching.json and .md")
    parser.add_argument("--config", default=str(config_path("training", "cpu.yaml")), help="training recipe")
    parser.add_argument("--languages", nargs="+", default=["fra_Latn", "deu_Latn", "swh_Latn"],
                        help="evaluation languages besides English")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, help="MLM pretraining steps (default: the config's)")
    parser.add_argument("--code-switched-steps", type=int, default=150)
    parser.add_argument("--fine-tune-steps", type=int, default=300)
    parser.add_argument("--fine-tune-lr", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.3, help="structured attention dropout p")
    parser.add_argument("--overlap", type=float, default=0.3, help="interfering overlap of Q_cross's mask")
    parser.add_argument("--test-pairs", type=int, default=408)
    parser.add_argument("--evaluate-on", choices=["test", "dev"], default="test",
                        help="dev: fine-tune on SIB-200 train and score dev pairs, to choose a recipe without test")
    parser.add_argument("--arms", nargs="+", choices=list(arms(0.0, 0.0)),
                        help="only these arms besides the baseline (default: all)")
    parser.add_argument("--lexical-only", action="store_true",
                        help="only the TF-IDF reference (seconds): no encoder is trained")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the XLM-R one of the sweep)")
    parser.add_argument("--data-dir", help="data root holding sib200/ and ntrex128/")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = load_training_config(args.config)
    if args.steps:
        config = config.replace(steps=args.steps, warmup_steps=min(config.warmup_steps, args.steps))
    languages = [ENGLISH, *[lang for lang in args.languages if lang != ENGLISH]]
    variants = {arm: options for arm, options in arms(args.dropout, args.overlap).items()
                if not args.lexical_only and (arm == "baseline" or args.arms is None or arm in args.arms)}
    summary = {}
    if variants:  # the corpus and the tokenized task are only needed to train encoders
        corpus = build_corpus(languages, config.max_length, config.vocab_limit, args.tokenizer, args.data_dir)
        task = load_task(languages, corpus, corpus.description["tokenizer"], args.data_dir,
                         (config.max_length - 3) // 2, args.evaluate_on)
        summary = summarize([run_seed(seed, args, config, corpus, task, variants) for seed in args.seeds], args)
    lexical = lexical_reference(args.data_dir, args.evaluate_on, args.test_pairs, np.random.default_rng(0))
    meta = {"languages": languages, "seeds": args.seeds, "test_pairs": args.test_pairs,
            "seconds": time.perf_counter() - started, "training": config.to_dict(),
            "arms": {arm: vars(options) for arm, options in variants.items()},
            "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "summary": summary, "lexical": lexical}
    write_text_atomic(out / "code_switching.json", json.dumps(document, indent=2) + "\n")
    write_text_atomic(out / "code_switching.md", markdown(summary, lexical, meta))
    print(markdown(summary, lexical, meta))


if __name__ == "__main__":
    main()
