"""GPUs on one machine without SLURM: concurrent jobs get distinct GPUs from a pool of locks, and a
GPU is free again when the job holding it ends, killed or not. The machine's N GPUs are simulated
(SMALLTALK_GPUS=N), so this runs on a CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from smalltalk.devices import gpu_pool

# A job that reports its GPUs, then runs until it is stopped.
JOB = "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(120)"


def start(tmp_path: Path, gpus: int, *command: str, pool: int | None = 3, **env: str):
    """`python -m smalltalk.devices --gpus G -- COMMAND` on a machine of `pool` GPUs."""
    environ = os.environ | {"PYTHONPATH": str(REPO), "SMALLTALK_GPU_LOCKS": str(tmp_path)} | env
    if pool is not None:
        environ["SMALLTALK_GPUS"] = str(pool)
    return subprocess.Popen(
        [sys.executable, "-m", "smalltalk.devices", "--gpus", str(gpus), "--", *command],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def jobs():
    """Started jobs, all stopped at the end of the test."""
    started = []
    yield started
    for job in started:
        job.kill()
        job.wait()
        job.stdout.close()
        job.stderr.close()


def granted(job) -> list[str]:
    """The GPUs a running JOB was given (its first line)."""
    return job.stdout.readline().strip().split(",")


def test_concurrent_jobs_get_distinct_gpus_and_a_killed_jobs_gpu_is_free_again(tmp_path, jobs):
    jobs += [start(tmp_path, 1, sys.executable, "-c", JOB) for _ in range(3)]
    gpus = [granted(job) for job in jobs]
    assert sorted(gpu for held in gpus for gpu in held) == ["0", "1", "2"]

    waiting = start(tmp_path, 1, sys.executable, "-c", JOB)  # a fourth: no GPU is free
    jobs.append(waiting)
    assert "waiting for 1 of the 3 GPUs" in waiting.stderr.readline()
    time.sleep(1)
    assert waiting.poll() is None  # still waiting, not started on a GPU another job holds

    jobs[1].send_signal(signal.SIGKILL)  # no clean-up of its own: the kernel drops its lock
    jobs[1].wait()
    assert granted(waiting) == gpus[1]  # the one GPU free again


def test_a_job_of_two_gpus_gets_two_free_ones_or_fails_if_the_machine_has_fewer(tmp_path, jobs):
    one = start(tmp_path, 1, sys.executable, "-c", JOB)
    jobs.append(one)
    first = granted(one)
    two = start(tmp_path, 2, sys.executable, "-c", JOB)
    jobs.append(two)
    pair = granted(two)
    assert len(pair) == 2 and len({*pair, *first}) == 3

    too_many = start(tmp_path, 4, sys.executable, "-c", "pass")
    _, err = too_many.communicate(timeout=60)
    assert too_many.returncode == 1 and "asks for 4 GPUs, this machine has 3" in err


def test_without_gpus_or_under_slurm_the_command_runs_as_it_is(tmp_path):
    report = "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))"
    cpu = start(tmp_path, 1, sys.executable, "-c", report, pool=None, CUDA_VISIBLE_DEVICES="")
    assert cpu.communicate(timeout=60)[0].strip() == "" and cpu.returncode == 0
    slurm = start(
        tmp_path, 1, sys.executable, "-c", report, SLURM_JOB_ID="42", CUDA_VISIBLE_DEVICES="7"
    )
    assert slurm.communicate(timeout=60)[0].strip() == "7"  # SLURM's choice, left alone
    assert not list(tmp_path.glob("*.lock"))


def test_the_pool_is_the_visible_gpus():
    assert gpu_pool({"CUDA_VISIBLE_DEVICES": "2, 5"}) == ["2", "5"]
    assert gpu_pool({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert gpu_pool({"SMALLTALK_GPUS": "2", "CUDA_VISIBLE_DEVICES": ""}) == ["0", "1"]


@pytest.fixture(scope="module")
def seen_from_a_module_fixture():
    import torch

    return torch.cuda.is_available(), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_fixtures_wider_than_a_test_see_no_gpu_either(seen_from_a_module_fixture):
    """conftest hides the GPU for the whole session: a module's fixture, built before the test's
    own fixtures, must not train on it, nor the jobs it starts."""
    assert seen_from_a_module_fixture == (False, "")
