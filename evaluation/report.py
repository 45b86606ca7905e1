"""The benchmark report: a JSON-able dict, and its files report.json / report.md / report.png / items.jsonl.

Accuracies are fractions. Per language: n, baseline, intervened, delta with a
paired bootstrap 95% CI, exact McNemar test, transfer efficiency (accuracy /
English accuracy, when an English file was evaluated) and the alpha used (a list,
one per fold, under cross-fitting). `mean` and each group average languages with
equal weight; English is reported apart and is in no average.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from evaluation.stats import mcnemar_exact
from evaluation.tasks import get_task
from lingosteer import config_path
from lingosteer.figures import pyplot, save_figure
from lingosteer.files import write_text_atomic
from lingosteer.fingerprint import model_fingerprint
from lingosteer.markdown import markdown_table
from lingosteer.stats import bootstrap_delta_ci, bootstrap_mean_ci

REPORT_JSON, REPORT_MD, REPORT_PNG, ITEMS_JSONL = "report.json", "report.md", "report.png", "items.jsonl"
FORMAT = "lingosteer.bench"
FORMAT_VERSION = 1


def build_report(config, model_dir, eval_sets, outcomes, map_sets, timing, reference, engine: dict) -> dict:
    """`map_sets`: the intervention directories per language, one dict per set (one set per fold, or one);
    `engine`: dtype, device, CPU and vLLM version the scores were computed with."""

    english = next((s for s in eval_sets.values() if s.english), None)
    english_acc = float(outcomes[english.code].baseline.mean()) if english else None
    languages = {}
    for s in eval_sets.values():
        if s.english:
            continue
        o = outcomes[s.code]
        row = _summary([(o.baseline, o.intervened)], config.bootstrap, config.seed)
        row.update(
            n=s.n, first_item=s.first_item, alpha=o.alpha, file=str(s.path), flores=s.flores, calibration=o.calibration,
            intervention=(None if config.plain_only else str(map_sets[0][s.flores]) if len(map_sets) == 1
                          else [str(maps[s.flores]) for maps in map_sets]),
            transfer=None if english_acc is None else {"baseline": row["baseline"] / english_acc,
                                                        "intervened": row["intervened"] / english_acc},
        )
        languages[s.code] = row
    codes = list(languages)
    pairs = {code: (outcomes[code].baseline, outcomes[code].intervened) for code in codes}
    groups = {}
    for name, members in _groups(config).items():
        present = [code for code in members if code in pairs]
        if present:
            groups[name] = {"languages": present,
                            **_summary([pairs[c] for c in present], config.bootstrap, config.seed)}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": config.task.name,
        "model": model_fingerprint(model_dir),
        "model_dir": str(model_dir),
        "engine": engine,
        "prompt_style": config.prompt_style,
        "steer": config.steer,
        "alpha_grid": list(config.alpha_grid),
        "alpha_selection": _selection(config),
        "languages": languages,
        "mean": ({"languages": codes, **_summary(list(pairs.values()), config.bootstrap, config.seed)}
                 if codes else None),
        "groups": groups,
        "english": None if english is None else {"code": english.code, "n": english.n, "accuracy": english_acc,
                                                 "file": str(english.path)},
        "performance": {
            "vllm_seconds": timing.seconds,
            "vllm_item_conditions": timing.item_conditions,
            "vllm_sequences": timing.sequences,
            "vllm_items_per_s": timing.item_conditions / timing.seconds if timing.seconds else None,
            "vllm_prompt_tokens": timing.prompt_tokens,
            "vllm_cached_tokens": timing.cached_tokens,
            "reference": reference,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _summary(pairs, resamples: int, seed: int) -> dict:
    """baseline / intervened accuracy (mean over languages), the baseline's CI, delta, its CI and
    McNemar on pooled items."""
    baseline = float(np.mean([b.mean() for b, _ in pairs]))
    intervened = float(np.mean([i.mean() for _, i in pairs]))
    low, high = bootstrap_delta_ci(pairs, resamples, seed)
    pooled_b = np.concatenate([b for b, _ in pairs])
    pooled_i = np.concatenate([i for _, i in pairs])
    return {"baseline": baseline, "baseline_ci95": list(bootstrap_mean_ci([b for b, _ in pairs], resamples, seed)),
            "intervened": intervened, "delta": intervened - baseline,
            "delta_ci95": [low, high], "mcnemar": mcnemar_exact(pooled_b, pooled_i)}


def _groups(config) -> dict[str, list[str]]:
    import yaml

    path = Path(config.groups_path) if config.groups_path else config_path("bench", "groups.yaml")
    if not path.is_file():
        raise FileNotFoundError(f"groups file {path} not found")
    groups = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get(config.task.name, {})
    if not isinstance(groups, dict) or not all(isinstance(v, list) for v in groups.values()):
        raise ValueError(f"{path}: '{config.task.name}' must map group names to lists of language codes")
    return groups


def _selection(config) -> str:
    if config.plain_only:
        return "none: no interventions, every language scored plain (a baseline)"
    if config.cross_fit:
        return (f"cross-fit: {config.cross_fit} contiguous folds of each evaluation file; "
                "each fold's alpha chosen on the other folds")
    if config.calibrate_paths:
        return "calibration files: alpha chosen per language on the calibration split only"
    return "the artifacts' serving defaults (what a served request naming only its language gets)"


# ---- files --------------------------------------------------------------------------


def write_report(report: dict, items: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """report.json, report.md, report.png and items.jsonl in `out_dir`, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / REPORT_JSON, "markdown": out_dir / REPORT_MD, "plot": out_dir / REPORT_PNG,
             "items": out_dir / ITEMS_JSONL}
    write_text_atomic(paths["json"], json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(paths["markdown"], markdown(report))
    write_text_atomic(paths["items"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
    _plot(report, paths["plot"])
    return paths


def read_report(path: str | Path) -> dict:
    """A report.json (or the directory holding it), checked for format and version."""
    path = Path(path)
    path = path / REPORT_JSON if path.is_dir() else path
    report = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lingosteer benchmark report")
    if report.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {report.get('format_version')!r} is not {FORMAT_VERSION}")
    return report


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _alpha(alpha) -> str:
    if alpha is None:
        return ""
    return " / ".join(f"{a:+g}" for a in alpha) if isinstance(alpha, list) else f"{alpha:+g}"


def _row(name: str, r: dict, n, alpha, transfer) -> list[str]:
    low, high = r["delta_ci95"]
    m = r["mcnemar"]
    baseline = f"{_pct(r['baseline'])} [{_pct(r['baseline_ci95'][0])}, {_pct(r['baseline_ci95'][1])}]"
    return [name, str(n), baseline, _pct(r["intervened"]), f"{100 * r['delta']:+.1f}",
            f"[{100 * low:+.1f}, {100 * high:+.1f}]", f"{m['p']:.3f} ({m['baseline_only']}/{m['intervened_only']})",
            transfer, _alpha(alpha)]


def _skipped_items(report: dict) -> list[str]:
    first = {r.get("first_item", 0) for r in report["languages"].values()}  # reports before --skip-items lack it
    if first == {0}:
        return []
    return [f"- items: each file's from item {', '.join(map(str, sorted(first)))} on (`--skip-items`)"]


def markdown(report: dict) -> str:
    """The report as markdown: settings, then one table row per language, group and the mean."""
    header = ["language", "n", "baseline % [95% CI]", "intervened %", "delta pp", "delta 95% CI",
              "McNemar p (b/c)", "transfer (base / int)", "alpha"]
    rows = []
    for code, r in report["languages"].items():
        transfer = ("" if r["transfer"] is None
                    else f"{r['transfer']['baseline']:.2f} / {r['transfer']['intervened']:.2f}")
        rows.append(_row(code, r, r["n"], r["alpha"], transfer))
    for name, r in report["groups"].items():
        rows.append(_row(f"group {name} ({len(r['languages'])})", r, "", None, ""))
    if report["mean"]:
        rows.append(_row(f"**mean ({len(report['mean']['languages'])})**", report["mean"], "", None, ""))
    if report["english"]:
        e = report["english"]
        rows.append([f"{e['code']} (reference)", str(e["n"]), _pct(e["accuracy"]), "", "", "", "", "1.00", ""])
    lines = [
        f"# {report['task']} benchmark",
        "",
        f"- model: `{report['model_dir']}` ({report['model'].get('architecture')})",
        f"- engine: vLLM {report['engine']['vllm']}, {report['engine']['dtype']}, {report['engine']['device']} "
        f"({report['engine']['cpu']})",
        f"- prompt: {report['prompt_style']}; steered tokens: {report['steer']}",
        f"- alpha: {report['alpha_selection']}; grid {', '.join(f'{a:g}' for a in report['alpha_grid'])}",
        "- CIs: bootstrap over items (within each language; paired for the delta); McNemar: exact binomial on "
        "discordant items, b = baseline-only right, c = intervened-only right",
        *_skipped_items(report),
        "",
        markdown_table(header, rows),
        "",
    ]
    if report.get("incline"):
        lines += _incline_markdown(report)
    perf = report["performance"]
    if perf["vllm_items_per_s"]:
        lines.append(f"vLLM: {perf['vllm_item_conditions']} item-conditions ({perf['vllm_sequences']} sequences) "
                     f"in {perf['vllm_seconds']:.1f} s = {perf['vllm_items_per_s']:.1f} items/s; "
                     f"{perf['vllm_cached_tokens']} of {perf['vllm_prompt_tokens']} prompt tokens "
                     "from the prefix cache")
    ref = perf["reference"]
    if ref:
        lines.append(
            f"HF reference on {ref['items']} items ({ref['item_conditions']} item-conditions): "
            f"vLLM {ref['vllm_items_per_s']:.2f} items/s, HF {ref['hf_items_per_s']:.2f} items/s, "
            f"ratio {ref['speed_ratio']:.1f}x; predictions agree {100 * ref['prediction_agreement']:.1f}%, "
            f"max |loglik diff| {ref['max_abs_loglik_diff']:.3g}"
        )
    return "\n".join(lines) + "\n"


def _incline_markdown(report: dict) -> list[str]:
    """INCLINE as published beside lingosteer's rows, language by language, one table per reading."""
    section = report["incline"]
    lines = ["## INCLINE as published, on the same items", "", f"- protocol: {section['protocol']}",
             f"- s grid: {', '.join(f'{s:g}' for s in section['grid'])}",
             f"- best s on these items: {section['selection']['best_on_items']}",
             f"- s by CV: {section['selection']['cross_validated']}", ""]
    header = ["language", "lingosteer plain %", "lingosteer intervened %", "INCLINE plain %",
              "INCLINE best s on these items % (s)", "INCLINE s by CV %", "INCLINE CV delta pp [95% CI]"]
    for metric, meaning in section["metrics"].items():
        rows = []
        for code, r in section["languages"].items():
            ours, m = report["languages"][code], r[metric]
            cv = m["cross_validated"]
            rows.append([code, _pct(ours["baseline"]), _pct(ours["intervened"]), _pct(m["plain"]),
                         f"{_pct(m['best_on_items']['accuracy'])} ({m['best_on_items']['s']:+g})",
                         _pct(cv["accuracy"]), _delta(cv["accuracy"] - m["plain"], cv["delta_ci95"])])
        mean = (section["mean"] or {}).get(metric)
        if mean and report["mean"]:
            ours = report["mean"]
            rows.append([f"**mean ({len(section['languages'])})**", _pct(ours["baseline"]),
                         _pct(ours["intervened"]), _pct(mean["plain"]), _pct(mean["best_on_items"]),
                         _pct(mean["cross_validated"]),
                         _delta(mean["cross_validated"] - mean["plain"], mean["cross_validated_delta_ci95"])])
        lines += [f"### {metric}: {meaning}", "", markdown_table(header, rows), ""]
    return lines


def _delta(delta: float, ci95) -> str:
    return f"{100 * delta:+.1f} [{100 * ci95[0]:+.1f}, {100 * ci95[1]:+.1f}]"


def _plot(report: dict, path: Path) -> None:

    plt = pyplot()
    names = list(report["languages"]) + (["mean"] if report["mean"] else [])
    rows = list(report["languages"].values()) + ([report["mean"]] if report["mean"] else [])
    x = np.arange(len(names))
    base = np.array([r["baseline"] for r in rows]) * 100
    inter = np.array([r["intervened"] for r in rows]) * 100
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names) + 2), 4))
    ax.bar(x - 0.2, base, 0.4, label="baseline")
    ax.bar(x + 0.2, inter, 0.4, label="intervened")
    chance = 100 * get_task(report["task"]).chance
    ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    if report["english"]:
        ax.axhline(100 * report["english"]["accuracy"], color="black", linestyle="--", linewidth=1,
                   label=f"English ({report['english']['code']})")
    ax.set_xticks(x, names)
    ax.set_ylabel("accuracy %")
    ax.set_title(f"{report['task']}: baseline vs intervened (steer {report['steer']}, {report['prompt_style']})")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
