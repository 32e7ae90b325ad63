"""One run at a time on a results directory (smalltalk.runlock); the workflow's own use of it is
tested end to end in test_workflow.py."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from smalltalk import runlock
from smalltalk.runlock import RunInProgress, hold_run_lock, read_holder, release_run_lock

# A second process that takes the lock, says so, and holds it until its stdin closes.
HOLDER = (
    "import sys; from smalltalk.runlock import hold_run_lock; "
    "hold_run_lock(sys.argv[1]); print('held', flush=True); sys.stdin.read()"
)


def start_holder(results: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(results)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert holder.stdout.readline() == "held\n"
    return holder


def write_record(results: Path, record: dict) -> None:
    with open(results / "run.lock", "w") as handle:
        runlock._write_record(handle, record)


@pytest.fixture
def released():
    """Locks this test process takes are given back, whatever the test does."""
    yield
    for results in list(runlock._held):
        release_run_lock(results)


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(
    tmp_path, released
):
    results = tmp_path / "results"
    holder = start_holder(results)
    try:
        with pytest.raises(RunInProgress) as refused:
            hold_run_lock(results)
        record = read_holder(results / "run.lock")
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
        message = str(refused.value)
        assert f"process {holder.pid} on {socket.gethostname()}, started {record['started']}" in (
            message
        )
        assert "Wait for that run to end" in message
        assert read_holder(results / "run.lock") == record  # refusing changed nothing
    finally:
        holder.kill()  # kill -9: no chance to give the lock back
        holder.wait()
    assert read_holder(results / "run.lock")["pid"] == holder.pid  # its record stays...
    hold_run_lock(results)  # ...but the kernel dropped its lock
    assert read_holder(results / "run.lock")["pid"] == os.getpid()


def test_release_frees_the_lock_and_clears_the_record_but_only_for_its_holder(tmp_path, released):
    results = tmp_path / "results"
    holder = start_holder(results)
    release_run_lock(results)  # not held here: a refused run's onerror must change nothing
    assert read_holder(results / "run.lock")["pid"] == holder.pid
    holder.stdin.close()  # the holder ends without releasing: the process's end frees it
    holder.wait()
    path = hold_run_lock(results)
    assert hold_run_lock(results) == path  # taken again by its holder: a no-op
    release_run_lock(results)
    assert read_holder(path) is None
    holder = start_holder(results)  # free for another process now
    holder.stdin.close()
    holder.wait()


def test_without_flock_the_record_is_the_lock_and_a_dead_holder_does_not_block(
    tmp_path, monkeypatch, released
):
    import fcntl

    def unsupported(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    results = tmp_path / "results"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = runlock._this_process() | {
            "pid": sleeper.pid,
            "process_start": runlock._process_start(sleeper.pid),
        }
        results.mkdir()
        write_record(results, live)
        with pytest.raises(RunInProgress, match=f"process {sleeper.pid} on "):
            hold_run_lock(results)
    finally:
        os.kill(sleeper.pid, signal.SIGKILL)
        sleeper.wait()
    hold_run_lock(results)  # the recorded holder is gone
    assert read_holder(results / "run.lock")["pid"] == os.getpid()
    release_run_lock(results)
    # A holder on another host cannot be checked: refused, and told which file to delete.
    elsewhere = live | {"host": "another-host", "pid": 1}
    write_record(results, elsewhere)
    with pytest.raises(RunInProgress, match="if that run is gone, delete .*run.lock"):
        hold_run_lock(results)
