"""The workflow on SLURM: `snakemake --profile slurm` on a real single-node cluster started on this
host (tests/slurm/cluster.sh), or on the cluster a login node submits to, and dry runs of the
RedPajama-V2 recipes.

On a cluster's login node (its slurm.conf is the cluster's, which cluster.sh never touches) the
SLURM test is skipped, saying so, unless SMALLTALK_SLURM_PARTITION names a partition to run it
on there: `SMALLTALK_SLURM_PARTITION=debug python -m pytest tests/test_slurm.py`. Its jobs then
run in SMALLTALK_SLURM_RUNS (default: results/slurm-tests in this repository), which the
cluster's nodes must see, as they must see this repository and its .venv; the account is the
executor's guess (`cluster.account`), and the executor reads job states as it would for a user.
"""

from __future__ import annotations

import dataclasses
import getpass
import gzip
import json
import os
import re
import shutil
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from snakemake.utils import update_config
from test_workflow import BIN, REPO, TINY, snakemake

from smalltalk.config import PRESETS, model_config, validate_config

PROFILE = REPO / "slurm"
CPU_ONLY = PROFILE / "cpu-only.yaml"
RECIPES = PROFILE / "recipes"
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
# CI must run the cluster test; elsewhere it needs root and Slurm's packages.
ON_CI = os.environ.get("CI") == "true"
PARTITION = "SMALLTALK_SLURM_PARTITION"  # run on this partition of the cluster that is here
SHARED_RUNS = "SMALLTALK_SLURM_RUNS"  # where, on a filesystem the cluster's nodes see
FOREIGN_CONF = 3  # `cluster.sh check`'s status where a real cluster's slurm.conf is here


@dataclass(frozen=True)
class SlurmCluster:
    """Where the SLURM test submits its jobs."""

    partition: str | None
    """The real cluster's partition (SMALLTALK_SLURM_PARTITION); None: the test cluster's."""
    shared_runs: Path | None
    """A folder the real cluster's nodes see, for the runs; None: the test's own tmp_path."""
    jobname_prefix: str
    """The prefix of the run's job names: a real cluster's jobs left behind are cancelled by it."""

    def workdir(self, tmp_path: Path) -> Path:
        folder = tmp_path if self.shared_runs is None else self.shared_runs / self.jobname_prefix
        workdir = folder / "slurm"
        workdir.mkdir(parents=True)
        return workdir

    def snakemake_options(self) -> list[str]:
        if self.partition is None:
            # No accounting database here, so `sacct` cannot answer: job states come from
            # squeue, which shows finished jobs for MinJobAge = 300 s. The jobs take seconds,
            # so the first status check comes early.
            status = ["--slurm-status-command", "squeue"]
            return [*status, "--slurm-init-seconds-before-status-checks", "5"]
        # The CPU-only switch (the test's configs) sends every job to `cluster.partition`.
        partition = f"cluster={{partition: {self.partition}}}"
        return ["--slurm-jobname-prefix", self.jobname_prefix, "--config", partition]


def slurm_cluster_here() -> Iterator[SlurmCluster]:
    """The SLURM cluster to test on: the one this host submits to, on SMALLTALK_SLURM_PARTITION,
    where that is set; else a single-node cluster that tests/slurm/cluster.sh starts here and
    stops afterwards. Skips, saying why, where a slurm.conf that cluster.sh did not write is
    here (a real cluster's), and off CI where starting one needs root or Slurm's packages."""
    partition = os.environ.get(PARTITION)
    if partition:
        yield from real_cluster(partition)
        return
    check = subprocess.run(
        ["bash", str(CLUSTER), "check"], capture_output=True, text=True, timeout=60
    )
    if check.returncode == FOREIGN_CONF:
        pytest.skip(
            f"{check.stderr.strip()} ({PARTITION}=<partition> runs this test on the cluster "
            "it belongs to)"
        )
    assert check.returncode == 0, check.stderr
    if not ON_CI:
        if os.geteuid() != 0:
            pytest.skip("starting a SLURM cluster needs root (CI runs this test)")
        if shutil.which("sbatch") is None:
            pytest.skip("no Slurm here: bash tests/slurm/cluster.sh install (CI runs this test)")
    subprocess.run(["bash", str(CLUSTER), "start"], check=True, timeout=600)
    yield SlurmCluster(partition=None, shared_runs=None, jobname_prefix="smalltalk")
    subprocess.run(["bash", str(CLUSTER), "stop"], check=True, timeout=120)


def real_cluster(partition: str) -> Iterator[SlurmCluster]:
    """The partition named by SMALLTALK_SLURM_PARTITION, checked to be one; the run's jobs
    still queued or running afterwards (the run timed out) are cancelled, and no others."""
    if not re.fullmatch(r"[\w.-]+", partition):
        pytest.fail(f"{PARTITION}={partition!r}: not a partition name")
    if shutil.which("sbatch") is None:
        pytest.fail(f"{PARTITION}={partition}: no sbatch here, so no cluster to submit to")
    listed = subprocess.run(
        ["sinfo", "-h", "-p", partition, "-o", "%P"], capture_output=True, text=True, timeout=60
    )
    if listed.returncode != 0 or not listed.stdout.strip():
        pytest.fail(f"{PARTITION}={partition}: sinfo knows no such partition {listed.stderr}")
    shared_runs = Path(os.environ.get(SHARED_RUNS) or REPO / "results" / "slurm-tests")
    prefix = f"smalltalk-test-{uuid.uuid4().hex[:12]}"
    yield SlurmCluster(partition=partition, shared_runs=shared_runs, jobname_prefix=prefix)
    queued = subprocess.run(
        ["squeue", "-h", "-u", getpass.getuser(), "-o", "%i %j"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    jobs = [line.strip().partition(" ") for line in queued.stdout.splitlines()]
    # The executor names a run's jobs {prefix}_{run id}: no job of anyone else's matches.
    left = [job for job, _, name in jobs if name.startswith(f"{prefix}_")]
    if left:
        subprocess.run(["scancel", *left], check=True, timeout=60)


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[SlurmCluster]:
    yield from slurm_cluster_here()


def snakemake_on_slurm(
    workdir: Path, cluster: SlurmCluster, *args: str
) -> subprocess.CompletedProcess:
    """`snakemake --profile slurm` in `workdir`, set up like test_workflow's runs."""
    for name in ("data", "config.yaml"):
        (workdir / name).symlink_to(REPO / name)
    command = [
        str(BIN / "snakemake"),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--profile",
        str(PROFILE),
        *cluster.snakemake_options(),
        "--slurm-keep-successful-logs",  # the job logs SLURM wrote are the proof
        # The local reference run has 2 cores: the tokenizer trains with 2 threads in both.
        "--max-threads",
        "2",
        *args,
    ]
    # The executor ignores SIGTERM: on time-out subprocess kills it (SIGKILL) and the
    # fixture cancels whatever it left queued (`cluster.sh stop`, or the run's jobs by name).
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=1500,
        env=os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}"},
    )


# ---- which cluster: tested without one ---------------------------------------------------


def write_slurm_conf(path: Path, *lines: str) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_a_real_clusters_slurm_conf_skips_the_cluster_test_saying_why(tmp_path, monkeypatch):
    theirs = write_slurm_conf(tmp_path / "slurm.conf", "ClusterName=theirs", "SlurmctldHost=head")
    monkeypatch.setenv("SLURM_CONF", str(theirs))  # where Slurm's commands and cluster.sh look
    monkeypatch.delenv(PARTITION, raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        next(slurm_cluster_here())
    assert skipped.value.msg == (
        f"cluster.sh: {theirs} exists and was not written by this script; not touching it "
        f"({PARTITION}=<partition> runs this test on the cluster it belongs to)"
    )
    assert theirs.read_text() == "ClusterName=theirs\nSlurmctldHost=head\n"


def test_cluster_sh_takes_a_slurm_conf_of_its_own_or_none_and_no_other(tmp_path):
    def check(conf: Path) -> int:
        environment = os.environ | {"SLURM_CONF": str(conf)}
        command = ["bash", str(CLUSTER), "check"]
        return subprocess.run(command, env=environment, capture_output=True, timeout=60).returncode

    marker = "# Written by smalltalk tests/slurm/cluster.sh"
    assert check(tmp_path / "none.conf") == 0
    assert check(write_slurm_conf(tmp_path / "ours.conf", marker, "ClusterName=x")) == 0
    assert check(write_slurm_conf(tmp_path / "theirs.conf", "ClusterName=x")) == FOREIGN_CONF


def fake_slurm(folder: Path) -> None:
    """sbatch, sinfo (one partition: debug), squeue (prints $FAKE_QUEUE) and scancel (writes
    its arguments to $FAKE_CANCELLED), enough for the fixture's questions."""
    folder.mkdir()
    scripts = {
        "sbatch": "exit 0",
        "sinfo": '[ "$3" = debug ] && echo "debug*"; exit 0',
        "squeue": 'cat "$FAKE_QUEUE"',
        "scancel": 'echo "$@" >> "$FAKE_CANCELLED"',
    }
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)


def test_a_named_partition_runs_the_test_on_the_real_cluster_and_cancels_only_its_jobs(
    tmp_path, monkeypatch
):
    fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    theirs = write_slurm_conf(tmp_path / "slurm.conf", "ClusterName=theirs")
    monkeypatch.setenv("SLURM_CONF", str(theirs))  # a login node's: no test cluster started
    monkeypatch.setenv(SHARED_RUNS, str(tmp_path / "shared"))
    monkeypatch.setenv("FAKE_QUEUE", str(tmp_path / "queue"))
    monkeypatch.setenv("FAKE_CANCELLED", str(tmp_path / "cancelled"))

    monkeypatch.setenv(PARTITION, "gpu")
    with pytest.raises(pytest.fail.Exception, match=f"{PARTITION}=gpu: sinfo knows no such"):
        next(slurm_cluster_here())

    monkeypatch.setenv(PARTITION, "debug")
    cluster = slurm_cluster_here()
    debug = next(cluster)
    prefix = debug.jobname_prefix
    assert debug.partition == "debug" and prefix.startswith("smalltalk-test-")
    options = debug.snakemake_options()
    assert options == ["--slurm-jobname-prefix", prefix, "--config", "cluster={partition: debug}"]
    assert debug.workdir(tmp_path) == tmp_path / "shared" / prefix / "slurm"
    queue = [f"101 {prefix}_0f3c", "102 smalltalk_0f3c", "103 someone else's", f"104 {prefix}_1"]
    (tmp_path / "queue").write_text("\n".join(queue) + "\n")
    assert next(cluster, None) is None  # the fixture's teardown
    assert (tmp_path / "cancelled").read_text() == "101 104\n"
    assert theirs.read_text() == "ClusterName=theirs\n"


def same_outputs(reference: Path, other: Path) -> list[str]:
    """Relative paths of the results that differ: tables, the shard check and the tokenizer
    byte for byte (not metrics.parquet: it holds wall-clock throughput), weights tensor by
    tensor (their files' byte layout may differ)."""
    differing = []
    for path in sorted(reference.rglob("*")):
        relative = path.relative_to(reference)
        twin = other / relative
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as mine, safe_open(twin, "pt") as theirs:
                names = mine.keys()
                equal = set(names) == set(theirs.keys()) and all(
                    mine.get_tensor(name).equal(theirs.get_tensor(name)) for name in names
                )
        elif (path.suffix == ".parquet" and path.name != "metrics.parquet") or path.name in (
            "check.json",
            "summary.tsv",
            "spm.model",
        ):
            equal = twin.is_file() and twin.read_bytes() == path.read_bytes()
        else:
            continue
        if not equal:
            differing.append(str(relative))
    return differing


@pytest.mark.slow
@pytest.mark.slurm
def test_tiny_config_through_slurm_equals_a_local_run(tmp_path, slurm_cluster):
    local, cluster = tmp_path / "local", slurm_cluster.workdir(tmp_path)
    local.mkdir()
    configs = ("--configfile", str(TINY), str(CPU_ONLY))
    # The local reference runs while the SLURM run mostly waits for the queue.
    with ThreadPoolExecutor(max_workers=1) as pool:
        reference = pool.submit(snakemake, local, "--cores", "2", *configs)
        result = snakemake_on_slurm(cluster, slurm_cluster, *configs)
        local_run = reference.result()
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]

    # Every job but the target went through sbatch, and SLURM ran it: the logs SLURM wrote,
    # one per job id, hold the jobs' own Snakemake runs (a router's training and scoring
    # share one SLURM job: the profile groups them).
    finished = re.compile(r"Finished jobid: \S+ \(Rule: (\w+)\)")
    jobs = Counter(finished.findall(local_run.stdout + local_run.stderr))
    del jobs["all"]
    output = result.stdout + result.stderr
    submitted = re.findall(r"Job \S+ has been submitted with SLURM jobid (\d+)", output)
    assert len(set(submitted)) == len(submitted) > 30
    logs = cluster / ".snakemake" / "slurm_logs"
    slurm_logs = {path.stem: path for path in logs.rglob("*.log")}  # {job id}.log
    ran = Counter(  # (the job step's Snakemake and the one it starts both report each job)
        rule
        for job_id in submitted
        for rule in set(finished.findall(slurm_logs[job_id].read_text()))
    )
    assert ran == jobs

    differing = same_outputs(local / "results" / "tiny", cluster / "results" / "tiny")
    assert differing == []
    assert (cluster / "results" / "tiny" / "report" / "results.html").is_file()


def write_rpv2_corpus(root: Path) -> None:
    """A few RedPajama-V2 document files ({snapshot}/{shard}/{lang}_{partition}.json.gz),
    with the tail partition and another language the recipes must leave out."""
    for snapshot in ("2023-06", "2023-14"):
        for shard in ("0000", "0001"):
            for name in ("en_head", "en_middle", "en_tail", "de_head"):
                path = root / snapshot / shard / f"{name}.json.gz"
                path.parent.mkdir(parents=True, exist_ok=True)
                record = {"raw_content": f"a {name} document", "doc_id": f"{snapshot}/{shard}/0"}
                path.write_bytes(gzip.compress(json.dumps(record).encode() + b"\n", mtime=0))


@pytest.mark.parametrize(
    ("size", "experts"),
    [("335m", 4), ("335m", 8), ("335m", 16), ("335m", 32), ("1.3b", 4), ("1.3b", 16), ("1.3b", 32)],
)
def test_rpv2_recipes_give_the_paper_setups(size, experts):
    """Every setup of the paper's Table 2, as the recipes stack over config.yaml, is valid."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    names = ["rpv2-335m.yaml"] + (["rpv2-1.3b.yaml"] if size == "1.3b" else [])
    names += [f"experts-{experts}.yaml"] if experts != 4 else []
    for name in names:
        update_config(config, yaml.safe_load((RECIPES / name).read_text()))
    config = validate_config(config)
    assert (config["seq_len"], config["routing"]["prefix_len"]) == (1024, 256)
    assert config["routing"]["n_experts"] == experts
    # App. A.4: each router passes once over its share of N between two exchanges of scores.
    assert config["routing"]["sequences_per_round"] == experts * 1373 * 32
    assert config["models"]["expert"]["preset"] == f"expert-{size}"
    # The sizes of Table 1, whatever the demo's config.yaml overrides beneath the recipe.
    presets = {"router": "router-4.4m", "expert": f"expert-{size}"}
    for role, preset in presets.items():
        assert model_config(config, role, vocab_size=32000) == dataclasses.replace(
            PRESETS[preset], vocab_size=32000, seq_len=1024
        ), role
    assert config["training"]["baselines"] == []
    expert = config["training"]["expert"]
    assert (expert["steps"], expert["batch_size"]) == (
        {"335m": 256_000, "1.3b": 512_000}[size],
        128,
    )


def test_rpv2_recipe_dry_run_plans_the_dag_with_gpu_requests(tmp_path):
    experts = 4  # the recipe's E
    write_rpv2_corpus(tmp_path / "data" / "rpv2")
    (tmp_path / "config.yaml").symlink_to(REPO / "config.yaml")
    result = subprocess.run(
        [
            str(BIN / "snakemake"),
            "--profile",
            "slurm",  # as typed at the repo root
            "-n",
            "--directory",
            str(tmp_path),
            "--configfile",
            str(RECIPES / "rpv2-335m.yaml"),
            "--config",
            "files_per_chunk=2",
            "cluster={partition: cpu, gpu_partition: gpu, account: smalltalk}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, re.MULTILINE))
    rounds = 93  # 128k router steps, scores exchanged every 1,373 (App. A.4)
    # 2 snapshots x 2 shards x {head, middle} in chunks of 2 files: 4 chunks.
    assert counts["tokenize_chunk"] == counts["shard_chunk"] == "4"
    # Evaluation in parts of up to 16 chunks: one here, routed by each router, scored by each
    # expert and the dense model, merged once.
    assert counts["evaluate_part"] == "1"
    assert counts["route_eval_part"] == str(experts)
    assert counts["score_eval_part"] == str(experts + 1)
    assert counts["train_router"] == counts["score_router"] == str(rounds * experts)
    assert counts["assign_round"] == str(rounds)
    assert counts["train_expert"] == str(experts)

    jobs = planned_jobs(result.stdout)
    expert = jobs["train_expert"]
    assert "gpu=8" in expert and "slurm_partition=gpu" in expert
    assert "slurm_account=smalltalk" in expert and "runtime=2880" in expert
    # 8 GPUs: 8 processes under torchrun, sharing the job's 64 CPUs.
    assert "torchrun --standalone --nproc-per-node 8 -m smalltalk train" in expert
    assert "--threads 8 " in expert
    cpu_rules = ("tokenize_chunk", "sample_em_blocks", "assign_round", "check_shards")
    for rule in (*cpu_rules, "evaluate_part"):
        assert "gpu=" not in jobs[rule] and "slurm_partition=cpu" in jobs[rule], rule
    for rule in ("train_router", "score_router", "shard_chunk", "route_eval_part"):
        assert "gpu=1" in jobs[rule] and "slurm_partition=gpu" in jobs[rule], rule
    assert "slurm_partition=gpu" in jobs["score_eval_part"]
    # The profile groups each router's training and scoring into one SLURM job per round.
    assert f"Group job router_r{rounds}_e{experts - 1} " in result.stdout


def planned_jobs(dry_run: str) -> dict[str, str]:
    """Rule name: the last planned job of that rule, as a dry run prints it (resources, shell)."""
    return {
        match.group(1): match.group(2)
        for match in re.finditer(
            r"^ *(?:rule|checkpoint) (\w+):\n(.*?)(?=^ *\[|^Job stats)",
            dry_run,
            re.MULTILINE | re.DOTALL,
        )
    }


def test_cpu_only_switch_asks_for_no_gpu(tmp_path):
    result = snakemake(
        tmp_path,
        "-n",
        "--profile",
        str(PROFILE),
        "--configfile",
        str(TINY),
        str(CPU_ONLY),
        "--config",
        "cluster={partition: cpu, gpu_partition: gpu}",
    )
    jobs = planned_jobs(result.stdout)
    assert "train_expert" in jobs and "torchrun" not in result.stdout
    for rule, job in jobs.items():  # every rule's requests come from the `cluster` section
        if rule != "all":
            assert "gpu=" not in job and "slurm_partition=cpu" in job, rule
