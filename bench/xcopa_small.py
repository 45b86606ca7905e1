"""A small XCOPA benchmark on Gemma 3 270M: baseline vs intervened, alpha cross-fitted on halves.

    python bench/xcopa_small.py [--langs sw,zh] [--items 40] [--json]

For each language: fit two interventions if there are none yet
(bench/fit_xcopa_interventions.py: the first `--pairs` SIB-200 and NTREX pairs,
plus the translated XCOPA items of one half each), then `lingosteer bench xcopa`
on the first `--items` validation items with `--cross-fit 2`: each half is
evaluated with the map fitted without it and the alpha chosen on the other half.
The HF-transformers reference scores a sample.
Prints the table, vLLM items/s and the speed ratio to the HF reference (same
sample, measured in the same run); `--json` prints the report as one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

from lingosteer import DEFAULT_DATA_DIR, REPO_ROOT
from lingosteer.entrypoints.main import main as lingosteer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m", help="prepared model name or HF directory")
    parser.add_argument("--langs", default="sw,zh", help="XCOPA languages (file codes)")
    parser.add_argument("--items", type=int, default=40, help="validation items per language")
    parser.add_argument("--pairs", type=int, default=100, help="SIB-200 and NTREX pairs per intervention fit")
    parser.add_argument("--grid", default="-1,-0.5,0,0.5,1", help="alpha grid")
    parser.add_argument("--reference-sample", type=int, default=10, help="items scored by the HF reference")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--interventions", type=Path, default=None,
                        help="where the fitted interventions are kept, reused when present "
                             "(default interventions/xcopa-<items>items-<model>: the folds depend on --items)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "bench-xcopa-small")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object to stdout")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import fit_xcopa_interventions  # bench/, next to this script

    args = parse_args(argv)
    langs = [code.strip() for code in args.langs.split(",") if code.strip()]
    if args.interventions is None:
        args.interventions = REPO_ROOT / "interventions" / f"xcopa-{args.items}items-{Path(args.model).name}"
    status = fit_xcopa_interventions.main([
        "--model", args.model, "--langs", ",".join(langs), "--sib-pairs", str(args.pairs), "--ntrex-pairs",
        str(args.pairs), "--xcopa-folds", "2", "--xcopa-items", str(args.items), "--data-dir", str(args.data_dir),
        "--out", str(args.interventions)])
    if status:
        return status
    folds = [str(args.interventions / f"fold{k}") for k in range(2)]
    bench = ["bench", "xcopa", "--model", args.model, "--interventions", *folds,
             "--eval", *(str(args.data_dir / "xcopa" / f"val.{code}.jsonl") for code in langs),
             str(args.data_dir / "xcopa" / "train.en.jsonl"),
             "--cross-fit", "2", "--max-items", str(args.items), f"--alpha-grid={args.grid}",
             "--reference", "hf", "--reference-sample", str(args.reference_sample), "--out", str(args.out)]
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        status = lingosteer([*bench, "--json"])
    if status:
        return status
    report = json.loads(captured.getvalue().strip().splitlines()[-1])
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    print((args.out / "report.md").read_text(encoding="utf-8"))
    perf = report["performance"]
    ref = perf["reference"]
    print(f"vLLM (plugin) items/s over the run: {perf['vllm_items_per_s']:.2f}")
    print(f"speed ratio vLLM / HF reference on {ref['items']} items: {ref['speed_ratio']:.1f}x "
          f"(vLLM {ref['vllm_items_per_s']:.2f} items/s, HF {ref['hf_items_per_s']:.2f} items/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
