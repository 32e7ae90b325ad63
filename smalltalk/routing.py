"""Routing rules of SmallTalk LM: balanced assignment for training, argmin for inference (§2.2).

Every function takes `nll`, an `[N, E]` array of prefix negative log-likelihoods: row i holds
the NLL of sequence i's first M tokens under each of the E routers (lower is better). Results
are `int64` arrays of expert indices, one per sequence, in the rows' order.

- `balanced_assign`: the E-step of router EM and the split of the training set between experts
  (Algorithm 1, lines 9 and 13): each expert receives at most `capacity` sequences.
- `route`: inference (Eq. 4); the expert with the lowest NLL, no capacity.
- `random_balanced_assign`: EM round 0 (Algorithm 1, line 3); a seeded random balanced split.
"""

from __future__ import annotations

import operator

import numpy as np

# Visit positions examined per step of the sweep in `balanced_assign` (at least; see there).
_CHUNK = 1 << 14


def balanced_assign(nll: np.ndarray, capacity: int | None = None) -> np.ndarray:
    """Assign every sequence to one expert, at most `capacity` per expert. # §2.2, Fig. 1

    The rule (the paper's "balanced assignments", Fig. 1b): visit the sequences in increasing
    order of their best NLL, min_e nll[i, e]; give each to its lowest-NLL expert that still has
    room. Ties: equal best NLLs are visited in increasing row index; equal NLLs within a row go
    to the lower expert index. `capacity` defaults to ceil(N / E). The result is identical to
    that plain loop (tests/test_routing.py holds it as the reference) and deterministic.

    How it is computed: a few vectorised O(N·E) passes and O(N / 2**14 + E) cheap steps,
    instead of a Python loop over N.

    1. `first = argmin(nll, axis=1)`, `best = nll[i, first[i]]`: one pass over the matrix.
    2. Visit order: a stable sort of `best` (float32: one sort of packed (value, row) keys).
    3. Call the visit position at which an expert takes its last free slot its *closing
       position*. In the loop, the sequence visited at position t gets the lowest-NLL expert
       among those not closed before t; so between two consecutive closings every expert is
       an argmin over one fixed set of open experts, and only the closings need finding. A
       sweep over visit positions does that window by window. In a window, every position
       holds its current expert (at first `first`); "stale" ones, whose expert has closed, are
       re-scored: their rows are gathered and the argmin taken over the open experts only.
       A bincount of the window tells whether some open expert fills up in it; if so, a
       stable counting sort of the window gives the position of each such expert's last free
       slot, and the earliest is the next closing. Everything up to it is final; the expert
       closes and the next window starts right after it (later positions keep their expert
       unless it was the one that closed). Otherwise the whole window is final.

    A window spans max(least room left, min(capacity, 2**14)) positions: no expert can close
    before the least room is used up, and past that short windows keep few positions behind a
    closing. A position is re-scored (O(E)) when found stale, and again only if the expert it
    got closes before it within a window, so re-scoring is bounded by N + E·min(capacity,
    2**14) rows. Measured at N = 10**6, E = 32: about 0.01·N rows on random scores, about N on
    scores by which all sequences rank the experts alike (early EM rounds, heavy ties).

    Args:
        nll: `[N, E]` finite real array of prefix NLLs. float32 and float64 are used as given;
            integer and bool arrays are compared as float64 (exactly). C order is fastest.
        capacity: most sequences any expert may receive; default ceil(N / E). Must satisfy
            capacity * E >= N so that every sequence finds an expert.

    Returns:
        `int64` array of length N: the expert of each sequence (row).

    Raises:
        ValueError: `nll` is not 2-D, has no expert columns, holds NaN or ±inf (the message
            names the first offending row and column), or capacity is negative or too small.
    """
    scores = np.ascontiguousarray(_check_nll(nll))  # rows are gathered below
    n, n_experts = scores.shape
    cap = min(_capacity(n, n_experts, capacity), n)  # room beyond N is never used
    if n == 0:
        return np.empty(0, dtype=np.int64)

    first = scores.argmin(axis=1)  # (N,) each row's favourite expert (lower index on ties)
    best = scores[np.arange(n), first]  # (N,) its NLL
    order = _visit_order(best)  # (N,) row visited at each position
    small = np.int16 if n_experts <= np.iinfo(np.int16).max else np.int32
    expert = first[order].astype(small)  # (N,) expert of each visit position, refined below

    filled = np.zeros(n_experts, dtype=np.int64)  # sequences given to each expert so far
    closed = np.zeros(n_experts, dtype=bool)  # experts full before the current position
    start = 0  # every position before `start` has its final expert, counted in `filled`
    while start < n:
        room = cap - filled  # > 0 for open experts
        # No expert can fill up before `start + min(room)`; windows reaching past that are
        # kept short so that few positions lie behind a closing (see the docstring).
        stop = min(n, start + max(int(room[~closed].min()), min(_CHUNK, cap)))
        window = expert[start:stop]  # view: fixes below write through to `expert`
        if closed.any():
            stale = np.flatnonzero(closed[window])
            if stale.size:
                window[stale] = _argmin_open(scores, order[start + stale], closed)
        counts = np.bincount(window, minlength=n_experts)
        filling = np.flatnonzero((counts >= room) & ~closed)
        if filling.size == 0:  # nobody fills up in this window: all of it is final
            filled += counts
            start = stop
            continue
        # Offset in the window of each filling expert's last free slot: its room-th occurrence.
        grouped = np.argsort(window, kind="stable")  # offsets grouped by expert, increasing
        group_start = np.cumsum(counts) - counts
        last_slot = grouped[group_start[filling] + room[filling] - 1]
        k = int(last_slot.argmin())
        end = int(last_slot[k]) + 1  # the earliest closing: window[:end] is final
        filled += np.bincount(window[:end], minlength=n_experts)
        closed[filling[k]] = True
        start += end

    assignment = np.empty(n, dtype=np.int64)
    assignment[order] = expert
    return assignment


def route(nll: np.ndarray) -> np.ndarray:
    """Inference routing (Eq. 4, §2.2): each sequence to its lowest-NLL expert, no capacity.

    Ties go to the lower expert index. Same input checks as `balanced_assign`.

    Returns:
        `int64` array of length N.
    """
    scores = _check_nll(nll)
    if scores.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    return scores.argmin(axis=1).astype(np.int64, copy=False)


def random_balanced_assign(n: int, n_experts: int, seed: int) -> np.ndarray:
    """EM round 0 (Algorithm 1, line 3): a random split of n sequences into n_experts parts.

    Expert e receives ceil((n - e) / n_experts) sequences, so counts differ by at most one and
    the lower indices take the extra ones; which sequences go where is a permutation drawn from
    `np.random.default_rng(seed)`, so the result depends only on (n, n_experts, seed).

    Returns:
        `int64` array of length n.
    """
    n, n_experts = operator.index(n), operator.index(n_experts)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    labels = np.arange(n, dtype=np.int64) % n_experts
    return np.random.default_rng(seed).permutation(labels)


# ---- helpers ---------------------------------------------------------------------------------


def _check_nll(nll: np.ndarray) -> np.ndarray:
    """The scores as a real [N, E] array with E >= 1 and only finite values, or ValueError."""
    scores = np.asarray(nll)
    if scores.ndim != 2:
        raise ValueError(f"nll must be a 2-D [N, E] array of prefix NLLs, got shape {scores.shape}")
    if scores.shape[1] == 0:
        raise ValueError(f"nll has no expert columns (shape {scores.shape}); need E >= 1")
    if scores.dtype.kind in "biu":
        scores = scores.astype(np.float64)
    elif scores.dtype.kind != "f":
        raise ValueError(f"nll must hold real numbers, got dtype {scores.dtype}")
    finite = np.isfinite(scores)
    if not finite.all():
        row, col = (int(i) for i in np.argwhere(~finite)[0])
        count = int(finite.size - np.count_nonzero(finite))
        raise ValueError(
            f"nll[{row}, {col}] is {scores[row, col]} (row {row}, column {col}): prefix NLLs "
            f"must be finite; {count} non-finite value(s) in total"
        )
    return scores


def _capacity(n: int, n_experts: int, capacity: int | None) -> int:
    """The per-expert capacity: ceil(N / E) by default; checked to fit all N sequences."""
    if capacity is None:
        return -(-n // n_experts)
    cap = operator.index(capacity)
    if cap < 0:
        raise ValueError(f"capacity must be >= 0, got {cap}")
    if cap * n_experts < n:
        raise ValueError(
            f"capacity {cap} x {n_experts} experts = {cap * n_experts} < {n} sequences: "
            f"need capacity >= ceil(N / E) = {-(-n // n_experts)}"
        )
    return cap


def _visit_order(best: np.ndarray) -> np.ndarray:
    """Indices sorting `best` increasingly, equal values by index: a stable argsort, faster.

    numpy's stable argsort of floats is a merge sort, 5-7x slower than sorting integers or
    its default (vectorised, unstable) sort, so we use those and make ties come out by index.
    """
    n = best.size
    if best.dtype == np.float32 and n <= 1 << 32:
        # Pack (value, index) into one uint64 whose integer order is the wanted order, then sort
        # plain integers. Float bits order like the floats once the sign is handled: flip every
        # bit of a negative, only the sign bit of a non-negative. (+0.0 first turns -0.0 into
        # +0.0, so the two compare equal as floats do.)
        bits = (best + np.float32(0)).view(np.uint32)
        flip = np.where(bits >> 31, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
        keys = (bits ^ flip).astype(np.uint64) << np.uint64(32)
        keys |= np.arange(n, dtype=np.uint64)
        keys.sort()
        return (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)
    if n > 1 << 31:
        return np.argsort(best, kind="stable")
    # Other dtypes: sort unstably, then order each run of equal values by index by sorting
    # (run number, index) packed into one int64.
    order = np.argsort(best)
    ordered = best[order]
    run_starts = np.empty(n, dtype=bool)
    run_starts[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=run_starts[1:])
    if run_starts.all():  # no ties
        return order
    keys = (np.cumsum(run_starts) - 1) * n + order
    keys.sort()
    return keys % n


def _argmin_open(scores: np.ndarray, rows: np.ndarray, closed: np.ndarray) -> np.ndarray:
    """For each row in `rows`, its lowest-score expert among those not `closed` (an [E] mask)."""
    sub = np.take(scores, rows, axis=0)  # (len(rows), E) copy: whole rows gather fastest
    np.copyto(sub, np.inf, where=closed)  # scores are finite, so a closed expert never wins
    return sub.argmin(axis=1)
