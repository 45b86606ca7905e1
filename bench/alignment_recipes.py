"""Which alignment recipe transfers? Out-of-domain retrieval of every solver x pooling x fit data.

    python bench/alignment_recipes.py extract --out reports/alignment-recipes   # hidden states, cached (~20 min)
    python bench/alignment_recipes.py compare --out reports/alignment-recipes   # fits + evaluation (~minutes)
    python bench/alignment_recipes.py artifacts --candidates 'ridge|mean|sib+ntrex' --out reports/alignment-recipes

`extract` runs Gemma 3 270M once over every sentence set (both poolings from one
forward pass, all layers) and caches the states as .npz (plain arrays, no pickle):

- `sib`: SIB-200 train+dev (801 FLORES sentences), the fitting domain of today's maps;
- `sibtest`: SIB-200 test (204), the in-domain check;
- `ntrex`: the first --ntrex-pairs NTREX-128 news sentences;
- `xcopa`: the XCOPA validation items (premise and both choices, 300 short everyday
  sentences) against their English translations (xcopa/translated-en);
- `codeswitch`: INCLINE's code-switched lines on the first --codeswitch-pairs SIB-200
  pairs, every one of them switched (`lingosteer.data.code_switched(..., every=1)`):
  source side "src + ' ' + eng", target side "eng + ' ' + eng".

`compare` fits every candidate recipe from the cached states and evaluates it on a
domain it never saw; see docs/alignment.md for the selection rule, which is fixed in
`SELECTION_RULE` below before any result is read. `artifacts` writes named candidates
as servable artifacts (`<out>/artifacts/<solver>-<pooling>-<data>/<FLORES code>`), fitted
from the same cached states, for the downstream check with `lingosteer bench xcopa`.
A candidate is a recipe value (`recipe`, alignment.recipe.Recipe) fitted on cached statistics.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from alignment.estimator import LinearAligner
from alignment.evaluate import LayerCurve, LayerPanel, plot_layer_curves, retrieval_p1_raw_and_centred
from alignment.fitting import write_fit
from alignment.hidden_states import extract_pooled_states, load_model_and_tokenizer
from alignment.recipe import Recipe
from lingosteer import DEFAULT_DATA_DIR
from lingosteer.data import code_switched, parallel_ntrex, parallel_sib200, parallel_xcopa, parse_parallel_source
from lingosteer.files import atomic_path, write_text_atomic
from lingosteer.fingerprint import model_fingerprint
from lingosteer.languages import normalize_code
from lingosteer.markdown import markdown_table
from lingosteer.models import resolve_model

LANGUAGES = "et,id,sw,ta,th,tr,vi,zh"  # 8 languages, 4 scripts (Latin, Tamil, Thai, Han)
SETS = ("sib", "sibtest", "ntrex", "xcopa", "codeswitch")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("extract", "compare", "artifacts"))
    parser.add_argument("--candidates", nargs="+", default=[],
                        help="artifacts: candidates as compare names them, e.g. 'ridge-std|mean|sib+ntrex'")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--langs", default=LANGUAGES, help="XCOPA language codes, comma-separated")
    parser.add_argument("--ntrex-pairs", type=int, default=600)
    parser.add_argument("--codeswitch-pairs", type=int, default=400)
    parser.add_argument("--data-dir", type=Path, default=None, help="root holding sib200/, ntrex128/ and xcopa/")
    parser.add_argument("--out", type=Path, default=Path("reports/alignment-recipes"))
    parser.add_argument("--docs", type=Path, default=None, help="also write the tables and plots here (docs/alignment)")
    return parser.parse_args(argv)


def sentence_pairs(code: str, data_dir: Path | None, ntrex_pairs: int, codeswitch_pairs: int) -> dict:
    """{set name: (source sentences, English sentences)} for one XCOPA language."""

    lang = normalize_code(code)
    unzip = lambda pairs: ([s for s, _ in pairs], [t for _, t in pairs])  # noqa: E731
    sib = parallel_sib200(lang, "eng_Latn", ("train", "dev"), data_dir)
    switched = code_switched(sib[:codeswitch_pairs], every=1)
    return {
        "sib": unzip(sib),
        "sibtest": unzip(parallel_sib200(lang, "eng_Latn", ("test",), data_dir)),
        "ntrex": unzip(parallel_ntrex(lang, "eng_Latn", data_dir)[:ntrex_pairs]),
        "xcopa": unzip(parallel_xcopa(code, (data_dir or DEFAULT_DATA_DIR) / "xcopa")),
        "codeswitch": unzip(switched),
    }


def extract(args) -> None:

    model, tokenizer = load_model_and_tokenizer(resolve_model(args.model))
    cache = args.out / "states"
    cache.mkdir(parents=True, exist_ok=True)
    english_done: dict[tuple, Path] = {}
    for code in args.langs.split(","):
        for name, (source, english) in sentence_pairs(code, args.data_dir, args.ntrex_pairs,
                                                      args.codeswitch_pairs).items():
            for side, sentences in (("src", source), ("eng", english)):
                path = cache / f"{code}.{name}.{side}.npz"
                if side == "eng" and tuple(sentences) in english_done:  # SIB and NTREX English are shared
                    path.unlink(missing_ok=True)
                    path.symlink_to(english_done[tuple(sentences)].name)
                    continue
                if not path.is_file():
                    start = time.perf_counter()
                    states = extract_pooled_states(model, tokenizer, sentences, batch_size=32, progress=False)
                    with atomic_path(path, suffix=".npz") as tmp:
                        np.savez(tmp, **states)
                    print(f"{code} {name} {side}: {len(sentences)} sentences in {time.perf_counter() - start:.0f} s",
                          file=sys.stderr, flush=True)
                if side == "eng":
                    english_done[tuple(sentences)] = path


# ---- compare ------------------------------------------------------------------------

# Written before any result was read; docs/alignment.md quotes it.
SELECTION_RULE = (
    "Among the candidates fitted without NTREX, the solver x pooling x code-switching with the highest "
    "mean over languages of the best layer's raw source->target P@1 after mapping on NTREX (pairs "
    "300-599, a domain none of them saw) wins. The default then fits that recipe on SIB-200 train+dev "
    "plus NTREX pairs 0-299 (a second domain can only widen what the map has seen; fixed in advance, "
    "not selected). XCOPA's short sentences are never used for fitting or selection: they are the "
    "report domain."
)
SOLVER_OPTIONS = {  # name -> the recipe's estimator settings (alignment.recipe.Recipe fields)
    "ridge": dict(solver="ridge"),  # today's default
    "lstsq": dict(solver="lstsq"),  # INCLINE
    "meanshift": dict(solver="meanshift"),
    "procrustes": dict(solver="procrustes"),
    # Added 2026-12-02 after a diagnostic on sw and vi (docs/alignment.md): an intercept, and the
    # ridge on per-dimension z-scores that keeps massive-activation dimensions from dominating.
    "ridge+bias": dict(solver="ridge", bias=True),
    "ridge-std": dict(solver="ridge", standardise=True),
}
DATA_OPTIONS = {  # name -> the cached sets fitted on (ntrex: its first half)
    "sib": ("sib",),
    "sib+cs": ("sib", "codeswitch"),
    "sib+ntrex": ("sib", "ntrex"),
    "sib+ntrex+cs": ("sib", "ntrex", "codeswitch"),
}
NTREX_FIT = slice(0, 300)
# Each cached set as the corpus spec it was read from (the code-switched lines are SIB-200 pairs).
SPECS = {"sib": "sib200:train,dev", "ntrex": f"ntrex:{NTREX_FIT.start}-{NTREX_FIT.stop - 1}",
         "codeswitch": "sib200:train,dev"}
NTREX_EVAL = slice(300, 600)
XCOPA_FOLDS = (slice(0, 150), slice(150, 300))  # items 0-49 and 50-99: the bench's --cross-fit 2 halves
POOLINGS = ("mean", "last")


def load_states(cache: Path, code: str) -> dict:
    """{set: {"src"|"eng": {pooling: [layers, n, d]}}} for one language."""
    states = {}
    for name in SETS:
        states[name] = {}
        for side in ("src", "eng"):
            with np.load(cache / f"{code}.{name}.{side}.npz") as data:
                states[name][side] = {pooling: data[pooling] for pooling in POOLINGS}
    return states


def statistics(states: dict) -> dict:
    """{(set, pooling): unsolved aligner holding that set's statistics}: computed once,
    merged per recipe (statistics add, and do not depend on the solver)."""

    cached, offset = {}, 0
    for name in ("sib", "ntrex", "codeswitch"):
        part = NTREX_FIT if name == "ntrex" else slice(None)
        for pooling in POOLINGS:
            src, eng = states[name]["src"][pooling][:, part], states[name]["eng"][pooling][:, part]
            # Distinct global ids per set, so each set's held-out pairs stay held out when merged.
            ids = offset + np.arange(src.shape[1])
            cached[name, pooling] = LinearAligner().partial_fit(src, eng, sample_ids=ids)
        offset += src.shape[1]
    return cached


def recipe(solver: str, pooling: str, data: str) -> Recipe:
    """A candidate as a recipe. The code-switched set is added to the SIB-200 pairs, not put in place of
    some of them (the recipe's `code_switch`), so its source records it (`artifacts`)."""
    return Recipe(pooling=pooling, data=tuple(dict.fromkeys(SPECS[name] for name in DATA_OPTIONS[data])),
                  **SOLVER_OPTIONS[solver])


def fit(cached: dict, solver: str, pooling: str, data: str):

    aligner = recipe(solver, pooling, data).aligner()
    for name in DATA_OPTIONS[data]:
        aligner = aligner.merge(cached[name, pooling])
    return aligner.solve()


DOMAINS = {"sibtest": [slice(None)], "ntrex": [NTREX_EVAL], "xcopa": list(XCOPA_FOLDS)}


def per_domain(states: dict, pooling: str, figures) -> dict:
    """{domain: [per-layer figures]}, `figures(src, eng, layer) -> dict` on each domain's evaluation
    pairs; XCOPA's figures are the mean over its two folds."""
    report = {}
    for domain, parts in DOMAINS.items():
        src, eng = states[domain]["src"][pooling], states[domain]["eng"][pooling]
        rows = []
        for layer in range(src.shape[0]):
            per_part = [figures(src[layer, part], eng[layer, part], layer) for part in parts]
            rows.append({key: float(np.mean([m[key] for m in per_part])) for key in per_part[0]})
        report[domain] = rows
    return report


def evaluate(aligner, states: dict, pooling: str, metrics=None) -> dict:
    """{domain: [per-layer metrics]} after mapping the source states with `aligner`.

    `metrics(src, mapped, eng) -> dict` defaults to raw and centred P@1 source->English
    after mapping (the comparison's figures); `alignment.evaluate.layer_metrics` gives all.
    """

    metrics = metrics or (lambda src, mapped, eng: retrieval_p1_raw_and_centred(mapped, eng, "p1_after"))
    return per_domain(states, pooling,
                      lambda src, eng, layer: metrics(src, aligner.transform(src, layer=layer), eng))


def unmapped(states: dict, pooling: str) -> dict:
    """P@1 before any map, raw and centred, per domain and layer."""

    return per_domain(states, pooling, lambda src, eng, layer: retrieval_p1_raw_and_centred(src, eng, "p1_before"))


def best_layer(rows: list[dict], key: str = "p1_after") -> dict:
    """The layer with the highest `key`, with its before/after figures (raw and centred)."""
    layer = int(np.argmax([r[key] for r in rows]))
    row = rows[layer]
    suffix = "_centred" if key.endswith("_centred") else ""
    return {"layer": layer, "before": row["p1_before" + suffix], "after": row[key],
            "gain": row[key] - row["p1_before" + suffix]}


def compare(args) -> None:
    from tqdm.auto import tqdm

    codes = args.langs.split(",")
    results = {}  # "solver|pooling|data" -> code -> domain -> rows
    candidates = [(s, p, d) for d in DATA_OPTIONS for p in POOLINGS for s in SOLVER_OPTIONS]
    for code in tqdm(codes, desc="languages"):
        states = load_states(args.out / "states", code)
        cached = statistics(states)
        before = {pooling: unmapped(states, pooling) for pooling in POOLINGS}
        for solver, pooling, data in tqdm(candidates, desc=code, leave=False):
            after = evaluate(fit(cached, solver, pooling, data), states, pooling)
            results.setdefault(f"{solver}|{pooling}|{data}", {})[code] = {
                domain: [{**b, **a} for b, a in zip(before[pooling][domain], rows)] for domain, rows in after.items()}
    summary = summarise(results, codes)
    chosen = select(summary)
    report = {"languages": codes, "selection_rule": SELECTION_RULE, "chosen": chosen, "summary": summary,
              "results": results}
    write_reports(report, args.out, args.docs)


def summarise(results: dict, codes: list[str]) -> dict:
    """Per candidate and domain: per-language best layer (raw and centred) and their means."""
    summary = {}
    for name, by_code in results.items():
        summary[name] = {}
        for domain in ("sibtest", "ntrex", "xcopa"):
            per_language = {code: {"raw": best_layer(by_code[code][domain]),
                                   "centred": best_layer(by_code[code][domain], "p1_after_centred")}
                            for code in codes}
            summary[name][domain] = {
                "languages": per_language,
                **{f"{kind}_{field}": float(np.mean([v[kind][field] for v in per_language.values()]))
                   for kind in ("raw", "centred") for field in ("before", "after", "gain")},
                "raw_min_after": float(min(v["raw"]["after"] for v in per_language.values())),
            }
    return summary


def select(summary: dict) -> dict:
    """SELECTION_RULE, applied."""
    without_ntrex = {name: s for name, s in summary.items() if "ntrex" not in name.split("|")[2]}
    best = max(without_ntrex, key=lambda name: without_ntrex[name]["ntrex"]["raw_after"])
    solver, pooling, data = best.split("|")
    default = f"{solver}|{pooling}|{data.replace('sib', 'sib+ntrex', 1)}"
    return {"selected_on_ntrex": best, "default": default}


def write_reports(report: dict, out: Path, docs: Path | None) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "recipes.json", json.dumps(report, indent=1) + "\n")
    summary, codes = report["summary"], report["languages"]
    header = ["solver", "pooling", "fit data", *[f"{d} {k}" for d in ("NTREX", "XCOPA") for k in
                                                 ("before", "after", "gain", "min after", "centred after")],
              "SIB test after"]
    rows = []
    for name, s in sorted(summary.items(), key=lambda kv: -kv[1]["xcopa"]["raw_after"]):
        cells = [*name.split("|")]
        for domain in ("ntrex", "xcopa"):
            d = s[domain]
            cells += [f"{d['raw_before']:.3f}", f"{d['raw_after']:.3f}", f"{d['raw_gain']:+.3f}",
                      f"{d['raw_min_after']:.3f}", f"{d['centred_after']:.3f}"]
        cells.append(f"{s['sibtest']['raw_after']:.3f}")
        rows.append(cells)
    chosen = report["chosen"]["default"]
    per_language = [[code, *[f"{summary[name]['xcopa']['languages'][code]['raw'][k]:.3f}" if k != "layer" else
                             str(summary[name]["xcopa"]["languages"][code]["raw"][k])
                             for name in ("ridge|mean|sib", chosen) for k in ("layer", "before", "after")]]
                    for code in codes]
    text = (
        f"Languages: {', '.join(codes)}. Best layer per language (highest P@1 after), averaged over languages.\n"
        f"NTREX: pairs 300-599; XCOPA: 300 short sentences, two folds of 150.\n\n"
        f"{markdown_table(header, rows)}\n\nSelection rule: {report['selection_rule']}\n\n"
        f"Selected on NTREX: `{report['chosen']['selected_on_ntrex']}`; retrieval's pick for the default: `{chosen}` "
        f"(it becomes the default only if the downstream check of docs/alignment.md agrees).\n\n"
        f"XCOPA per language, the first recipe (ridge, mean, SIB) vs retrieval's pick:\n\n"
        + markdown_table(["language", "first recipe: layer", "before", "after", "pick: layer", "before", "after"],
                         per_language) + "\n"
    )
    write_text_atomic(out / "recipes.md", text)
    plot(report, out / "recipes.png")
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        write_text_atomic(docs / "recipes.md", text)
        plot(report, docs / "recipes.png")
    print(text)


def plot(report: dict, path: Path) -> None:
    """XCOPA P@1 per layer, mean over languages: the first recipe, INCLINE's solver, the default
    (alignment.recipe.RECOMMENDED) and retrieval's pick, raw and centred."""

    results, codes = report["results"], report["languages"]
    names = list(dict.fromkeys(["ridge|mean|sib", "lstsq|mean|sib", "ridge|mean|sib+ntrex",
                                report["chosen"]["default"]]))

    def curve(name: str, key: str, reference: bool = False) -> LayerCurve:
        values = np.mean([[r[key] for r in results[name][c]["xcopa"]] for c in codes], axis=0)
        label = "no map" if reference else name.replace("|", ", ")
        return LayerCurve(label, list(range(len(values))), values.tolist(), reference=reference)

    plot_layer_curves(path, [
        LayerPanel("P@1 source->English, mean of languages",
                   [curve(names[0], "p1_before" + suffix, reference=True),
                    *[curve(name, "p1_after" + suffix) for name in names]],
                   title=f"XCOPA sentences (never fitted on), {title}")
        for suffix, title in (("", "raw states"), ("_centred", "mean-centred states"))])


def artifacts(args) -> None:

    candidates = [candidate.split("|") for candidate in args.candidates]
    for candidate, parts in zip(args.candidates, candidates):
        known = (SOLVER_OPTIONS, POOLINGS, DATA_OPTIONS)
        if len(parts) != 3 or any(part not in names for part, names in zip(parts, known)):
            raise SystemExit(f"unknown candidate {candidate!r}: solver in {list(SOLVER_OPTIONS)}, pooling in "
                             f"{list(POOLINGS)}, data in {list(DATA_OPTIONS)}")
    fingerprint = model_fingerprint(resolve_model(args.model))
    for code in args.langs.split(","):
        cached = statistics(load_states(args.out / "states", code))  # once per language, shared by the candidates
        for candidate, (solver, pooling, data) in zip(args.candidates, candidates):
            aligner = fit(cached, solver, pooling, data)
            sources = [{**parse_parallel_source(SPECS[name], args.data_dir or DEFAULT_DATA_DIR).describe(),
                        "spec": SPECS[name], "code_switched": name == "codeswitch"} for name in DATA_OPTIONS[data]]
            out = args.out / "artifacts" / candidate.replace("|", "-") / normalize_code(code)
            write_fit(recipe(solver, pooling, data), aligner, out, name=f"bench/alignment_recipes.py {candidate}",
                      fingerprint=fingerprint, source=normalize_code(code), target="eng_Latn",
                      layers=list(range(aligner.W_.shape[0])), sources=sources, overwrite=True)
            print(f"wrote {out}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    {"extract": extract, "compare": compare, "artifacts": artifacts}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
