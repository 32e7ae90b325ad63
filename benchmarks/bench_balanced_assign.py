"""Time `balanced_assign` against `np.argsort(nll, axis=1)` on the same [N, E] matrix.

    python benchmarks/bench_balanced_assign.py [--n 1000000] [--experts 32] [--repeats 7]
                                               [--dtype float32|float64] [--seed 0]

The argsort is the yardstick: sorting every row once is what a straightforward vectorised
implementation would start with, and the target is to stay within 3x of it (and under 0.5 s
at N = 1,000,000, E = 32, float32). Both run on the same matrix in the same process; each is
warmed up once, then timed `--repeats` times. Cases, all seeded:

- random:     i.i.d. uniform scores; every expert is the favourite of about N / E sequences.
- ties:       integers 0..3, so most rows tie and most sequences prefer expert 0.
- correlated: per-sequence difficulty + per-expert skill + small noise; all sequences rank
              the experts alike (like early EM rounds), so experts fill one after another.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from smalltalk.routing import balanced_assign


def make_cases(n: int, n_experts: int, seed: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    difficulty = rng.gamma(4.0, 0.5, size=(n, 1))  # (N, 1)
    skill = np.linspace(0.0, 0.3, n_experts)[None, :]  # (1, E)
    return {
        "random": rng.random((n, n_experts)).astype(dtype),
        "ties": rng.integers(0, 4, size=(n, n_experts)).astype(dtype),
        "correlated": (difficulty + skill + 0.05 * rng.random((n, n_experts))).astype(dtype),
    }


def timings(fn, repeats: int) -> list[float]:
    fn()  # warm-up: page in the inputs, let allocations settle
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="sequences N")
    parser.add_argument("--experts", type=int, default=32, help="experts E")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per function")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cases = make_cases(args.n, args.experts, args.seed, np.dtype(args.dtype))
    print(f"N = {args.n:,}  E = {args.experts}  {args.dtype}  repeats = {args.repeats}")
    header = f"{'case':<11} {'function':<16} {'min ms':>8} {'median ms':>10} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for name, nll in cases.items():
        base = timings(lambda nll=nll: np.argsort(nll, axis=1), args.repeats)
        ours = timings(lambda nll=nll: balanced_assign(nll), args.repeats)
        ratio = f"{min(ours) / min(base):.2f}"
        for label, ts, r in (("argsort(axis=1)", base, ""), ("balanced_assign", ours, ratio)):
            ms_min, ms_med = min(ts) * 1e3, statistics.median(ts) * 1e3
            print(f"{name:<11} {label:<16} {ms_min:8.1f} {ms_med:10.1f} {r:>6}")
        load = np.bincount(balanced_assign(nll), minlength=args.experts)
        print(f"{'':<11} load per expert: min {load.min():,}  max {load.max():,}")
    print("ratio = min(balanced_assign) / min(argsort)")


if __name__ == "__main__":
    main()
