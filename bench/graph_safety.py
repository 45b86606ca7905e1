"""Proof, on CPU, that steering survives compiled graphs, tensor parallelism and common architectures.

1. Graph safety. A CUDA graph replays the kernels it captured on the same buffers; it
   steers correctly only if the steering op's kernels and shapes do not depend on which
   rows are steered, by which language, alpha, layers or positions, and the op reads
   them from persistent buffers (`residual_op.steer_rows`). We trace a tiny random
   decoder (HF transformers) with the op after every layer ONCE, with
   torch.compile(fullgraph=True) (AOTAutograd: one aten graph, Python not re-run), then
   replay that one trace for --steps steps whose mix of languages (a full map, a
   low-rank map, a shift map, and plain rows), alphas, layers and positions changes,
   only by writing new contents into the same buffers. Every step's logits are compared
   with the HF reference (`alignment.hf_steering`, hooks, no lingosteer op), one
   sequence at a time. Recompilations are counted (any would show as a second trace).
   Done for a full bank (the default) and for a low-rank bank.
2. Tensor parallelism: `bench/tensor_parallel.py` (a real vLLM engine at TP=2 against TP=1).
3. Architectures: `bench/architectures.py` (a real vLLM engine per architecture against HF).

Usage: python bench/graph_safety.py [--json] [--steps 50] [--skip tensor_parallel,architectures]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny random models

import tiny_models
from alignment.artifact import load_intervention, save_intervention
from alignment.estimator import LinearAligner
from alignment.hf_steering import hidden_of, layer_hooks, steered, with_hidden
from intervene_engine.bank import BankConfig, DeviceBank
from intervene_engine.residual_op import steer_rows
from intervene_engine.store import read_intervention
from lingosteer import DEFAULT_DATA_DIR
from lingosteer.fingerprint import model_fingerprint

ARCH = "qwen2"  # 3 layers, biases on q/k/v
BATCH, SEQ = 4, 12  # sequences per step, tokens each (a captured graph has one fixed size)
MAPS = {"swh_Latn": ("lstsq", None), "yor_Latn": ("lstsq", 4), "tha_Thai": ("meanshift", None)}  # full, rank 4, shift
# aten ops whose output shape (or a host value) depends on tensor contents.
DATA_DEPENDENT_OPS = {"nonzero", "masked_select", "_local_scalar_dense", "item", "_unique", "_unique2", "unique_dim",
                      "unique_consecutive", "repeat_interleave"}
TOLERANCE = 1e-4  # fp32 logits; measured max differences are ~1e-6 (docs/gpu-plan.md)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="replayed steps per bank")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="shared data (tiny tokenizers)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: tensor_parallel, architectures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    return parser.parse_args(argv)


def planted_map(model_dir: Path, out_dir: Path, source: str, solver: str, rank: int | None, seed: int) -> Path:
    """An artifact on every layer, fitted exactly to a random perturbation of the identity."""
    fingerprint = model_fingerprint(model_dir)
    layers, dim = fingerprint["num_hidden_layers"], fingerprint["hidden_size"]
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((layers, 4 * dim, dim))
    Y = X @ (np.eye(dim) + 0.5 * rng.standard_normal((dim, dim)) / np.sqrt(dim)) + 0.1 * rng.standard_normal(dim)
    aligner = LinearAligner(solver=solver, bias=True, rank=rank).fit(X, Y)
    return save_intervention(out_dir / source, aligner, fingerprint=fingerprint, source=source, target="eng_Latn",
                             layers=list(range(layers)), pooling="mean", fit_data={"planted": True}, overwrite=True)


def random_step(rng: np.random.Generator, languages: list[str], num_layers: int) -> list[dict | None]:
    """Per sequence: None (plain) or a language with its alpha, layers and steered positions."""
    step = []
    for _ in range(BATCH):
        choice = rng.integers(len(languages) + 1)
        if choice == len(languages):
            step.append(None)
            continue
        layers = sorted(rng.choice(num_layers, size=rng.integers(1, num_layers + 1), replace=False).tolist())
        mode = rng.choice(["last", "prompt", "span"])
        positions = {"last": [SEQ - 1], "prompt": list(range(1, SEQ))}.get(mode)
        if positions is None:
            start = int(rng.integers(1, SEQ - 1))
            positions = list(range(start, int(rng.integers(start + 1, SEQ + 1))))
        alpha = float(rng.choice([-1, 1]) * rng.uniform(0.2, 1.5))
        step.append({"language": languages[choice], "alpha": alpha, "layers": layers, "positions": positions})
    return step


def replay_check(model_dir: Path, work_dir: Path, max_map_rank: int | None, steps: int, seed: int) -> dict:
    """Trace once, replay `steps` changing steps, compare each with the HF reference."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = model.config
    num_layers, dim = config.num_hidden_layers, config.hidden_size
    fingerprint = model_fingerprint(model_dir)
    maps = {language: planted_map(model_dir, work_dir, language, solver, rank, seed + i)
            for i, (language, (solver, rank)) in enumerate(MAPS.items())}
    if max_map_rank is not None:  # a low-rank bank cannot hold the full map
        maps.pop("swh_Latn")
    loaded = {language: read_intervention(path, fingerprint, num_layers, torch.float32)
              for language, path in maps.items()}
    bank = DeviceBank(BankConfig(max_languages=len(loaded), max_map_rank=max_map_rank,
                                 max_cpu_languages=len(loaded)), num_layers, dim, torch.float32, torch.device("cpu"))
    slot_of, _ = bank.assign({i.version: i.compact for i in loaded.values()}, set())
    rows = BATCH * SEQ
    slot = torch.zeros(rows, dtype=torch.int64)  # the persistent buffers: written in place every step
    alpha = torch.zeros(rows, num_layers)

    def steer_after(layer: int):
        def hook(module, inputs, output):
            stream = hidden_of(output)
            hidden = stream.reshape(rows, dim).clone()
            residual = torch.zeros_like(hidden)  # vLLM's split: stream = hidden + residual
            steer_rows(hidden, residual, slot, alpha[:, layer], bank.down[layer],
                       None if bank.up is None else bank.up[layer], bank.bias[layer], bank.slot_ids)
            return with_hidden(output, (hidden + residual).view_as(stream))

        return hook

    traces, aten_graphs = [], []

    def count_traces(graph, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        traces.append(graph)
        return aot_autograd(fw_compiler=lambda aten_graph, _: aten_graphs.append(aten_graph) or aten_graph)(
            graph, example_inputs)

    def forward(input_ids):
        return model(input_ids=input_ids, use_cache=False).logits

    compiled = torch.compile(forward, fullgraph=True, dynamic=False, backend=count_traces)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    input_ids = torch.from_numpy(rng.integers(4, config.vocab_size, size=(BATCH, SEQ)))
    input_ids[:, 0] = tiny_models.BOS_ID
    references = {language: load_intervention(path) for language, path in maps.items()}
    max_diff, steered_rows, started = 0.0, 0, time.perf_counter()
    with torch.no_grad(), layer_hooks(model, range(num_layers), steer_after):
        for _ in range(steps):
            step = random_step(rng, list(maps), num_layers)
            slot.zero_()
            alpha.zero_()
            for b, choice in enumerate(step):
                if choice is not None:
                    row_ids = torch.tensor(choice["positions"]) + b * SEQ
                    slot[row_ids] = slot_of[loaded[choice["language"]].version]
                    alpha[row_ids.unsqueeze(1), torch.tensor(choice["layers"])] = choice["alpha"]
                    steered_rows += len(row_ids)
            logits = compiled(input_ids)
            for b, choice in enumerate(step):
                expected = hf_logits(reference, input_ids[b], choice, references)
                max_diff = max(max_diff, float((logits[b] - expected).abs().max()))
    return {"steps": steps, "traces": len(traces), "recompilations": len(traces) - 1, "max_abs_diff_hf": max_diff,
            "tolerance": TOLERANCE, **shape_report(aten_graphs), "steered_rows": steered_rows, "rows_per_step": rows,
            "bank": {"slots": len(loaded), "max_map_rank": max_map_rank or "full",
                     "maps": {language: loaded[language].form for language in loaded}},
            "seconds": round(time.perf_counter() - started, 1)}


def shape_report(aten_graphs: list) -> dict:
    """What a CUDA graph capture needs of the trace: every tensor's shape a constant, and no op whose output
    shape depends on data (nonzero, masked_select, .item(), ...)."""
    dynamic_ops, symbolic = set(), 0
    for graph in aten_graphs:
        for node in graph.graph.nodes:
            if node.op != "call_function":
                continue
            packet = getattr(node.target, "_overloadpacket", None)  # aten ops only
            if packet is not None and packet.__name__ in DATA_DEPENDENT_OPS:
                dynamic_ops.add(str(node.target))
            values = node.meta.get("val")
            for value in values if isinstance(values, (list, tuple)) else [values]:
                if isinstance(value, torch.Tensor) and not all(isinstance(size, int) for size in value.shape):
                    symbolic += 1
    return {"data_dependent_ops": sorted(dynamic_ops), "static_shapes": symbolic == 0}


def hf_logits(model, input_ids: torch.Tensor, choice: dict | None, references: dict) -> torch.Tensor:
    """One sequence through the HF reference (`model` carries no lingosteer hook)."""
    if choice is None:
        return model(input_ids=input_ids[None], use_cache=False).logits[0]
    positions = torch.zeros(1, SEQ, dtype=torch.bool)
    positions[0, choice["positions"]] = True
    with steered(model, references[choice["language"]], positions, choice["alpha"], choice["layers"]):
        return model(input_ids=input_ids[None], use_cache=False).logits[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    skip = {part for part in args.skip.split(",") if part}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = tiny_models.cached_tiny_model(ARCH, work / "models", dtype="float32", data_dir=args.data)
        full = replay_check(model_dir, work / "full", None, args.steps, args.seed)
        lowrank = replay_check(model_dir, work / "lowrank", 8, args.steps, args.seed + 1)
        result = {
            "model": f"tiny random {ARCH} (fp32)",
            **{key: full[key] for key in ("steps", "traces", "recompilations", "max_abs_diff_hf", "tolerance",
                                          "static_shapes", "data_dependent_ops")},
            "full_bank": full,
            "lowrank_bank": lowrank,
        }
        if "tensor_parallel" not in skip:
            from tensor_parallel import check_tensor_parallel  # local: bench/ sibling, starts vLLM engines

            result["tensor_parallel"] = check_tensor_parallel(model_dir, work / "tp")
        if "architectures" not in skip:
            from architectures import check_architecture  # local: bench/ sibling, starts engines

            result["architectures"] = {arch: check_architecture(arch, work / "arch", args.data)
                                       for arch in tiny_models.ARCHITECTURES}
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["passed"] = passed(result)
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


def passed(result: dict) -> bool:
    """One trace per bank over every step, no recompilation, every output within tolerance of its reference."""
    banks_ok = all(bank["traces"] == 1 and bank["recompilations"] == 0 and bank["static_shapes"]
                   and not bank["data_dependent_ops"] and bank["max_abs_diff_hf"] <= bank["tolerance"]
                   for bank in (result["full_bank"], result["lowrank_bank"]))
    tp = result.get("tensor_parallel")
    tp_ok = tp is None or (tp["tokens_identical"] and tp["max_abs_diff_tp1"] <= tp["tolerance"])
    archs_ok = all(arch["plain_identical"] and arch["steered_max_abs_diff"] <= arch["tolerance"]
                   for arch in result.get("architectures", {}).values())
    return banks_ok and tp_ok and archs_ok


if __name__ == "__main__":
    sys.exit(main())
