"""How much of an interference value is seed noise? Retrain one monolingual model and one
pair of a sweep config with several seeds and print I[A,B] per seed.

    python bench/sweep_seed_noise.py --config configs/sweep/cpu12.yaml --pair eng_Latn fra_Latn --seeds 0 1 2

Compare the spread with the differences the analysis reports (e.g. same-script vs
other pairs): a difference smaller than the seed spread of single entries can only
show up in averages over many pairs.
"""

import argparse
import statistics
import time

import torch

from matrix.sweep import load_sweep_config
from training.corpus import build_corpus
from training.train import train_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--pair", nargs=2, required=True, metavar=("A", "B"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_sweep_config(args.config)
    training = config.training
    corpus = build_corpus(config.languages, training.max_length, training.vocab_limit, config.tokenizer,
                          config.data_dir)
    a, b = args.pair
    values = []
    for seed in args.seeds:
        started = time.perf_counter()
        mono = train_run((a,), training, corpus, seed)[0].loss[a]
        pair = train_run((a, b), training, corpus, seed)[0].loss[a]
        values.append((mono - pair) / mono)
        print(f"seed {seed}: L[{a}] = {mono:.4f}, L[{a},{b}] = {pair:.4f}, I = {values[-1]:+.4f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    if len(values) > 1:
        print(f"I[{a},{b}] over {len(values)} seeds: mean {statistics.mean(values):+.4f}, "
              f"std {statistics.stdev(values):.4f}, range {max(values) - min(values):.4f}")


if __name__ == "__main__":
    main()
