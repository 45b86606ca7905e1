"""Fit one intervention per XCOPA language toward English, for the XCOPA benchmark.

    python bench/fit_xcopa_interventions.py --out interventions/xcopa-gemma-3-270m [--xcopa-folds 2]

The recommended recipe of `lingosteer align fit` (alignment.recipe.RECOMMENDED: ridge
toward identity, lambda per layer on held-out pairs, mean pooling, all layers), on three
parallel sources per language, each used where it exists:
- SIB-200 train+dev (the first --sib-pairs sentences);
- NTREX-128 (the first --ntrex-pairs sentences);
- the XCOPA validation items with their English translations (xcopa/translated-en),
  premise and both choices of each item as three sentence pairs.

The XCOPA items are the benchmark's own items, so they are used per fold: with
--xcopa-folds K (default 2) the items are cut into the K contiguous folds that
`lingosteer bench --cross-fit K` uses, and `OUT/fold{k}/<lang>` is fitted on every
item except fold k's, for evaluating fold k (`--interventions OUT/fold0 OUT/fold1`).
Each manifest records the items in fit_data["task_items"], and the benchmark
refuses to evaluate an item with a map fitted on it. --xcopa-folds 1 uses every item
(for evaluating on a test split); 0 uses none. Both write `OUT/<lang>`.

The model is loaded once; English states of SIB-200 and NTREX (one sentence set for
every language) are extracted once; the statistics of the shared pairs are computed
once per language and merged with each fold's (exact: sufficient statistics add).
Existing artifacts are kept (delete them to refit).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from alignment.artifact import MANIFEST_NAME, TaskItems
from alignment.fitting import write_fit
from alignment.hidden_states import extract_hidden_states, load_model_and_tokenizer
from alignment.recipe import RECOMMENDED
from evaluation.calibration import contiguous_folds
from lingosteer import DEFAULT_DATA_DIR
from lingosteer.data import load_ntrex, load_sib200, load_xcopa
from lingosteer.fingerprint import model_fingerprint
from lingosteer.languages import get_language, normalize_code
from lingosteer.models import resolve_model

XCOPA_LANGUAGES = "et,ht,id,it,qu,sw,ta,th,tr,vi,zh"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--langs", default=XCOPA_LANGUAGES, help="XCOPA language codes, comma-separated")
    parser.add_argument("--sib-pairs", type=int, default=None, help="first N SIB-200 train+dev pairs (default: all)")
    parser.add_argument("--ntrex-pairs", type=int, default=300, help="first N NTREX-128 pairs (0: none)")
    parser.add_argument("--xcopa-folds", type=int, default=2,
                        help="K >= 2: one fit per fold without its items; 1: every item; 0: no XCOPA items")
    parser.add_argument("--xcopa-items", type=int, default=100, help="the first N XCOPA items (as bench --max-items)")
    parser.add_argument("--data-dir", type=Path, default=None, help="root holding sib200/, ntrex128/ and xcopa/")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def xcopa_pairs(code: str, xcopa: Path, max_items: int) -> list[tuple[list[str], list[str]]] | None:
    """Per item, (its 3 sentences, their English translations); None without a translation file."""

    source, english = xcopa / f"val.{code}.jsonl", xcopa / "translated-en" / f"val.{code}.jsonl"
    if not english.is_file():
        return None
    items, translated = load_xcopa(source)[:max_items], load_xcopa(english)[:max_items]
    if len(items) != len(translated):
        raise ValueError(f"{source} and {english} differ in length ({len(items)} vs {len(translated)} items)")
    sentences = lambda item: [item.premise, item.choice1, item.choice2]  # noqa: E731
    return [(sentences(a), sentences(b)) for a, b in zip(items, translated)]


def main(argv=None) -> int:
    import numpy as np

    args = parse_args(argv)
    if args.xcopa_folds < 0:
        raise ValueError("--xcopa-folds must be 0, 1 or at least 2")
    model_dir = resolve_model(args.model)
    fingerprint = model_fingerprint(model_dir)
    layers = list(range(fingerprint["num_hidden_layers"]))
    # The recommended estimator and pooling; the data are read below (each set once, its statistics shared
    # between the folds) and recorded as each artifact's sources.
    recipe = dataclasses.replace(RECOMMENDED, layers=tuple(layers))
    codes = [code.strip() for code in args.langs.split(",") if code.strip()]
    folds = contiguous_folds(args.xcopa_items, args.xcopa_folds) if args.xcopa_folds >= 2 else None
    out_dirs = [args.out / f"fold{k}" for k in range(len(folds))] if folds else [args.out]
    todo = [c for c in codes if not all((d / normalize_code(c) / MANIFEST_NAME).is_file() for d in out_dirs)]
    if not todo:
        print("all interventions exist", file=sys.stderr)
        return 0

    model, tokenizer = load_model_and_tokenizer(model_dir)
    states = lambda texts: extract_hidden_states(model, tokenizer, texts, layers=layers)  # noqa: E731
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    sib_english = load_sib200("eng_Latn", ("train", "dev"), args.data_dir)[: args.sib_pairs]
    ntrex_english = load_ntrex("eng_Latn", args.data_dir)[: args.ntrex_pairs] if args.ntrex_pairs else []
    english = states([row.text for row in sib_english] + ntrex_english)
    log(f"English states: {english.shape[1]} sentences in {time.perf_counter() - start:.0f} s")

    for code in todo:
        start = time.perf_counter()
        lang = normalize_code(code)
        sib = {row.index_id: row.text for row in load_sib200(lang, ("train", "dev"), args.data_dir)}
        shared_src = [sib[row.index_id] for row in sib_english]
        shared_tgt = english[:, : len(shared_src)]
        sources = [{"corpus": "sib200", "splits": ["train", "dev"], "pairs": len(shared_src)}]
        if ntrex_english and get_language(lang).ntrex:
            shared_src += load_ntrex(lang, args.data_dir)[: args.ntrex_pairs]
            shared_tgt = english
            sources.append({"corpus": "ntrex128", "pairs": len(ntrex_english)})
        shared = recipe.aligner().partial_fit(states(shared_src), shared_tgt)

        items = (xcopa_pairs(code, (args.data_dir or DEFAULT_DATA_DIR) / "xcopa", args.xcopa_items)
                 if args.xcopa_folds else None)
        if items is None:
            shared.solve()  # one map, written once per output directory
            fits = [(out_dir, shared, None) for out_dir in out_dirs]
        else:
            X = states([s for src, _ in items for s in src]).reshape(len(layers), len(items), 3, -1)
            Y = states([s for _, tgt in items for s in tgt]).reshape(len(layers), len(items), 3, -1)
            keep_sets = ([np.setdiff1d(np.arange(len(items)), fold) for fold in folds] if folds
                         else [np.arange(len(items))])
            fits = []
            for out_dir, keep in zip(out_dirs, keep_sets):
                # Global sample ids continue after the shared pairs, so the held-out split is that of one corpus.
                ids = len(shared_src) + (3 * keep[:, None] + np.arange(3)).ravel()
                fold_stats = recipe.aligner().partial_fit(
                    X[:, keep].reshape(len(layers), -1, X.shape[-1]), Y[:, keep].reshape(len(layers), -1, Y.shape[-1]),
                    sample_ids=ids)
                fits.append((out_dir, (shared + fold_stats).solve(), _ranges(keep)))
        for out_dir, aligner, item_ranges in fits:
            task_items = None if item_ranges is None else TaskItems(file=f"val.{code}.jsonl", ranges=item_ranges)
            xcopa = [] if item_ranges is None else [{"corpus": "xcopa translated-en", "file": f"val.{code}.jsonl",
                                                     "pairs": 3 * sum(b - a for a, b in item_ranges)}]
            write_fit(recipe, aligner, out_dir / lang, name="bench/fit_xcopa_interventions.py",
                      fingerprint=fingerprint, source=lang, target="eng_Latn", layers=layers,
                      sources=sources + xcopa, task_items=task_items, overwrite=True)
        log(f"{code} ({lang}): {aligner.n_samples_} pairs, {len(fits)} fit(s) in {time.perf_counter() - start:.0f} s")
    return 0


def _ranges(indices) -> list[list[int]]:
    """Sorted indices as [start, end) runs: [0, 1, 2, 5] -> [[0, 3], [5, 6]]."""
    runs: list[list[int]] = []
    for i in map(int, indices):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


if __name__ == "__main__":
    sys.exit(main())
