"""Timing shared by the benchmarks: whole calls, interleaved so shared-machine noise hits every
contender alike (ratios are taken within one run)."""

from __future__ import annotations

import time

import torch


def timed(call, device: torch.device | None = None) -> float:
    """Seconds of one call; on CUDA, until its kernels have finished."""
    start = time.perf_counter()
    call()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(
    calls: dict, rounds: int, device: torch.device | None = None, warmup: bool = True
) -> dict[str, list[float]]:
    """Seconds of each call per round, the calls taken in turn (order rotated each round), after
    an untimed round in which kernels get chosen and allocator caches fill, unless `warmup` is
    False."""
    if warmup:
        for call in calls.values():
            call()
    names = list(calls)
    seconds = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds[name].append(timed(calls[name], device))
    return seconds
