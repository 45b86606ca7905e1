"""`lingosteer align fit | eval | diagnose`: alignment matrices from the command line.

    lingosteer align fit --model gemma-3-270m --source swh_Latn --target eng_Latn \\
        --out interventions/gemma-3-270m/swh_Latn          # the recommended recipe (alignment/recipe.py)
    lingosteer align build --model gemma-3-270m --source sw,th,tr --calibrate ../shared/data/xcopa \\
        --out interventions/gemma-3-270m                    # fit, then one gate (design 'pooled') for all three
    lingosteer align build ... --source sw --calibrate ../shared/data/xcopa/val.sw.jsonl --gate-design carry \\
        --proxy ../shared/data/xnli                         # chosen on XNLI dev, kept if XCOPA rules out harm
    lingosteer align fit ... --data sib200:train,dev --data ntrex:0-299 --solver procrustes --ray
    lingosteer align eval --model gemma-3-270m --intervention interventions/gemma-3-270m/swh_Latn \\
        --data sib200:test --json
    lingosteer align diagnose --model gemma-3-270m --langs swh_Latn,ita_Latn,zho_Hans --data sib200:dev

Progress bars go to stderr; `eval --json` prints exactly one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from alignment.artifact import DTYPES, FORMS, FitData, load_intervention, replace_dir
from alignment.diagnose import diagnose_languages, write_diagnosis_report
from alignment.estimator import SOLVERS
from alignment.evaluate import evaluate_intervention, write_compare_report, write_eval_report
from alignment.fitting import Compute, fit_artifact
from alignment.hidden_states import POOLINGS, extract_hidden_states, load_model_and_tokenizer
from alignment.recipe import RECIPES, RECOMMENDED, Recipe
from evaluation.gate_designs import DEFAULT_SHARED_DESIGN, DESIGNS, MIN_PROXY_ITEMS
from evaluation.serving_defaults import calibrate_languages, load_calibration_sets
from evaluation.tasks import TASKS
from lingosteer.data import parse_parallel_source
from lingosteer.fingerprint import model_fingerprint
from lingosteer.languages import UnknownLanguageError, normalize_code
from lingosteer.markdown import markdown_table
from lingosteer.models import resolve_model

DATA_HELP = ("parallel data CORPUS[:SPLITS|:FIRST-LAST][@DIR], e.g. sib200:train,dev, ntrex:0-299@/data/ntrex128 "
             "or xcopa (validation items vs their English translations)")
FLORES_SHAPE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")


def register(subparsers) -> None:
    align = subparsers.add_parser("align", help="fit, evaluate and diagnose cross-lingual alignment matrices")
    commands = align.add_subparsers(dest="align_command", required=True)

    fit = commands.add_parser("fit", help="fit per-layer maps source -> target and write an intervention artifact")
    _add_fit_arguments(fit)
    fit.set_defaults(func=run_fit)

    build = commands.add_parser(
        "build", help="fit with the recommended recipe, then choose the serving defaults on labelled calibration "
                      "data (steering stays off unless its gain clears the gate)")
    _add_fit_arguments(build, several_sources=True)
    build.add_argument("--calibrate", nargs="+", required=True, type=Path, metavar="FILE_OR_DIR",
                       help="XCOPA/XNLI-style files or directories of them (<split>.<iso>.jsonl: the language "
                            "from the file name, as bench reads them); one file per language built")
    build.add_argument("--gate-design", choices=("auto", *DESIGNS), default="auto",
                       help="how the gate decides (evaluation/gate_designs.py, docs/benchmarks.md 'Gate power'). "
                            f"auto (default): {DEFAULT_SHARED_DESIGN} for 2+ languages (pooled, one configuration "
                            "chosen across languages and each language judged on a choice made without it, tested "
                            "with an interim look at half the items; 100 XCOPA items x 11 languages detect +3.5 "
                            "points), current for one: no single-language design meets the no-harm targets with "
                            "power (current detects only gains above 9.3 points on 100 items). pooled, sequential "
                            "and shrinkage need 2+ languages; carry needs --proxy. A build scores every item in "
                            "one pass, so sequential saves no scoring here; it decides by its two looks")
    build.add_argument("--proxy", nargs="+", type=Path, default=None, metavar="FILE_OR_DIR",
                       help="--gate-design carry only: a larger labelled set of another task for each language built "
                            f"(XNLI dev files dev.<iso>.tsv, or their directory; at least {MIN_PROXY_ITEMS} items "
                            "each), scored under every candidate on the same engine: GATE_RULE chooses the "
                            "configuration on it, kept only if the calibration items rule out a 3-point loss. "
                            "Scoring 2,490 XNLI items under 25 conditions takes hours per language on CPU")
    build.add_argument("--proxy-max-items", type=int, default=None, metavar="N",
                       help=f"only the first N items of each proxy file (at least {MIN_PROXY_ITEMS})")
    build.add_argument("--proxy-task", choices=tuple(TASKS), default=None,
                       help="the proxy set's task (default: from the proxy paths' names)")
    build.add_argument("--task", choices=tuple(TASKS), default=None,
                       help="the calibration task (default: from the paths' names)")
    build.add_argument("--calibration-max-items", type=int, default=None, help="only the first N calibration items")
    build.add_argument("--engine-dtype", default="float32", help="dtype of the scoring engine (default float32)")
    build.set_defaults(func=run_build)

    evaluate = commands.add_parser("eval", help="evaluate an intervention on held-out parallel data")
    _add_model_and_data(evaluate)
    evaluate.add_argument("--intervention", required=True, type=Path, help="artifact directory")
    evaluate.add_argument("--alpha", type=float, default=1.0, help="strength of the map (default 1: full map)")
    evaluate.add_argument("--report-dir", type=Path, default=None,
                          help="where eval.json/.md/.png go (default <intervention>/eval-<corpus>[-<splits>])")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    evaluate.set_defaults(func=run_eval)

    compare = commands.add_parser("compare", help="evaluate several interventions on the same parallel data")
    _add_model_and_data(compare)
    compare.add_argument("--interventions", required=True, nargs="+", type=Path, help="artifact directories")
    compare.add_argument("--out", type=Path, default=Path("compare"), help="report directory (default ./compare)")
    compare.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    compare.set_defaults(func=run_compare)

    diagnose = commands.add_parser("diagnose", help="per-layer similarity of translations to a target language")
    _add_model_and_data(diagnose)
    diagnose.add_argument("--langs", required=True, help="comma-separated language codes")
    diagnose.add_argument("--target", default="eng_Latn", help="language compared against (default eng_Latn)")
    diagnose.add_argument("--layers", default="all", help="'all' or a list like 0,4,6-9")
    diagnose.add_argument("--pooling", choices=POOLINGS, default="mean")
    diagnose.add_argument("--out", type=Path, default=Path("diagnose"), help="report directory (default ./diagnose)")
    diagnose.set_defaults(func=run_diagnose)


def _add_fit_arguments(parser, several_sources: bool = False) -> None:
    _add_model_and_data(parser, several=True)
    if several_sources:
        parser.add_argument("--source", required=True, action="append",
                            help="source language code(s): sw, or sw,th,tr, or repeated; each is fitted and "
                                 "calibrated, and the gate decides for all of them together")
    else:
        parser.add_argument("--source", required=True, help="source language code (e.g. swh_Latn, sw)")
    parser.add_argument("--target", default="eng_Latn", help="target language code (default eng_Latn)")
    parser.add_argument("--out", required=True, type=Path,
                        help="artifact directory to write" + (" (several sources: the directory that gets one "
                                                              "artifact per language, <out>/<FLORES code>)"
                                                              if several_sources else ""))
    parser.add_argument("--layers", default="all", help="'all' or a list like 0,4,6-9 (0-based decoder layers)")
    parser.add_argument("--recipe", choices=RECIPES, default=None,
                        help="a named fitting recipe (alignment/recipe.py): recommended (the default when no solver "
                             "or data option is given) or incline (INCLINE's released fit, for `bench --incline`)")
    parser.add_argument("--pooling", choices=POOLINGS, default=None,
                        help=f"sentence representation (default {RECOMMENDED.pooling})")
    parser.add_argument("--solver", choices=SOLVERS, default=None,
                        help="ridge (toward identity, lambda per layer on held-out pairs), lstsq (INCLINE: min-norm "
                             "least squares), meanshift (DiffMean: b only) or procrustes (rotation + mean shift); "
                             f"default {RECOMMENDED.solver}")
    parser.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None,
                        help="fit an affine map (default: the solver's own, on for meanshift and procrustes)")
    parser.add_argument("--rank", type=int, default=None, help="store W - I as rank-r factors (ridge and lstsq)")
    parser.add_argument("--standardise", action=argparse.BooleanOptionalAction, default=None,
                        help="ridge on per-dimension z-scores of the states, so that a few massive-activation "
                             "dimensions do not dominate the fit (ridge only; fits the bias)")
    parser.add_argument("--code-switch", action="store_true", default=None,
                        help="INCLINE's code-switched lines: every odd pair becomes 'source target' -> 'target target'")
    parser.add_argument("--holdout-fraction", type=float, default=0.2,
                     help="share of fitting pairs held out to choose lambda (default 0.2)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="tensor dtype in the artifact")
    parser.add_argument("--form", choices=FORMS, default=None,
                        help="map (default): W maps source to target states; incline: W = I + W_incline^T "
                             "(alpha = INCLINE's s)")
    parser.add_argument("--alpha", type=float, default=1.0, help="default strength recorded in the manifest")
    parser.add_argument("--chunk-size", type=int, default=256,
                     help="pairs per extraction chunk; statistics stream, so memory does not grow with the data")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing artifact directory")
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="extract states on Ray workers (local Ray without ADDRESS; one shard per worker)")
    parser.add_argument("--ray-workers", type=int, default=2, help="shards (Ray tasks) with --ray (default 2)")


def _add_model_and_data(parser, several: bool = False) -> None:
    parser.add_argument("--model", required=True, help="prepared model name or Hugging Face model directory")
    if several:
        parser.add_argument("--data", action="append", default=None,
                            help=f"{DATA_HELP}; repeat to mix sources (default: {' + '.join(RECOMMENDED.data)})")
    else:
        parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument("--max-pairs", type=int, default=None, help="use only the first N pairs")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per forward pass")


# ---- argument helpers -------------------------------------------------------------


def parse_layers(text: str, num_layers: int) -> list[int]:
    """'all' or '0,3,5-7' -> sorted distinct 0-based layers, checked against the model."""
    if text.strip().lower() == "all":
        return list(range(num_layers))
    layers = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"bad layer list {text!r}: use 'all' or e.g. 0,3,5-7")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise ValueError(f"bad layer range {part!r} in {text!r}")
        layers.update(range(first, last + 1))
    bad = sorted(layer for layer in layers if layer >= num_layers)
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has {num_layers} layers (0..{num_layers - 1})")
    return sorted(layers)


def language_code(code: str) -> str:
    """The FLORES code for any known code; unknown FLORES-shaped codes (corpus folders) pass as they are."""

    try:
        return normalize_code(code)
    except UnknownLanguageError:
        if FLORES_SHAPE.match(code.strip()):
            return code.strip()
        raise


def _load_pairs(spec: str, source: str, target: str, max_pairs: int | None):

    data = parse_parallel_source(spec)
    return data, _check_pair_count(data.pairs(source, target)[:max_pairs], spec, source, target, max_pairs)


def _check_pair_count(pairs: list, where: str, source: str, target: str, max_pairs: int | None) -> list:
    if max_pairs is not None and max_pairs < 2:
        raise ValueError("--max-pairs must be at least 2")
    if len(pairs) < 2:
        raise ValueError(f"{where}: only {len(pairs)} {source}-{target} pairs; need at least 2")
    return pairs


def _load_model(name_or_dir: str):

    model_dir = resolve_model(name_or_dir)
    model, tokenizer = load_model_and_tokenizer(model_dir)
    return model_dir, model, tokenizer, model_fingerprint(model_dir)


def _states(model, tokenizer, sentences, layers, pooling, batch_size):

    return extract_hidden_states(model, tokenizer, sentences, layers=layers, pooling=pooling,
                                 batch_size=batch_size, progress=True)


# ---- commands ---------------------------------------------------------------------


def run_fit(args) -> int:
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} exists; pass --overwrite to replace it")
    _fit(args, args.out, overwrite=args.overwrite)
    return 0


def _fit(args, out: Path, overwrite: bool, source: str | None = None) -> None:
    """Fit the recipe the fit options ask for and write the artifact of `source` (default --source) to `out`."""
    name, recipe, data_given = fit_recipe(args)
    fit_artifact(recipe, args.model, language_code(source or args.source), language_code(args.target), out, name=name,
                 skip_missing=not data_given, dtype=args.dtype, alpha=args.alpha, overwrite=overwrite,
                 compute=Compute(batch_size=args.batch_size, chunk_size=args.chunk_size, ray_address=args.ray,
                                 workers=args.ray_workers))


# The fit options a recipe sets (argparse names); a named --recipe refuses them. --max-pairs,
# --layers and --holdout-fraction are not among them: they apply to any recipe (INCLINE's recipe
# itself takes the first 500 pairs; --max-pairs shortens that).
RECIPE_OPTIONS = ("solver", "pooling", "data", "bias", "rank", "standardise", "form", "code_switch")


def fit_recipe(args) -> tuple[str, Recipe, bool]:
    """(the name recorded in the manifest, the recipe to fit, whether --data was given): a named
    --recipe, or the recommended one with the options given on top ("custom" if they change it)."""
    given = {name: getattr(args, name) for name in RECIPE_OPTIONS if getattr(args, name, None) is not None}
    if "data" in given:
        given["data"] = tuple(given["data"])
    if args.recipe is not None:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"--recipe {args.recipe} sets the fit itself; drop {flags} or drop --recipe")
        name, recipe = args.recipe, RECIPES[args.recipe]
    else:
        recipe = dataclasses.replace(RECOMMENDED, **given)
        name = "recommended" if recipe == RECOMMENDED else "custom"
    num_layers = model_fingerprint(resolve_model(args.model))["num_hidden_layers"]
    recipe = dataclasses.replace(recipe, max_pairs=args.max_pairs or recipe.max_pairs,
                                 layers=tuple(parse_layers(args.layers, num_layers)),
                                 holdout_fraction=args.holdout_fraction)
    return name, recipe, "data" in given


def build_sources(args) -> list[str]:
    """--source values (comma-separated or repeated) -> distinct FLORES codes, in the order given."""
    sources = [language_code(part) for given in args.source for part in given.split(",") if part.strip()]
    repeated = sorted({code for code in sources if sources.count(code) > 1})
    if repeated or not sources:
        raise ValueError(f"--source must name distinct languages; repeated: {', '.join(repeated) or 'none given'}")
    return sources


def gate_design(name: str, languages: int):
    """--gate-design: 'auto' is DEFAULT_SHARED_DESIGN for 2 or more languages and current for one
    (docs/benchmarks.md)."""
    if name == "auto":
        name = DEFAULT_SHARED_DESIGN if languages >= 2 else "current"
    return DESIGNS[name]


def check_proxy_options(args, design) -> None:
    """--proxy goes with a proxy design (carry) and only with one; checked before anything is read."""
    if design.uses_proxy and not args.proxy:
        raise ValueError(f"--gate-design {design.name} chooses the configuration on a larger labelled set of another "
                         f"task: give it with --proxy FILE_OR_DIR (e.g. XNLI dev files of the same languages, at "
                         f"least {MIN_PROXY_ITEMS} items each)")
    if not design.uses_proxy and (args.proxy or args.proxy_max_items is not None or args.proxy_task):
        raise ValueError(f"--proxy, --proxy-max-items and --proxy-task are read only by --gate-design carry, "
                         f"not {design.name}")
    if args.proxy_max_items is not None and args.proxy_max_items < MIN_PROXY_ITEMS:
        raise ValueError(f"--proxy-max-items {args.proxy_max_items}: a proxy set needs at least {MIN_PROXY_ITEMS} "
                         "items to have more power than the calibration items themselves")
    missing = [str(path) for path in args.proxy or [] if not path.exists()]
    if missing:
        raise FileNotFoundError(f"proxy path(s) not found: {', '.join(missing)}")


def load_proxy_sets(args, design, sources: list[str], sets: dict) -> dict | None:
    """Each language's proxy set (a `LanguageSet` of the proxy files' task), checked before anything is fitted:
    every language built has one, with at least MIN_PROXY_ITEMS items, and none is a calibration file."""
    if not design.uses_proxy:
        return None
    try:
        _, proxies = load_calibration_sets(args.model, args.proxy, sources,
                                           TASKS[args.proxy_task] if args.proxy_task else None, args.proxy_max_items)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"--proxy: {error}") from None
    same = [code for code in sources if proxies[code].path.resolve() == sets[code].path.resolve()]
    if same:
        raise ValueError(f"--proxy: the proxy set of {', '.join(same)} is its calibration file; the proxy must be "
                         "another labelled set (another task's items)")
    design.check_proxy({code: proxies[code].n for code in sources})
    return proxies


def run_build(args) -> int:
    """Fit each language into a staging directory, calibrate them there together, then move them into place:
    an interrupted build never leaves an artifact that would serve uncalibrated defaults."""
    import shutil
    import tempfile

    sources = build_sources(args)
    outs = {sources[0]: args.out} if len(sources) == 1 else {code: args.out / code for code in sources}
    existing = [str(out) for out in outs.values() if out.exists()]
    if existing and not args.overwrite:
        raise ValueError(f"{', '.join(existing)} exist(s); pass --overwrite to replace")
    if args.calibration_max_items is not None and args.calibration_max_items < 1:
        raise ValueError("--calibration-max-items must be positive")
    missing = [str(path) for path in args.calibrate if not path.exists()]
    if missing:
        raise FileNotFoundError(f"calibration path(s) not found: {', '.join(missing)}")
    design = gate_design(args.gate_design, len(sources))
    check_proxy_options(args, design)
    task, sets = load_calibration_sets(args.model, args.calibrate, sources, TASKS[args.task] if args.task else None,
                                       args.calibration_max_items)
    design.check({code: items.n for code, items in sets.items()})
    proxies = load_proxy_sets(args, design, sources, sets)
    parent = args.out.parent if len(sources) == 1 else args.out
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{args.out.name}.build." if len(sources) == 1 else ".build."
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        staged = {code: staging / code for code in sources}
        for code, artifact in staged.items():
            _fit(args, artifact, overwrite=False, source=code)
        print(f"calibrating the serving defaults of {', '.join(sources)} (fits done; scoring every candidate "
              f"through vLLM; gate design {design.name})", file=sys.stderr)
        evidence = calibrate_languages({code: (staged[code], sets[code]) for code in sources}, args.model, task,
                                       design, dtype=args.engine_dtype, proxies=proxies)
        for code in sources:
            replace_dir(staged[code], outs[code])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for code in sources:
        print(f"{outs[code]}: {evidence[code].summary}", file=sys.stderr)
    return 0


def run_eval(args) -> int:

    _, model, tokenizer, fingerprint = _load_model(args.model)
    intervention = load_intervention(args.intervention, expected_fingerprint=fingerprint)
    eval_data = parse_parallel_source(args.data).describe()
    _warn_if_overlapping(intervention.fit_data, eval_data)
    _, pairs = _load_pairs(args.data, intervention.source, intervention.target, args.max_pairs)
    pooling = intervention.manifest.pooling
    X_src = _states(model, tokenizer, [s for s, _ in pairs], intervention.layers, pooling, args.batch_size)
    X_tgt = _states(model, tokenizer, [t for _, t in pairs], intervention.layers, pooling, args.batch_size)
    report = evaluate_intervention(intervention, X_src, X_tgt, alpha=args.alpha)
    report["data"] = args.data
    report_dir = args.report_dir or args.intervention / "-".join(["eval", eval_data["corpus"], *eval_data["splits"]])
    paths = write_eval_report(report, report_dir)
    if args.json:
        print(json.dumps(report))
    else:
        rows = [[r["layer"], f"{r['cosine_before']:.3f}", f"{r['cosine_after']:.3f}",
                 f"{r['p1_before']:.3f}", f"{r['p1_after']:.3f}"] for r in report["layers"]]
        print(markdown_table(["layer", "cos before", "cos after", "P@1 before", "P@1 after"], rows))
    print(f"report: {paths['markdown']} {paths['plot']}", file=sys.stderr)
    return 0


def run_compare(args) -> int:
    """Each artifact at its best layer on the same data (states extracted once per language and pooling)."""
    _, model, tokenizer, fingerprint = _load_model(args.model)
    eval_data = parse_parallel_source(args.data).describe()
    states, rows = {}, []
    for path in args.interventions:
        intervention = load_intervention(path, expected_fingerprint=fingerprint)
        _warn_if_overlapping(intervention.fit_data, eval_data)
        key = (intervention.source, intervention.target, intervention.manifest.pooling)
        if key not in states:
            _, pairs = _load_pairs(args.data, intervention.source, intervention.target, args.max_pairs)
            states[key] = [_states(model, tokenizer, [pair[side] for pair in pairs], list(range(
                fingerprint["num_hidden_layers"])), key[2], args.batch_size) for side in (0, 1)]
        X_src, X_tgt = (s[intervention.layers] for s in states[key])
        report = evaluate_intervention(intervention, X_src, X_tgt, alpha=1.0)
        rows.append({"intervention": str(path), "solver": intervention.manifest.solver,
                     "standardise": intervention.manifest.standardise, "pooling": key[2],
                     "source": intervention.source, "num_pairs": report["num_pairs"],
                     "bytes": sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file()),
                     "layers": report["layers"]})
    comparison = {"data": args.data, "interventions": rows}
    paths = write_compare_report(comparison, args.out)
    print(json.dumps(comparison) if args.json else paths["markdown"].read_text())
    print(f"report: {paths['markdown']} {paths['plot']}", file=sys.stderr)
    return 0


def run_diagnose(args) -> int:

    target = language_code(args.target)
    langs = [language_code(code) for code in args.langs.split(",") if code.strip()]
    if not langs or target in langs:
        raise ValueError(f"--langs must list languages other than the target {target}")
    _, model, tokenizer, fingerprint = _load_model(args.model)
    layers = parse_layers(args.layers, fingerprint["num_hidden_layers"])
    pair_states, target_states = {}, {}
    for lang in langs:
        _, pairs = _load_pairs(args.data, lang, target, args.max_pairs)
        targets = tuple(t for _, t in pairs)
        if targets not in target_states:  # corpora with one sentence set share the target pass
            target_states[targets] = _states(model, tokenizer, targets, layers, args.pooling, args.batch_size)
        X_lang = _states(model, tokenizer, [s for s, _ in pairs], layers, args.pooling, args.batch_size)
        pair_states[lang] = (X_lang, target_states[targets])
    report = diagnose_languages(pair_states, target, layers)
    report.update(data=args.data, pooling=args.pooling)
    paths = write_diagnosis_report(report, args.out)
    print(paths["markdown"].read_text())
    print(f"report: {paths['markdown']} {paths['plot']}", file=sys.stderr)
    return 0


def _warn_if_overlapping(fit_data: FitData, eval_data: dict) -> None:
    """Evaluating on the pairs the map was fitted on flatters it: say so loudly."""
    # Manifests older than `sources` named their one source's fields at the top of fit_data.
    for fitted in fit_data.sources or [fit_data.model_extra or {}]:
        if (fitted.get("corpus"), fitted.get("data_dir")) != (eval_data["corpus"], eval_data["data_dir"]):
            continue
        shared_splits = set(fitted.get("splits", [])) & set(eval_data["splits"])
        fit_lines, eval_lines = fitted.get("lines"), eval_data.get("lines")
        disjoint_lines = fit_lines and eval_lines and (fit_lines[1] < eval_lines[0] or eval_lines[1] < fit_lines[0])
        if shared_splits or (not eval_data["splits"] and not disjoint_lines):
            print(f"warning: evaluation data overlaps the fitting data ({eval_data['corpus']} "
                  f"{sorted(shared_splits) or fit_lines or ''}); these numbers are not held-out", file=sys.stderr)

