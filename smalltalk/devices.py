"""GPUs for the jobs of one machine: each job takes GPUs no other job holds, from a pool of locks.

Snakemake's `--resources gpu=N` caps how many GPUs the running jobs ask for together, but not
which: every job would use GPU 0. A job started as

    python -m smalltalk.devices --gpus K -- COMMAND ...

takes K free GPUs of the pool, sets CUDA_VISIBLE_DEVICES to them and becomes COMMAND (exec), which
holds them until it ends, however it ends: each GPU is an flock on a file in a directory every
job of the machine shares (`SMALLTALK_GPU_LOCKS`, default `<tmp>/smalltalk-gpus`), and the kernel
drops a lock when the last process holding it has gone, killed or not. With too few free, it
waits for them.

The pool is the GPUs CUDA_VISIBLE_DEVICES lists, else those the NVIDIA driver lists; with none (a
CPU-only machine, or tests hiding the GPUs) COMMAND runs as it is, on the CPU. SMALLTALK_GPUS=N
makes the pool GPUs 0..N-1 (tests simulate a machine of N GPUs with it). Under SLURM
(SLURM_JOB_ID set) COMMAND also runs as it is: SLURM has given the job its own GPUs already.

No torch here: CUDA must not start before CUDA_VISIBLE_DEVICES is set, and each GPU job starts
through this module.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLL_SECONDS = 1.0  # while waiting for GPUs, how often to try again


def gpu_pool(environ=os.environ) -> list[str]:
    """The GPUs this machine's jobs share, as CUDA_VISIBLE_DEVICES entries."""
    if environ.get("SMALLTALK_GPUS"):
        return [str(i) for i in range(int(environ["SMALLTALK_GPUS"]))]
    if "CUDA_VISIBLE_DEVICES" in environ:  # "" hides every GPU
        return [gpu.strip() for gpu in environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
    return [str(i) for i in range(_nvidia_gpu_count())]


def _nvidia_gpu_count() -> int:
    """GPUs the NVIDIA driver lists, without starting CUDA: its /proc entries, else nvidia-smi."""
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return sum(1 for _ in proc.iterdir())
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())


def lock_dir(environ=os.environ) -> Path:
    """Where the locks live: one directory for every job and user of this machine, never on a
    filesystem other machines share (their GPUs are others)."""
    return Path(environ.get("SMALLTALK_GPU_LOCKS") or Path(tempfile.gettempdir(), "smalltalk-gpus"))


def try_acquire(count: int, pool: list[str], directory: Path) -> list[tuple[str, int]] | None:
    """Lock `count` GPUs of the pool that no other process holds: (GPU, open lock file) each, or
    None (and nothing held) if fewer are free. All or nothing, so that two jobs that each need
    two of three GPUs cannot hold one each and wait for each other for ever."""
    held = []
    for gpu in pool:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", gpu)  # entries may be UUIDs, MIG-...
        # Read-only: another user's lock file can still be locked (flock needs no write access).
        fd = os.open(directory / f"gpu-{name}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        held.append((gpu, fd))
        if len(held) == count:
            return held
    for _, fd in held:
        os.close(fd)
    return None


def acquire(count: int, pool: list[str], directory: Path, log=print) -> list[tuple[str, int]]:
    """Lock `count` GPUs of the pool, waiting until that many are free."""
    if count > len(pool):
        raise ValueError(f"the job asks for {count} GPUs, this machine has {len(pool)}")
    try:
        directory.mkdir(parents=True)
        directory.chmod(0o1777)  # like /tmp: every user's jobs take GPUs here
    except FileExistsError:
        pass
    waiting_since = None
    while (held := try_acquire(count, pool, directory)) is None:
        if waiting_since is None:
            waiting_since = time.monotonic()
            log(f"waiting for {count} of the {len(pool)} GPUs to be free (locks in {directory})")
        time.sleep(POLL_SECONDS)
    if waiting_since is not None:
        log(f"waited {time.monotonic() - waiting_since:.0f} s for GPUs")
    return held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smalltalk.devices",
        description="Run COMMAND on GPUs of this machine that no other job holds.",
    )
    parser.add_argument("--gpus", type=int, required=True, help="GPUs the command needs")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGUMENTS]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run")

    def log(line: str) -> None:
        print(f"smalltalk.devices: {line}", file=sys.stderr, flush=True)

    pool = gpu_pool()
    if args.gpus > 0 and pool and not os.environ.get("SLURM_JOB_ID"):
        try:
            held = acquire(args.gpus, pool, lock_dir(), log)
        except ValueError as error:
            log(f"error: {error}")
            return 1
        for _, fd in held:
            os.set_inheritable(fd, True)  # kept open, and locked, across exec
        gpus = ",".join(gpu for gpu, _ in held)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
        log(f"CUDA_VISIBLE_DEVICES={gpus} (of {','.join(pool)})")
    try:
        os.execvp(command[0], command)  # does not return
    except OSError as error:
        log(f"error: cannot run {command[0]}: {error.strerror}")
        return 127


if __name__ == "__main__":
    sys.exit(main())
