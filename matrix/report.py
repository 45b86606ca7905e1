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
from matrix.design import (
    MAX_PARTNERS,
    TARGET_MAE,
    TARGET_SPEARMAN,
    choose_k,
    complete,
    leave_one_pair_out,
    validate_design,
)
from matrix.jsonio import write_json_atomic
from matrix.sweep import design_pairs, load_records, plan_runs, run_id

COMPLETION_METHOD = (
    "I[A,B] ~ mu + r[A] + c[B] + b_script [same script] + b_family [same family] + u[A].v[B] (rank 1, ridge 0.1), "
    "fitted on the measured entries (matrix/completion.py)"
)


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
    planned = {run_id(run) for run in plan_runs(languages, design_pairs(manifest.get("identity", {})))}
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
    """All statistics of the analysis as one JSON-able dict.

    Statistics of pairs (asymmetry, same script or family, group means) use the measured entries
    only; robustness and friendliness are row and column means over measured and completed
    entries alike (in a partial design, means over the measured entries alone would depend on
    which partners the design chose)."""
    interference, loss = matrix.measured_only(), matrix.loss
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
    if measured_pairs >= 4 and not matrix.completion:  # a partial design reports its own (`leave_one_pair_out`)
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
    if matrix.completion:
        cv, n = matrix.completion["leave_one_pair_out"], len(matrix.languages)
        lines += [
            "## Matrix completion",
            "",
            f"{int(matrix.measured.sum()) - n} of {n * (n - 1)} off-diagonal entries measured; "
            f"the rest completed by {matrix.completion['method']}. "
            f"Expected absolute error of a completed entry: {matrix.completion['expected_abs_error']:.4f}.",
            "",
            markdown_table(
                ["check", "hidden entries", "MAE", "Spearman"],
                [[f"design at k = {v['k']} on a fully measured block of {v['languages']} languages ({v['file']})",
                  v["hidden_entries"], f"{v['mae']:.4f}", f"{v['spearman']:.3f}"]
                 for v in matrix.completion["validation"]]
                + [["this sweep, each measured pair hidden in turn (pessimistic: a 2-partner row loses half)",
                    cv["hidden_entries"], f"{cv['mae']:.4f}", f"{cv['spearman']:.3f}"]]),
            "",
        ]
    elif "completion" in stats:
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


def _completion(matrix: InterferenceMatrix, k: int, validations: list[Path]) -> dict:
    """How a partial design's matrix is completed, and the expected error of a completed entry: the worst MAE
    at this k among the validations on blocks measured in full (`write_validation`'s files), else the
    leave-one-pair-out error of the sweep itself (pessimistic: it takes away half of a 2-partner row)."""
    cv = leave_one_pair_out(matrix.interference, matrix.languages)
    validated = []
    for path in validations:
        report = json.loads(Path(path).read_text())
        score = next((s for s in report["scores"] if s["k"] == k), None)
        if score is None:
            raise ValueError(f"{path} has no score at k = {k}, the design of this sweep")
        validated.append({"file": str(path), "languages": len(report["languages"]), "k": k,
                          "hidden_entries": score["hidden_entries"], "mae": score["mae"],
                          "spearman": score["spearman"]})
    return {
        "method": COMPLETION_METHOD,
        "expected_abs_error": max((v["mae"] for v in validated), default=cv.mae),
        "validation": validated,
        "leave_one_pair_out": {"hidden_entries": cv.hidden_entries, "mae": cv.mae, "spearman": cv.spearman},
    }


def write_analysis(results: str | Path, out: str | Path, holdout_seed: int = 0,
                   embeddings: np.ndarray | None = None, embedding_note: str = "",
                   validations: list[Path] = ()) -> list[Path]:
    """Analyse a results directory; `embeddings` ([n_languages, d], sweep order) adds the cosine proxy;
    `validations` (partial designs) give the completion's expected error."""

    results, out = Path(results), Path(out)
    manifest, records = load_records(results)
    languages = tuple(manifest["identity"]["languages"])
    if not records:
        raise ValueError(f"{results} holds no finished runs yet")
    table = _language_table(languages)
    loss = analysis.loss_matrix(records, languages)
    matrix = InterferenceMatrix.from_loss(languages, loss, _sweep_metadata(results, manifest, records, languages))
    if design_pairs(manifest["identity"]) is not None:  # a partial design: complete what it did not run
        k = manifest["identity"]["design"]["partners_per_language"]
        matrix = matrix.completed(complete(matrix.interference, languages), _completion(matrix, k, validations))
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
    completed = ~matrix.measured[ix] & ~np.isnan(matrix.interference[ix])
    written.append(plots.heatmap(matrix.interference[ix], labels,
                                 "Interference I[A,B] (sorted by family)" + ("; dot = completed, not measured"
                                                                             if completed.any() else ""),
                                 out / "interference_heatmap.png", "RdBu", center=0.0, colorbar_label="I",
                                 completed=completed))
    written.append(plots.heatmap(matrix.loss[ix], labels, "MLM loss L[A,B] (diagonal: monolingual; blank: not run)",
                                 out / "loss_heatmap.png", "viridis_r", colorbar_label="loss"))
    written.append(plots.robustness_friendliness_scatter(
        matrix.robustness, matrix.friendliness, list(languages), [row["script"] for row in table],
        out / "robustness_friendliness.png",
    ))
    blocks = {name: (data["groups"], np.array(data["mean_interference"], dtype=float))
              for name, data in stats["groups"].items() if data["groups"]}
    written.append(plots.group_heatmaps(blocks, out / "group_means.png"))
    return written


def _measured_block(loss: np.ndarray, languages: tuple[str, ...]) -> list[str]:
    """The languages with a monolingual run, checked to have every pair among them measured."""
    block = [code for i, code in enumerate(languages) if not np.isnan(loss[i, i])]
    index = [languages.index(code) for code in block]
    if np.isnan(loss[np.ix_(index, index)]).any():
        raise ValueError(f"{', '.join(block)} are not measured in full (some pairs have no run); "
                         "name a block with --languages")
    return block


def write_validation(results: str | Path, out: str | Path,
                     languages: list[str] | None = None) -> tuple[int, list[Path]]:
    """Validate the partial design on a block of `results` measured in full (matrix/design.py); returns the k of
    the pre-declared rule and the files written (validation.json, validation.md)."""
    results, out = Path(results), Path(out)
    manifest, records = load_records(results)
    swept = tuple(manifest["identity"]["languages"])
    loss = analysis.loss_matrix(records, swept)
    block = tuple(languages or _measured_block(loss, swept))
    unknown = sorted(set(block) - set(swept))
    if unknown:
        raise ValueError(f"{', '.join(unknown)} are not languages of the sweep in {results}")
    index = [swept.index(code) for code in block]
    interference = InterferenceMatrix.from_loss(block, loss[np.ix_(index, index)]).interference
    scores = validate_design(interference, block)
    chosen = choose_k(scores)
    out.mkdir(parents=True, exist_ok=True)
    rule = (f"the smallest k whose completed entries have MAE <= {TARGET_MAE} and Spearman >= {TARGET_SPEARMAN}; "
            f"{MAX_PARTNERS} if none")
    write_json_atomic(out / "validation.json", {
        "results": str(results), "languages": list(block), "rule": rule, "chosen_k": chosen,
        "completion": COMPLETION_METHOD, "scores": [asdict(score) for score in scores],
    })
    table = markdown_table(
        ["k", "runs", "full runs", "hidden entries", "MAE", "Spearman", "MAE of random designs (same runs)",
         "meets targets"],
        [[s.k, s.runs, s.full_runs, s.hidden_entries, f"{s.mae:.4f}", f"{s.spearman:.3f}", f"{s.random_mae:.4f}",
          "yes" if s.meets_targets else "no"] for s in scores])
    (out / "validation.md").write_text(
        f"# Partial design on a block measured in full\n\n{len(block)} languages of `{results}`: "
        f"{', '.join(block)}.\n\nFor each k, the pairs the design would not run are hidden (both directions) and "
        f"completed from the rest; scores are over the hidden entries. Random designs: 20 draws of as many "
        f"pairs, each language in at least one.\n\n{table}\n\nRule (fixed before the table): {rule}. "
        f"**k = {chosen}.**\n")
    return chosen, [out / "validation.json", out / "validation.md"]
