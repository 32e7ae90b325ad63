"""The C allocator of a SmallTalk process: memory it frees is kept for reuse, not handed back."""

from __future__ import annotations

import ctypes
import platform

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
ON_GLIBC = platform.libc_ver()[0] == "glibc"  # the only C library whose allocator this sets


def keep_freed_memory() -> bool:
    """Make this process's C allocator keep the memory it frees for its next allocations instead
    of handing it back to the kernel; True where it could (glibc), False elsewhere. Every
    `smalltalk` command does so first (`cli.main`), and so does `fit()`.

    A training step or a scoring batch allocates and frees the same large buffers again and again
    (the logits and their gradient: 16 MB each at the demo expert's 32 x 128 x 1024). glibc serves
    blocks of 32 MB and more, and by default many smaller ones, with a fresh mmap and unmaps them
    on free, so every reuse pays a page fault per 4 KiB page and the kernel's zeroing of it. With
    no mmap (M_MMAP_MAX 0) and no trimming of the heap's top, the pages stay mapped and are reused;
    the resident set stays at its peak, which is what a job asks for anyway. Same arithmetic, same
    results. On a 2-core Xeon (a KVM guest, where faults are dear) a shard job ran 1.2x as fast,
    the demo's training jobs 1.35-1.6x (README, Training speed).
    """
    if not ON_GLIBC:
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
