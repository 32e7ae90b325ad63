"""The process's C allocator keeps freed memory: large buffers allocated again are not faulted in
again, in `fit()` and in every `smalltalk` command."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from smalltalk.allocator import ON_GLIBC

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not ON_GLIBC, reason="glibc's allocator")

# Page faults of twenty 64 MiB tensors allocated and freed in turn, after what argv[1] sets up:
# "default" nothing, "keep" keep_freed_memory(), "cli" a smalltalk command run in this process.
FAULTS_OF_REPEATED_ALLOCATIONS = """
import resource, sys, torch
from smalltalk.allocator import keep_freed_memory
from smalltalk.cli import main
if sys.argv[1] == "keep":
    assert keep_freed_memory()
elif sys.argv[1] == "cli":
    assert main(["check-config", "--config", sys.argv[2]]) == 0
for _ in range(20):  # the first ones take new pages whatever the allocator does (test below)
    torch.ones(16 * 2**20)  # 64 MiB, above any threshold glibc would serve from its heap
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(16 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(*args: str) -> int:
    """Page faults of the allocations above in a fresh process: the allocator's settings are the
    process's."""
    run = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_REPEATED_ALLOCATIONS, *args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(run.stdout.split()[-1])  # after what the command printed


def test_freed_memory_is_reused_without_page_faults():
    default, kept = faults("default"), faults("keep")
    pages = 20 * 64 * 2**20 // resource.getpagesize()
    assert default > pages / 512  # a fresh mapping each time (/ 512: 2 MiB huge pages)
    assert kept < default / 10
    # Every command keeps it. After a command the heap has small live objects between its holes,
    # and posix_memalign asks for the size plus its alignment, a little more than the hole the
    # buffer before left: so the first large buffers extend the heap (fresh pages) until a hole has
    # merged with freed neighbours into one large enough, and from then on that hole is reused.
    # After check-config that took up to 9 buffers in 35 runs; the 20 warm-up ones leave room.
    assert faults("cli", str(REPO / "config.yaml")) < default / 10
