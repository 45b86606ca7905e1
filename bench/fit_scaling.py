"""Fit time and peak memory of the alignment fit vs the number of sentence pairs.

    python bench/fit_scaling.py --model gemma-3-270m --sizes 200,500,1000,2000

Hidden states are extracted once for the largest size (timed separately, as
cumulative time after each chunk), then each size is fitted several times,
sizes interleaved in a rotating order, medians reported:
- streaming: `LinearAligner` (ridge, lambda per layer on held-out pairs) fed in
  chunks through `partial_fit`, then `solve`; split into accumulate and solve time;
- INCLINE: `numpy.linalg.lstsq` on the full [n, d] arrays of every layer, as the
  authors' code does.
Peak memory is tracemalloc's peak during the fit (numpy allocations are traced),
not counting the already extracted states both methods read. "states held" is
what each method needs resident besides that (computed from array sizes, not
measured): INCLINE needs every pair's states of all layers at once, streaming
only one chunk's.
2000 pairs need more than SIB-200's 1004 sentences: SIB-200 (all splits) then NTREX-128.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc

import numpy as np

from alignment.estimator import LinearAligner
from alignment.hidden_states import extract_hidden_states, load_model_and_tokenizer
from lingosteer.data import parallel_ntrex, parallel_sib200
from lingosteer.files import atomic_path
from lingosteer.markdown import markdown_table
from lingosteer.models import resolve_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m", help="prepared model name or HF directory")
    parser.add_argument("--source", default="swh_Latn")
    parser.add_argument("--target", default="eng_Latn")
    parser.add_argument("--data-dir", default=None, help="data root (default lingosteer.DEFAULT_DATA_DIR)")
    parser.add_argument("--sizes", default="200,500,1000,2000", help="comma-separated pair counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=100, help="pairs per extraction chunk and partial_fit call")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--states-cache", default=None,
                        help="npz file: reuse extracted states (and their extraction times) if it exists, "
                             "else write it")
    return parser.parse_args(argv)


def load_pairs(source: str, target: str, count: int, data_dir) -> list[tuple[str, str]]:

    pairs = parallel_sib200(source, target, ("train", "dev", "test"), data_dir)
    if len(pairs) < count:
        pairs += parallel_ntrex(source, target, data_dir)
    if len(pairs) < count:
        raise ValueError(f"only {len(pairs)} {source}-{target} pairs in SIB-200 + NTREX-128, {count} asked")
    return pairs[:count]


def extract(model_name, pairs, chunk_size, batch_size):
    """States [L, n, d] for sources and targets, and cumulative extraction seconds after each chunk."""

    model, tokenizer = load_model_and_tokenizer(resolve_model(model_name))
    src_parts, tgt_parts, elapsed = [], [], {}
    start = time.perf_counter()
    for first in range(0, len(pairs), chunk_size):
        chunk = pairs[first : first + chunk_size]
        for parts, side in ((src_parts, 0), (tgt_parts, 1)):
            parts.append(extract_hidden_states(model, tokenizer, [p[side] for p in chunk],
                                               batch_size=batch_size, progress=False))
        elapsed[first + len(chunk)] = time.perf_counter() - start
        print(f"  extracted {first + len(chunk)}/{len(pairs)} pairs, {elapsed[first + len(chunk)]:.0f} s",
              file=sys.stderr, flush=True)
    return np.concatenate(src_parts, axis=1), np.concatenate(tgt_parts, axis=1), elapsed


def cached_extract(args, pairs):
    """`extract`, or its saved result when --states-cache names a file written for the same inputs."""
    from pathlib import Path

    key = f"{args.model}|{args.source}|{args.target}|{len(pairs)}|{args.chunk_size}"
    cache = Path(args.states_cache) if args.states_cache else None
    if cache and cache.is_file():
        with np.load(cache, allow_pickle=False) as saved:
            if str(saved["key"]) == key:
                print(f"reusing states from {cache}", file=sys.stderr)
                return saved["X"], saved["Y"], dict(zip(saved["counts"].tolist(), saved["seconds"].tolist()))
    X, Y, seconds = extract(args.model, pairs, args.chunk_size, args.batch_size)
    if cache:
        with atomic_path(cache, suffix=".npz") as tmp:
            np.savez(tmp, key=key, X=X, Y=Y, counts=np.array(list(seconds)), seconds=np.array(list(seconds.values())))
    return X, Y, seconds


def fit_streaming(X, Y, n, chunk_size):

    tracemalloc.start()
    start = time.perf_counter()
    aligner = LinearAligner()
    for first in range(0, n, chunk_size):
        last = min(first + chunk_size, n)
        aligner.partial_fit(X[:, first:last], Y[:, first:last])
    accumulated = time.perf_counter()
    aligner.solve()
    done = time.perf_counter()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"accumulate": accumulated - start, "solve": done - accumulated, "total": done - start, "peak": peak}


def fit_incline(X, Y, n):
    tracemalloc.start()
    start = time.perf_counter()
    for layer in range(X.shape[0]):
        np.linalg.lstsq(X[layer, :n], Y[layer, :n], rcond=None)
    done = time.perf_counter()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"total": done - start, "peak": peak}


def main(argv=None) -> int:

    args = parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if any(s % args.chunk_size for s in sizes):
        raise ValueError(f"sizes must be multiples of --chunk-size {args.chunk_size}")
    pairs = load_pairs(args.source, args.target, max(sizes), args.data_dir)
    print(f"extracting hidden states of {len(pairs)} {args.source}-{args.target} pairs with {args.model}",
          file=sys.stderr, flush=True)
    X, Y, extract_seconds = cached_extract(args, pairs)
    num_layers, _, dim = X.shape

    runs = {n: {"streaming": [], "incline": []} for n in sizes}
    for repeat in range(args.repeats):
        order = sizes[repeat % len(sizes):] + sizes[: repeat % len(sizes)]  # rotate: no size always first
        for n in order:
            runs[n]["streaming"].append(fit_streaming(X, Y, n, args.chunk_size))
            runs[n]["incline"].append(fit_incline(X, Y, n))
            print(f"  repeat {repeat + 1}/{args.repeats}, n={n} done", file=sys.stderr, flush=True)

    def med(n, method, key):
        return statistics.median(run[key] for run in runs[n][method])

    mib = 2**20
    print(f"\nFit scaling: {args.model}, {args.source} -> {args.target}, {num_layers} layers, d={dim}, "
          f"chunk {args.chunk_size}, medians of {args.repeats} interleaved repeats")
    pair_bytes = 2 * num_layers * dim * X.itemsize  # source + target states of one pair
    print(markdown_table(
        ["pairs", "extract s", "stream accumulate s", "stream solve s", "stream fit s", "stream peak MiB",
         "stream states held MiB", "INCLINE lstsq s", "INCLINE peak MiB", "INCLINE states held MiB"],
        [[n, f"{extract_seconds[n]:.1f}", f"{med(n, 'streaming', 'accumulate'):.2f}",
          f"{med(n, 'streaming', 'solve'):.2f}", f"{med(n, 'streaming', 'total'):.2f}",
          f"{med(n, 'streaming', 'peak') / mib:.1f}", f"{min(n, args.chunk_size) * pair_bytes / mib:.1f}",
          f"{med(n, 'incline', 'total'):.2f}", f"{med(n, 'incline', 'peak') / mib:.1f}", f"{n * pair_bytes / mib:.1f}"]
         for n in sizes],
        right_aligned=True))
    base = sizes[0]
    print(f"\nRatios vs {base} pairs (1.00 = flat):")
    print(markdown_table(
        ["pairs", "extract", "stream fit time", "stream peak memory", "INCLINE time", "INCLINE peak memory"],
        [[n, f"{extract_seconds[n] / extract_seconds[base]:.2f}",
          f"{med(n, 'streaming', 'total') / med(base, 'streaming', 'total'):.2f}",
          f"{med(n, 'streaming', 'peak') / med(base, 'streaming', 'peak'):.2f}",
          f"{med(n, 'incline', 'total') / med(base, 'incline', 'total'):.2f}",
          f"{med(n, 'incline', 'peak') / med(base, 'incline', 'peak'):.2f}"] for n in sizes],
        right_aligned=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
