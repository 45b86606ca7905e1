"""`sweep analyse`: from a results directory to interference.json, CSV, markdown and PNGs."""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lingosteer.languages import get_language
from lingosteer.markdown import markdown_table
from matrix import analysis, plots
from matrix.artifact import InterferenceMatrix, save_interference
from matrix.completion import cosine_similarity_matrix, evaluate_completion
from matrix.sweep import load_records, plan_runs, run_id


def _language_table(languages: tuple[str, ...]) -> list[dict]:

    table = []
    for code in languages:
        language = get_language(code)
        table.append(
            {"code": code, "name": language.name, "family": language.family or "", "script": language.script or "",
             "resource": language.resource or ""}
        )
    return table


def _sweep_metadata(results: Path, manifest: dict, records: list[dict], languages: tuple[str, ...]) -> dict:
    planned = {run_id(run) for run in plan_runs(languages)}
    measured = [r for r in records if r["run_id"] in planned]
    invocations = []
    log = results / "invocations.jsonl"
    if log.is_file():
        invocations = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]

    def summary(key):
        values = [r[key] for r in measured if key in r]
        return {"median": statistics.median(values), "max": max(values), "min": min(values)} if values else None

    return {
        "sweep": manifest.get("identity", {}),
        "sweep_config": manifest.get("config"),
        "runs": {"measured": len(measured), "planned": len(planned)},
        "run_wall_seconds": summary("wall_seconds"),
        "run_train_seconds": summary("train_seconds"),
        "run_peak_rss_mib": summary("peak_rss_mib"),
        "run_cpu_seconds": summary("cpu_seconds"),
        "runs_with_cpu_seconds": sum("cpu_seconds" in r for r in measured),
        "num_parameters": measured[0].get("num_parameters") if measured else None,
        "sweep_wall_seconds": sum(i["wall_seconds"] for i in invocations) if invocations else None,
        # From the first run's start to the last run's end: covers invocations that were killed too.
        "sweep_span_seconds": (
            max(datetime.fromisoformat(r["finished_at"]) for r in measured)
            - min(datetime.fromisoformat(r["started_at"]) for r in measured)
        ).total_seconds()
        if measured
        else None,
        "sweep_invocations": len(invocations),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_matrix_csv(path: Path, languages: tuple[str, ...], matrix: np.ndarray) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["evaluated \\ added", *languages])
        for code, row in zip(languages, matrix):
            writer.writerow([code, *("" if math.isnan(v) else f"{v:.6f}" for v in row)])


def _family_order(table: list[dict]) -> list[int]:
    return sorted(range(len(table)), key=lambda i: (table[i]["family"], table[i]["script"], table[i]["code"]))


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.{digits}f}"


def analyse(matrix: InterferenceMatrix, table: list[dict], similarity: np.ndarray | None = None,
            holdout_seed: int = 0) -> dict:
    """All statistics of the analysis as one JSON-able dict."""
    interference, loss = matrix.interference, matrix.loss
    scripts = [row["script"] for row in table]
    families = [row["family"] for row in table]
    resources = [row["resource"] for row in table]
    robustness, friendliness = matrix.robustness, matrix.friendliness
    measured = ~np.isnan(loss)
    monolingual_loss = np.diag(loss).copy()
    # Per-language average loss over every model that covers it (NaN if none is measured yet).
    mean_loss = np.where(measured.any(axis=1), np.nansum(loss, axis=1) / np.maximum(measured.sum(axis=1), 1), np.nan)
    outliers, bounds = analysis.iqr_outliers(mean_loss)
    result = {
        "per_language": [
            {**row, "monolingual_loss": float(loss[i, i]), "mean_loss": float(mean_loss[i]),
             "robustness": float(robustness[i]), "friendliness": float(friendliness[i]), "outlier": bool(outliers[i])}
            for i, row in enumerate(table)
        ],
        "outlier_bounds": bounds,
        "asymmetry": asdict(analysis.asymmetry(interference, robustness, friendliness)),
        "same_script": asdict(analysis.same_vs_different(interference, scripts)),
        "same_family": asdict(analysis.same_vs_different(interference, families)),
        "robustness_by_resource": analysis.mean_by_group(robustness, resources),
        "friendliness_by_resource": analysis.mean_by_group(friendliness, resources),
        "resource_p_values": {
            "robustness_high_vs_low": analysis.permutation_p_value(robustness, resources, "High", "Low"),
            "friendliness_high_vs_low": analysis.permutation_p_value(friendliness, resources, "High", "Low"),
            "monolingual_loss_high_vs_low": analysis.permutation_p_value(monolingual_loss, resources, "High", "Low"),
        },
        "monolingual_loss_by_resource": analysis.mean_by_group(monolingual_loss, resources),
        "groups": {},
    }
    for name, labels, min_size in (("family", families, 3), ("script", scripts, 1), ("resource", resources, 1)):
        groups, block = analysis.group_means(interference, labels, min_size)
        result["groups"][name] = {"groups": groups, "mean_interference": block.tolist()}
    measured_pairs = int(np.sum(np.triu(~np.isnan(interference) & ~np.isnan(interference.T), k=1)))
    if measured_pairs >= 4:
        scores = evaluate_completion(interference, scripts, families, similarity, seed=holdout_seed)
        result["completion"] = {"holdout_fraction": 0.3, "repeats": 20, "scores": [asdict(s) for s in scores]}
    return result


def _markdown(matrix: InterferenceMatrix, stats: dict, embedding_note: str) -> str:
    meta = matrix.metadata
    lines = [
        "# Interference sweep analysis",
        "",
        f"{meta['runs']['measured']} of {meta['runs']['planned']} runs measured; "
        f"{len(matrix.languages)} languages. I[A,B] = (L[A] - L[A,B]) / L[A]: row A evaluated, column B added; "
        "negative = B hurts A. Robustness = row mean, friendliness = column mean (diagonal left out).",
        "",
    ]
    if meta.get("run_wall_seconds"):
        lines += [
            f"Cost: per run median {meta['run_wall_seconds']['median']:.1f} s wall "
            f"(max {meta['run_wall_seconds']['max']:.1f} s), "
            f"peak RSS median {meta['run_peak_rss_mib']['median']:.0f} MiB "
            f"(max {meta['run_peak_rss_mib']['max']:.0f} MiB), {meta['num_parameters']:,} parameters; "
            + (f"CPU time per run median {meta['run_cpu_seconds']['median']:.1f} s "
               f"(over {meta['runs_with_cpu_seconds']} runs that recorded it); " if meta.get("run_cpu_seconds") else "")
            + f"first run start to last run end {meta['sweep_span_seconds'] / 60:.1f} min"
            + (f"; completed invocations took {meta['sweep_wall_seconds'] / 60:.1f} min ({meta['sweep_invocations']})."
               if meta.get("sweep_wall_seconds") else "."),
            "",
        ]
    per_language = [
        [row["code"], row["family"], row["script"], row["resource"], f"{row['monolingual_loss']:.4f}",
         f"{row['mean_loss']:.4f}", _fmt(row["robustness"]), _fmt(row["friendliness"]), "yes" if row["outlier"] else ""]
        for row in stats["per_language"]
    ]
    lines += ["## Per language", "", markdown_table(
        ["language", "family", "script", "resource", "mono loss", "mean loss", "robustness", "friendliness", "outlier"],
        per_language)]
    a, s, f = stats["asymmetry"], stats["same_script"], stats["same_family"]
    lines += [
        "",
        f"IQR bounds on mean loss: [{stats['outlier_bounds'][0]:.4f}, {stats['outlier_bounds'][1]:.4f}].",
        "",
        "## The paper's findings at this scale",
        "",
        f"- **Asymmetry**: over {a['pairs']} pairs, mean |I[A,B] - I[B,A]| = {a['mean_abs_difference']:.4f} "
        f"against mean |I| = {a['mean_abs_interference']:.4f}; corr(I, I^T) = {a['correlation']:.3f}; "
        f"the two directions disagree in sign for {100 * a['sign_disagreement']:.0f}% of pairs; "
        f"corr(robustness, friendliness) = {a['robustness_friendliness_correlation']:.3f}.",
        f"- **Same script**: mean I within a script {_fmt(s['same_mean'])} ({s['same_count']} entries) vs across "
        f"scripts {_fmt(s['different_mean'])} ({s['different_count']}); "
        f"difference {_fmt(s['same_mean'] - s['different_mean'])}, "
        f"permutation p = {s['p_value']:.3f}.",
        f"- **Same family**: within {_fmt(f['same_mean'])} ({f['same_count']}) vs across {_fmt(f['different_mean'])} "
        f"({f['different_count']}); permutation p = {f['p_value']:.3f}.",
        "- **Resource level**: robustness "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in stats["robustness_by_resource"].items())
        + "; friendliness "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in stats["friendliness_by_resource"].items())
        + f" (permutation p High vs Low: robustness {stats['resource_p_values']['robustness_high_vs_low']:.3f}, "
        f"friendliness {stats['resource_p_values']['friendliness_high_vs_low']:.3f}); monolingual loss "
        + ", ".join(f"{k} {v:.3f}" for k, v in stats["monolingual_loss_by_resource"].items())
        + f" (p {stats['resource_p_values']['monolingual_loss_high_vs_low']:.3f}).",
        "",
        "## Group means (mean I, row = evaluated group, column = added group)",
        "",
    ]
    for name, data in stats["groups"].items():
        groups, block = data["groups"], data["mean_interference"]
        rows = [[g, *("" if v is None or math.isnan(v) else f"{v:+.4f}" for v in row)] for g, row in zip(groups, block)]
        lines += [f"### by {name}", "", markdown_table(["", *groups], rows), ""]
    if "completion" in stats:
        c = stats["completion"]
        lines += [
            "## Matrix completion",
            "",
            f"Hide {int(100 * c['holdout_fraction'])}% of the measured pairs (both directions), predict them; "
            f"{c['repeats']} random splits. {embedding_note}",
            "",
            markdown_table(["method", "MAE", "RMSE", "corr"],
                           [[score["method"], f"{score['mae']:.4f}", f"{score['rmse']:.4f}",
                             f"{score['correlation']:.3f}"] for score in c["scores"]]),
            "",
        ]
    lines += ["## Pictures", "", "![interference](interference_heatmap.png)", "",
              "![robustness vs friendliness](robustness_friendliness.png)", "", "![groups](group_means.png)", "",
              "![loss](loss_heatmap.png)", ""]
    return "\n".join(lines)


def write_analysis(results: str | Path, out: str | Path, holdout_seed: int = 0,
                   embeddings: np.ndarray | None = None, embedding_note: str = "") -> list[Path]:
    """Analyse a results directory; `embeddings` ([n_languages, d], sweep order) adds the cosine proxy."""

    results, out = Path(results), Path(out)
    manifest, records = load_records(results)
    languages = tuple(manifest["identity"]["languages"])
    if not records:
        raise ValueError(f"{results} holds no finished runs yet")
    table = _language_table(languages)
    loss = analysis.loss_matrix(records, languages)
    matrix = InterferenceMatrix.from_loss(languages, loss, _sweep_metadata(results, manifest, records, languages))
    # Mean LM states share one large common direction (all raw cosines are ~0.998);
    # removing the across-language mean leaves what tells languages apart.
    similarity = cosine_similarity_matrix(embeddings - embeddings.mean(axis=0)) if embeddings is not None else None
    stats = analyse(matrix, table, similarity, holdout_seed)
    if embeddings is None:
        embedding_note = "No embedding proxy: run `sweep analyse --embedding-model MODEL` to add one."
    matrix.metadata["embedding_proxy"] = embedding_note
    matrix.metadata["statistics"] = stats

    out.mkdir(parents=True, exist_ok=True)
    written = [save_interference(matrix, out / "interference.json")]
    _write_matrix_csv(out / "loss.csv", languages, matrix.loss)
    _write_matrix_csv(out / "interference.csv", languages, matrix.interference)
    (out / "summary.md").write_text(_markdown(matrix, stats, embedding_note))
    written += [out / "loss.csv", out / "interference.csv", out / "summary.md"]

    order = _family_order(table)
    labels = [f"{table[i]['code']} ({table[i]['family'] or '?'})" for i in order]
    ix = np.ix_(order, order)
    written.append(plots.heatmap(matrix.interference[ix], labels, "Interference I[A,B] (sorted by family)",
                                 out / "interference_heatmap.png", "RdBu", center=0.0, colorbar_label="I"))
    written.append(plots.heatmap(matrix.loss[ix], labels, "MLM loss L[A,B] (diagonal: monolingual)",
                                 out / "loss_heatmap.png", "viridis_r", colorbar_label="loss"))
    written.append(plots.robustness_friendliness_scatter(
        matrix.robustness, matrix.friendliness, list(languages), [row["script"] for row in table],
        out / "robustness_friendliness.png",
    ))
    blocks = {name: (data["groups"], np.array(data["mean_interference"], dtype=float))
              for name, data in stats["groups"].items() if data["groups"]}
    written.append(plots.group_heatmaps(blocks, out / "group_means.png"))
    return written
