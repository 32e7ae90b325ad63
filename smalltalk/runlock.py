"""One run of the workflow at a time on a results directory: `RESULTS/run.lock`.

Every job reads the run's settings from `RESULTS/config.yaml`, which the workflow's `onstart`
writes (rules/setup.smk). Snakemake's own lock covers only the files each run makes, so a second
run with other targets gets past it, rewrites the config, and the first run's remaining jobs
read the second's settings while Snakemake records the first's for them (a later dry run then
finds nothing to do). So the workflow's main process takes this lock in `onstart`, before it
writes the config, and gives it back in `onsuccess`/`onerror`; a second run stops in its
`onstart`, before it has written or started anything, naming the run that holds it.

Why one run at a time rather than a config snapshot per run (each job reading its own run's
copy): a snapshot would keep each job's settings right, but two runs would still write one
results directory at once. Every file both make (the tokenizer, the shards, the experts, the
summaries) would end up from whichever run wrote it last, the two halves of a results directory
from two configs, and a job of one run could read a file the other is rewriting. A results
directory is one experiment with one config (README, Guarantees), so two experiments at once
need two results directories, and a second run on the same one has to wait.

The lock is flock(2) on `run.lock`: the kernel drops it when the holding process dies, however
it dies (kill -9 included), so a killed run never blocks the next one and needs no `--unlock`
(which clears Snakemake's own lock only, and leaves this one alone). Over NFS, Linux turns flock
into a lock the server keeps for every client, so runs on two login nodes see each other's. The
file also holds the holder's process id, host, start time and command, which the refusal names.
Where the file system refuses flock (Lustre mounted without `flock`), that record alone is the
lock: a run on the same host checks that the holder still lives (same process id, same process
start time); a holder on another host cannot be checked, and the refusal says to delete the file
once that run is known to be gone. (Without flock, two runs started in the same instant could
both pass; with it, never.)

Who takes it: only the Snakemake process that runs the workflow (on a cluster, the one on the
login node), never its jobs, which Snakemake starts with `--no-hooks`. Dry runs (`-n`),
`--report` (it only reads, and writes its file outside the results), `--unlock`, `--lint` and a
run with nothing to do never reach `onstart`: none takes the lock or is refused. A report made
while a run is going on shows the results as they are at that moment. `--touch` does take it;
`--no-hooks` skips it, as it skips writing the config. Snakefiles that use the workflow as a
module (benchmarks/) write each run's config in their own `onstart` and take each run's lock
there with `hold_run_lock`.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import IO, Any

LOCK_NAME = "run.lock"
# What flock(2) fails with on a file system that does not support it.
FLOCK_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


class RunInProgress(RuntimeError):
    """Another run of the workflow holds the results directory."""


# The lock files this process holds, open (closing one would drop its flock), by results folder.
_held: dict[Path, IO[str]] = {}


def lock_path(results: str | os.PathLike) -> Path:
    return Path(results) / LOCK_NAME


def hold_run_lock(results: str | os.PathLike) -> Path:
    """Take the run lock of `results` for this process, until `release_run_lock` or until the
    process ends; taking it again is a no-op. Raises RunInProgress, naming the holder, if
    another process holds it."""
    root = Path(results).resolve()  # two spellings of one folder are one lock
    if root in _held:
        return lock_path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = lock_path(root)
    # Opened without truncating: the holder's record is read if the lock is refused.
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open until released
    try:
        if not _flock(handle):
            _refuse_a_live_record(path, handle)
        _write_record(handle, _this_process())
    except BaseException:
        handle.close()
        raise
    _held[root] = handle
    return path


def release_run_lock(results: str | os.PathLike) -> None:
    """Give back the run lock of `results` if this process holds it; otherwise do nothing (a
    refused run's `onerror` must not clear the holder's record)."""
    handle = _held.pop(Path(results).resolve(), None)
    if handle is None:
        return
    _write_record(handle, None)  # no run holds it: an empty record
    handle.close()  # drops the flock


def read_holder(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record of the run that holds (or last held) the lock at `path`; None if empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return _parse_record(text)


def _flock(handle: IO[str]) -> bool:
    """Lock `handle` for this process; False where the file system does not support flock.
    Raises RunInProgress if another process holds it."""
    import fcntl

    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise RunInProgress(_refusal(Path(handle.name), _parse_record(handle.read()))) from None
    except OSError as error:
        if error.errno not in FLOCK_UNSUPPORTED:
            raise
        return False
    return True


def _refuse_a_live_record(path: Path, handle: IO[str]) -> None:
    """Without flock: refuse while the recorded holder may still run."""
    handle.seek(0)
    holder = _parse_record(handle.read())
    if holder is not None and _may_be_alive(holder):
        unchecked = holder.get("host") != socket.gethostname()
        raise RunInProgress(_refusal(path, holder, without_flock=unchecked))


def _may_be_alive(holder: dict[str, Any]) -> bool:
    """Whether the recorded process may still run: surely if it runs on this host with the same
    start time, and maybe if it runs on another (which cannot be checked from here)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    started = holder.get("process_start")
    return started is None or started == _process_start(pid)


def _refusal(path: Path, holder: dict[str, Any] | None, without_flock: bool = False) -> str:
    results = path.parent
    if holder is None:  # the holder has locked the file but not written its record yet
        who = "another run of the workflow, which has just started"
        stop = "stop it"
    else:
        who = (
            f"another run of the workflow: process {holder.get('pid')} on "
            f"{holder.get('host')}, started {holder.get('started')} "
            f"({holder.get('command')})"
        )
        stop = f"stop it with `kill {holder.get('pid')}` on {holder.get('host')}"
    message = (
        f"{results} is in use by {who}. Two runs at once on one results directory would run "
        f"each other's jobs with the wrong settings ({results / 'config.yaml'}). Wait for that "
        f"run to end, or {stop}, then start this one again; or give this run a results "
        "directory of its own (--config results=...). Dry runs (-n) are never refused."
    )
    if without_flock:
        message += (
            f" This file system does not support flock, so a run killed on another host leaves "
            f"its record: if that run is gone, delete {path}."
        )
    return message


def _this_process() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "process_start": _process_start(os.getpid()),
        "command": " ".join(sys.argv),
    }


def _process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux); None where unknown. With
    the pid it tells a holder from a later process that was given the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # Fields after the command name, which is in parentheses and may hold spaces; the start
        # time is field 22, the 20th after it.
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _write_record(handle: IO[str], record: dict[str, Any] | None) -> None:
    handle.seek(0)
    handle.truncate()
    if record is not None:
        handle.write(json.dumps(record, indent=2) + "\n")
    handle.flush()
    os.fsync(handle.fileno())  # a run on another host reads it over NFS


def _parse_record(text: str) -> dict[str, Any] | None:
    try:
        record = json.loads(text)
    except ValueError:
        return None  # empty (released, or not written yet) or cut short
    return record if isinstance(record, dict) else None
