"""lm-eval's own XCOPA and XNLI on the real model three ways, on the same items: do the numbers agree?

    flock /tmp/heavy.lock .venv/bin/python bench/lmeval_parity.py [--limit 100] [--xnli-limit 200] [--json]

Paths, each plain and steered, run one after another (one engine at a time):

  server   `lingosteer serve` (float32, eager), lm-eval's `local-completions` against it, the plain
           model name BASE and the steered one BASE:LANG (lm-eval's `simple_evaluate`, in this process)
  wrapper  `lingosteer lm-eval --model lingosteer --local-data DATA`, language=none and language=auto
  bench    `lingosteer bench xcopa|xnli` at the artifact's serving defaults (plain and steered in one run)

Every lm-eval run scores lm-eval's own xcopa_<iso> and xnli_<iso> (prompts, choices, metric) on the
local files (`evaluation.lmeval_tasks`), their first --limit / --xnli-limit items; bench scores the same
items of the same files. bench's XCOPA prompts are lm-eval's string for string
(tests/test_lmeval_prompts.py), so its log-likelihoods are compared option by option; its XNLI uses
lm-eval's words but splits the text as context "premise, question?" and options " word, hypothesis",
where lm-eval's task scores the whole text as the continuation of an empty context, so there only
accuracies are put side by side.

Steering on the server path comes from the model name: what the artifact's serving defaults say. The
shipped Gemma 3 270M Swahili artifact serves alpha 0 (its calibration kept steering off), and an echo
request cannot be steered at positions "last" or "prompt" the way bench steers them (the server answers
400: docs/server.md), so the script serves a copy of the artifact, in a directory of its own under
--out, whose serving defaults it sets (alpha --alpha, positions "all", the artifact's serving layers)
with `alignment.artifact.set_serving_defaults`; its evidence says so. All three paths load that copy.

Prints the accuracies per path, the largest |difference| of per-option log-likelihoods between paths,
and the wall time of each path (engine start-up included); --out gets result.json (what --json prints),
the server's log and every run's lm-eval / bench output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from datetime import date
from pathlib import Path

from alignment.artifact import Evidence, ServingDefaults, load_intervention, set_serving_defaults
from evaluation.lmeval_tasks import write_local_tasks
from evaluation.runner import find_interventions
from lingosteer import DEFAULT_DATA_DIR, REPO_ROOT
from lingosteer.entrypoints.demo import free_port, lingosteer
from lingosteer.languages import normalize_code
from lingosteer.models import resolve_model

BENCHMARKS = ("xcopa", "xnli")
DATA_FILES = {"xcopa": "xcopa/val.{lang}.jsonl", "xnli": "xnli/dev.{lang}.tsv"}
CONDITIONS = ("plain", "steered")
ENGINE_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024"]
MAX_MODEL_LEN = 1024


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m", help="prepared model name or HF model directory")
    parser.add_argument("--interventions", type=Path, default=REPO_ROOT / "interventions" / "gemma-3-270m",
                        help="interventions root holding the language's artifact")
    parser.add_argument("--language", default="sw", help="ISO code of the tasks' language (xcopa_<iso>, xnli_<iso>)")
    parser.add_argument("--alpha", type=float, default=0.5, help="serving alpha of the steered copy")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="data directory")
    parser.add_argument("--limit", type=int, default=100, help="XCOPA items (the file's first)")
    parser.add_argument("--xnli-limit", type=int, default=200, help="XNLI items (the file's first)")
    parser.add_argument("--concurrent", type=int, default=4, help="local-completions requests in flight")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "lmeval-parity")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object to stdout")
    return parser.parse_args(argv)


def steered_copy(source: Path, root: Path, alpha: float) -> ServingDefaults:
    """Copy the artifact `source` into `root` and set the copy's serving defaults to `alpha` at every token
    (positions "all") on the artifact's serving layers; the evidence records that nothing calibrated them."""
    original = load_intervention(source)
    target = root / source.name
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(source, target)
    serving = ServingDefaults(alpha=alpha, layers=original.serving.layers, positions="all")
    note = (f"set by bench/lmeval_parity.py to compare evaluation paths ({serving.describe()}), not calibrated; "
            f"the artifact it copies ({source}) serves {original.serving.describe()}")
    calibration = original.evidence.model_dump() if original.evidence else dict(
        file=str(source), items=0, plain_accuracy=0.0, cross_validated_accuracy=0.0, delta=0.0,
        candidate_accuracy={}, engine={})
    # task "lmeval-parity": no benchmark's items chose these defaults, so bench reports them on any item
    evidence = Evidence(**{**calibration, "task": "lmeval-parity", "adopted": False, "rule": note, "summary": note,
                           "decision": note, "date": date.today().isoformat()})
    set_serving_defaults(target, serving, evidence)
    print(f"steered copy: {target} serves {serving.describe()} (the original: {original.serving.describe()})",
          flush=True)
    return serving


def start_server(model_dir: Path, served: str, root: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = ["serve", str(model_dir), "--served-model-name", served, "--interventions", str(root),
            "--host", "127.0.0.1", "--port", str(port), *ENGINE_FLAGS]
    print("$ lingosteer " + " ".join(args) + f"   (log: {log})", flush=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    server = subprocess.Popen([sys.executable, "-m", "lingosteer.entrypoints.main", *args], env=env,
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    while True:
        if server.poll() is not None:
            raise SystemExit(f"lmeval_parity: the server exited with code {server.returncode}:\n"
                             f"{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return server, base_url
        except OSError:
            time.sleep(5)


def applied(base_url: str, model: str, prompt: str) -> dict:
    """What the server applies to a completion for `model` (its `lingosteer` field)."""
    request = urllib.request.Request(f"{base_url}/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": model, "prompt": prompt, "max_tokens": 1}).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["lingosteer"]


def samples_arg(tasks: dict[str, int]) -> dict[str, list[int]]:
    """lm-eval's `samples`: each task's first items (one count per task, which `limit` cannot give)."""
    return {task: list(range(n)) for task, n in tasks.items()}


def per_option(samples) -> dict[tuple[int, int], float]:
    """(doc id, option) -> log-likelihood, from lm-eval's logged samples (in memory or read back from JSON)."""
    return {(int(sample["doc_id"]), i): float(response[0][0])
            for sample in samples for i, response in enumerate(sample["resps"])}


def read_samples(out_dir: Path, task: str) -> list[dict]:
    [path] = out_dir.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_accuracy(out_dir: Path, task: str) -> float:
    [path] = out_dir.rglob("results_*.json")
    return json.loads(path.read_text(encoding="utf-8"))["results"][task]["acc,none"]


def max_abs_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise SystemExit(f"lmeval_parity: the paths scored different requests ({len(a)} against {len(b)})")
    return max(abs(a[key] - b[key]) for key in a)


def server_path(args, model_dir: Path, root: Path, tasks_dir: Path, tasks: dict[str, int], language: str) -> dict:
    """lm-eval's local-completions against one `lingosteer serve`: the plain and the steered model name."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    served = Path(args.model).name
    started = time.perf_counter()
    server, base_url = start_server(model_dir, served, root, args.out / "server.log")
    result = {"start_seconds": time.perf_counter() - started}
    try:
        names = {"plain": served, "steered": f"{served}:{language}"}
        result["applied"] = {condition: applied(base_url, name, "Habari ya leo?") for condition, name in names.items()}
        print(f"applied: {json.dumps(result['applied'])}", flush=True)
        manager = TaskManager(include_path=str(tasks_dir))
        for condition, name in names.items():
            model_args = dict(model=name, base_url=f"{base_url}/v1/completions", tokenizer=str(model_dir),
                              tokenizer_backend="huggingface", num_concurrent=args.concurrent, max_retries=1)
            print(f"lm-eval local-completions, model {name}", flush=True)
            started = time.perf_counter()
            out = simple_evaluate(model="local-completions", model_args=model_args, tasks=list(tasks),
                                  samples=samples_arg(tasks), task_manager=manager, log_samples=True)
            result[condition] = {"seconds": time.perf_counter() - started,
                                 "accuracy": {task: out["results"][task]["acc,none"] for task in tasks},
                                 "loglikelihoods": {task: per_option(out["samples"][task]) for task in tasks}}
    finally:
        server.terminate()
        server.wait(timeout=120)
    return result


def wrapper_path(args, model_dir: Path, root: Path, tasks: dict[str, int]) -> dict:
    """`lingosteer lm-eval --model lingosteer`, plain (language=none) and steered (language=auto)."""
    result = {}
    for condition, language in (("plain", "none"), ("steered", "auto")):
        out_dir = args.out / f"wrapper-{condition}"
        shutil.rmtree(out_dir, ignore_errors=True)
        started = time.perf_counter()
        lingosteer("lm-eval", "--local-data", str(args.data), "--model", "lingosteer", "--model_args",
                   f"pretrained={model_dir},interventions={root},language={language},enforce_eager=True,"
                   f"max_model_len={MAX_MODEL_LEN}", "--tasks", ",".join(tasks), "--samples",
                   json.dumps(samples_arg(tasks)), "--log_samples", "--output_path", str(out_dir),
                   capture=True, log=args.out / f"wrapper-{condition}.log")
        result[condition] = {"seconds": time.perf_counter() - started,
                             "accuracy": {task: read_accuracy(out_dir, task) for task in tasks},
                             "loglikelihoods": {task: per_option(read_samples(out_dir, task)) for task in tasks}}
    return result


def bench_path(args, model_dir: Path, root: Path, files: dict[str, Path], limits: dict[str, int]) -> dict:
    """`lingosteer bench` per benchmark at the serving defaults: plain and steered scores of every item."""
    result = {"seconds": 0.0, "plain": {"accuracy": {}, "loglikelihoods": {}},
              "steered": {"accuracy": {}, "loglikelihoods": {}}}
    for benchmark, path in files.items():
        out_dir = args.out / f"bench-{benchmark}"
        shutil.rmtree(out_dir, ignore_errors=True)
        started = time.perf_counter()
        lingosteer("bench", benchmark, "--model", str(model_dir), "--interventions", str(root), "--eval", str(path),
                   "--max-items", str(limits[benchmark]), "--out", str(out_dir), capture=True,
                   log=args.out / f"bench-{benchmark}.log")
        result["seconds"] += time.perf_counter() - started
        items = [json.loads(line) for line in (out_dir / "items.jsonl").read_text(encoding="utf-8").splitlines()]
        task = f"{benchmark}_{args.language}"
        for condition, prefix in (("plain", "baseline"), ("steered", "intervened")):
            result[condition]["accuracy"][task] = sum(item[f"{prefix}_correct"] for item in items) / len(items)
            result[condition]["loglikelihoods"][task] = {(item["index"], i): score for item in items
                                                         for i, score in enumerate(item[f"{prefix}_scores"])}
    return result


def compare(paths: dict, tasks: dict[str, int]) -> dict:
    """Accuracies per path, and the largest |log-likelihood difference| of each pair of paths that split the
    text alike (bench's XNLI does not: see the module notes)."""
    comparable = {"server_vs_wrapper": ("server", "wrapper", tuple(tasks)),
                  "server_vs_bench": ("server", "bench", tuple(task for task in tasks if task.startswith("xcopa")))}
    return {
        "accuracy": {path: {condition: paths[path][condition]["accuracy"] for condition in CONDITIONS}
                     for path in paths},
        "max_abs_loglik_diff": {
            pair: {condition: {task: max_abs_diff(paths[a][condition]["loglikelihoods"][task],
                                                  paths[b][condition]["loglikelihoods"][task]) for task in shared}
                   for condition in CONDITIONS}
            for pair, (a, b, shared) in comparable.items()},
        "seconds": {"server_start": paths["server"]["start_seconds"],
                    **{f"server_{condition}": paths["server"][condition]["seconds"] for condition in CONDITIONS},
                    **{f"wrapper_{condition}": paths["wrapper"][condition]["seconds"] for condition in CONDITIONS},
                    "bench": paths["bench"]["seconds"]},
    }


def markdown(result: dict) -> str:
    items = ", ".join(f"{task} ({n} items)" for task, n in result["items"].items())
    lines = [f"lm-eval parity on {result['model']}: {items}", f"steered: {result['steered']}", "",
             "accuracy (plain / steered)"]
    for path, conditions in result["accuracy"].items():
        cells = [f"{task} {conditions['plain'][task]:.3f} / {conditions['steered'][task]:.3f}"
                 for task in conditions["plain"]]
        lines.append(f"  {path:8s} " + "   ".join(cells))
    lines.append("max |log-likelihood difference| per option (plain / steered)")
    for pair, conditions in result["max_abs_loglik_diff"].items():
        cells = [f"{task} {conditions['plain'][task]:.2e} / {conditions['steered'][task]:.2e}"
                 for task in conditions["plain"]]
        lines.append(f"  {pair:18s} " + "   ".join(cells))
    lines.append("wall seconds: " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in result["seconds"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    # With --json, stdout is the one JSON object: what the steps print goes to stderr.
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        result = run(args)
    print(json.dumps(result) if args.json else markdown(result))
    return 0


def run(args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model)
    language = normalize_code(args.language)
    files = {benchmark: args.data / DATA_FILES[benchmark].format(lang=args.language) for benchmark in BENCHMARKS}
    limits = {"xcopa": args.limit, "xnli": args.xnli_limit}
    tasks = {f"{benchmark}_{args.language}": limits[benchmark] for benchmark in BENCHMARKS}
    tasks_dir = args.out / "tasks"
    write_local_tasks(args.data, tasks_dir)
    [source] = find_interventions(args.interventions, [language], model_dir).values()
    root = args.out / "interventions"
    serving = steered_copy(source, root, args.alpha)

    paths = {"server": server_path(args, model_dir, root, tasks_dir, tasks, language),
             "wrapper": wrapper_path(args, model_dir, root, tasks),
             "bench": bench_path(args, model_dir, root, files, limits)}
    result = {"model": str(model_dir), "items": tasks, "source_artifact": str(source),
              "steered": f"{language} {serving.describe()} (a copy of the source artifact)",
              "applied": paths["server"]["applied"], **compare(paths, tasks),
              "notes": ["bench's XNLI splits the text differently from lm-eval's xnli task: accuracies only",
                        "seconds include each path's engine start-up (the server's is server_start)"]}
    (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    sys.exit(main())
