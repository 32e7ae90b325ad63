"""Timing shared by the benchmarks: whole calls, interleaved so shared-machine noise hits every
contender alike (ratios are taken within one run)."""

from __future__ import annotations

import random
import time

import torch


def timed(call, device: torch.device | None = None) -> float:
    """Seconds of one call; on CUDA, from an idle GPU until its kernels have finished."""
    on_cuda = device is not None and device.type == "cuda"
    if on_cuda:  # or the clock would also run for work queued before
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if on_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(
    calls: dict, rounds: int, device: torch.device | None = None, warmup: bool = True
) -> dict[str, list[float]]:
    """Seconds of each call per round, the calls taken in turn, in an order shuffled each round
    (seeded), after an untimed round in which kernels get chosen and allocator caches fill, unless
    `warmup` is False.

    Shuffled rather than rotated: a rotation keeps who follows whom, so a call that leaves the
    processor slower for a while (a long AMX matmul lowers its clock; one that evicts the caches)
    would always slow the same neighbour."""
    if warmup:
        for call in calls.values():
            call()
    order = random.Random(0)
    seconds = {name: [] for name in calls}
    for _ in range(rounds):
        for name in order.sample(list(calls), len(calls)):
            seconds[name].append(timed(calls[name], device))
    return seconds
