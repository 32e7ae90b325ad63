"""Confidence intervals for mixture-vs-dense comparisons, and the words that report them.

A perplexity ratio a/b over a test set is exp((ΣNLL_a − ΣNLL_b) / Σtokens), summed over test
sequences. Its 95 % interval comes from a paired bootstrap: the test sequences are resampled with
replacement, the same resample for both models (they scored the same sequences, so their errors
are correlated and the pairing narrows the interval), and the interval is the 2.5th-97.5th
percentile of the resampled ratios (Efron & Tibshirani 1993, ch. 13). Across training seeds of
one recipe the interval is a Student t interval on the seeds' ratios. A ratio whose interval
contains 1 is reported as no difference (`verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

RESAMPLES = 2000  # bootstrap resamples B
CONFIDENCE = 0.95
SEED = 0
CHUNK_ELEMENTS = 1 << 22  # resampled indices held at once (16 MiB), whatever N is
MIN_SEEDS = 3  # fewer seeds give no verdict over seeds


class RatioCI(NamedTuple):
    ratio: float
    low: float
    high: float


def bootstrap_ratio(
    nll_a: np.ndarray,
    nll_b: np.ndarray,
    n_tokens: np.ndarray,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
) -> list[RatioCI]:
    """Perplexity ratios a/b with paired-bootstrap percentile intervals.

    nll_a (N,) or (N, K): summed NLL per test sequence of K models a (say the routed mixture and
    the top-k ensemble); nll_b (N,): the same sequences under the baseline b; n_tokens (N,):
    tokens scored per sequence. Returns one `RatioCI` per column of nll_a; all K share each
    resample. The same inputs and seed give the same numbers, bit for bit (no BLAS, no threads).
    """
    nll_a = np.asarray(nll_a, dtype=np.float64)
    columns = nll_a[:, None] if nll_a.ndim == 1 else nll_a  # (N, K)
    nll_b = np.asarray(nll_b, dtype=np.float64)
    n_tokens = np.asarray(n_tokens, dtype=np.float64)
    if not len(columns) == len(nll_b) == len(n_tokens):
        raise ValueError(
            f"bootstrap_ratio: nll_a, nll_b and n_tokens must have one row per sequence, got "
            f"{len(columns)}, {len(nll_b)}, {len(n_tokens)}"
        )
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(
            f"bootstrap_ratio: need 0 < confidence < 1 and resamples >= 1, "
            f"got {confidence}, {resamples}"
        )
    if len(columns) == 0 or n_tokens.sum() <= 0:
        return [RatioCI(math.nan, math.nan, math.nan)] * columns.shape[1]
    # Differences per sequence before summing: sums of large NLLs would cancel digits.
    differences = columns - nll_b[:, None]  # (N, K)
    if (n_tokens == n_tokens[0]).all():  # the usual case: every resample holds N * n tokens
        sums = _resampled_sums(differences, resamples, seed)  # (B, K)
        tokens = len(n_tokens) * n_tokens[0]
    else:
        sums = _resampled_sums(np.column_stack([differences, n_tokens]), resamples, seed)
        sums, tokens = sums[:, :-1], sums[:, -1:]  # (B, K), (B, 1)
    ratios = np.exp(sums / tokens)  # (B, K)
    tail = (1 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail], axis=0)  # (K,) each
    # Each column summed on its own, as in the resamples: the same numbers whatever K is.
    point = np.exp([column.sum() / n_tokens.sum() for column in differences.T])  # (K,)
    return [RatioCI(*map(float, row)) for row in zip(point, low, high, strict=True)]


def _resampled_sums(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Column sums of values (N, C) over `resamples` draws of N rows with replacement: (B, C).
    Drawn in chunks of resamples, so memory stays at CHUNK_ELEMENTS indices (or one resample)."""
    n = len(values)
    rng = np.random.default_rng(seed)
    per_chunk = max(1, CHUNK_ELEMENTS // n)
    columns = np.ascontiguousarray(values.T)  # (C, N): one contiguous gather per column
    sums = np.empty((resamples, len(columns)))
    for start in range(0, resamples, per_chunk):
        # (b, N); 32-bit indices draw faster, and np.take gathers faster than indexing.
        size = (min(per_chunk, resamples - start), n)
        rows = rng.integers(0, n, size=size, dtype=np.uint32 if n < 1 << 32 else np.int64)
        for c, column in enumerate(columns):
            sums[start : start + len(rows), c] = np.take(column, rows).sum(axis=1)
    return sums


def verdict(ratio: float, low: float, high: float, *, a: str = "mixture", b: str = "dense") -> str:
    """The words for a perplexity ratio a/b and its interval: lower perplexity is better, and
    an interval that contains 1 is no difference."""
    if any(math.isnan(x) for x in (ratio, low, high)):
        return "no data"
    if high < 1:
        return f"{a} better"
    if low > 1:
        return f"{b} better"
    return "no difference (CI contains 1)"


class SeedSpread(NamedTuple):
    seeds: int
    mean: float
    std: float  # sample standard deviation (ddof 1); NaN for one seed
    min: float
    max: float
    low: float  # Student t interval of the mean; NaN below MIN_SEEDS
    high: float


def seed_spread(ratios: Sequence[float], *, confidence: float = CONFIDENCE) -> SeedSpread:
    """Mean, spread and t interval of one recipe's ratios over training seeds."""
    from scipy.stats import t

    ratios = np.asarray(ratios, dtype=np.float64)
    n = len(ratios)
    if n == 0:
        raise ValueError("seed_spread needs at least one ratio")
    mean = float(ratios.mean())
    std = float(ratios.std(ddof=1)) if n > 1 else math.nan
    low = high = math.nan
    if n >= MIN_SEEDS:
        half = float(t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
        low, high = mean - half, mean + half
    return SeedSpread(n, mean, std, float(ratios.min()), float(ratios.max()), low, high)
