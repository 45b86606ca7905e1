"""Do short everyday sentences in the fit data lift XCOPA retrieval?

    python bench/alignment_short_fit.py --hypotheses 1000   # ~6 minutes here, states cached under --out

docs/alignment.md found the maps transfer poorly to XCOPA's short sentences and guessed
the lever is the data. This checks the cheapest form of that guess: the default recipe
(ridge, mean pooling, SIB-200 train+dev + NTREX 0-299) with the first N distinct XNLI dev
hypotheses added to the fit (short everyday sentences, translated from the same English
ones), for the XCOPA languages that XNLI has. The figure is the comparison's: raw P@1
source -> English on the XCOPA sentences (never fitted on), best layer, mean of the two
folds. XNLI dev is the XNLI benchmark's evaluation split, so a map fitted on it is not
one to evaluate on XNLI: this is an experiment, not a recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import alignment_recipes as recipes
import numpy as np

from alignment.estimator import LinearAligner
from alignment.evaluate import retrieval_p1
from alignment.hidden_states import extract_pooled_states, load_model_and_tokenizer
from lingosteer import DEFAULT_DATA_DIR
from lingosteer.data import load_xnli
from lingosteer.files import atomic_path
from lingosteer.models import resolve_model

LANGUAGES = "sw,th,tr,vi,zh"  # the XCOPA languages XNLI has
FITS = {"sib+ntrex (default)": ("sib", "ntrex"), "sib+ntrex+xnli": ("sib", "ntrex", "xnli"), "xnli": ("xnli",)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--langs", default=LANGUAGES)
    parser.add_argument("--hypotheses", type=int, default=1000, help="distinct XNLI dev hypotheses fitted on")
    parser.add_argument("--data-dir", type=Path, default=None, help="root holding sib200/, ntrex128/, xcopa/, xnli/")
    parser.add_argument("--out", type=Path, default=Path("reports/alignment-short-fit"))
    return parser.parse_args(argv)


def xnli_pairs(code: str, data_dir: Path, limit: int) -> tuple[list[str], list[str]]:
    """The first `limit` distinct (hypothesis, English hypothesis) pairs of XNLI dev (line-aligned files)."""

    source, english = load_xnli(data_dir / "xnli" / f"dev.{code}.tsv"), load_xnli(data_dir / "xnli" / "dev.en.tsv")
    if len(source) != len(english):
        raise ValueError(f"XNLI dev {code} has {len(source)} items, English {len(english)}: not line-aligned")
    pairs = list(dict.fromkeys((s.hypothesis, e.hypothesis) for s, e in zip(source, english)))[:limit]
    return [s for s, _ in pairs], [e for _, e in pairs]


def main(argv=None) -> int:

    args = parse_args(argv)
    data_dir = args.data_dir or DEFAULT_DATA_DIR
    model, tokenizer = load_model_and_tokenizer(resolve_model(args.model))
    cache = args.out / "states"
    cache.mkdir(parents=True, exist_ok=True)

    def mean_states(sentences: list[str]) -> np.ndarray:
        """[layers, n, d] mean-pooled states, cached by the sentences' content."""
        path = cache / f"{hashlib.sha1(chr(10).join(sentences).encode()).hexdigest()[:16]}.npz"
        if not path.is_file():
            start = time.perf_counter()
            states = extract_pooled_states(model, tokenizer, sentences, poolings=("mean",), batch_size=32,
                                           progress=False)
            with atomic_path(path, suffix=".npz") as tmp:
                np.savez(tmp, **states)
            print(f"  {len(sentences)} sentences in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        with np.load(path) as data:
            return data["mean"]

    results = {}
    for code in args.langs.split(","):
        print(code, file=sys.stderr, flush=True)
        sets = recipes.sentence_pairs(code, args.data_dir, ntrex_pairs=300, codeswitch_pairs=0)
        sets["xnli"] = xnli_pairs(code, data_dir, args.hypotheses)
        states = {name: tuple(mean_states(side) for side in sets[name]) for name in ("sib", "ntrex", "xnli", "xcopa")}
        statistics, offset = {}, 0
        for name in ("sib", "ntrex", "xnli"):
            source, english = states[name]
            statistics[name] = LinearAligner().partial_fit(source, english,
                                                           sample_ids=offset + np.arange(source.shape[1]))
            offset += source.shape[1]
        source, english = states["xcopa"]

        def best_layer(aligner) -> dict:
            p1 = [np.mean([retrieval_p1(aligner.transform(source[layer, fold], layer=layer) if aligner
                                        else source[layer, fold], english[layer, fold])
                           for fold in recipes.XCOPA_FOLDS]) for layer in range(source.shape[0])]
            return {"layer": int(np.argmax(p1)), "p1": float(max(p1))}

        results[code] = {"before": best_layer(None)}
        for fit_name, names in FITS.items():
            aligner = LinearAligner(solver="ridge")
            for name in names:
                aligner = aligner.merge(statistics[name])
            results[code][fit_name] = best_layer(aligner.solve())
        print(f"  {json.dumps(results[code])}", file=sys.stderr, flush=True)

    codes = list(results)
    rows = []
    for fit in ("before", *FITS):
        p1 = [results[code][fit]["p1"] for code in codes]
        rows.append(f"| {fit} | {' | '.join(f'{value:.3f}' for value in p1)} | {np.mean(p1):.3f} |")
    print(f"XCOPA sentences, raw P@1 at the best layer ({args.hypotheses} XNLI hypotheses)\n\n"
          f"| fit | {' | '.join(codes)} | mean |\n|---|{'---|' * (len(codes) + 1)}\n" + "\n".join(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"short-fit-{args.hypotheses}.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
