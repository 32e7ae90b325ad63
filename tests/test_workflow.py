"""The real Snakemake DAG: lint, formatting, dry runs, and the tiny config end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, make_records, write_jsonl

BIN = Path(sys.executable).parent
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    """The repo's workflow run in `workdir`, which sees the repo's data/ and config.yaml."""
    for name in ("data", "config.yaml"):
        if not (workdir / name).exists():
            (workdir / name).symlink_to(REPO / name)
    return [
        str(BIN / "snakemake"),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        *args,
    ]


SNAKEMAKE_ENV = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}"}


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the repo's workflow in `workdir`, which sees the repo's data/ and config.yaml."""
    result = subprocess.run(
        snakemake_command(workdir, *args), capture_output=True, text=True, env=SNAKEMAKE_ENV
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        )
    return result


def test_lint_is_clean(tmp_path):
    result = snakemake(tmp_path, "--lint")
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_snakefmt_is_clean():
    files = [str(REPO / "Snakefile"), *map(str, sorted((REPO / "rules").glob("*.smk")))]
    result = subprocess.run([str(BIN / "snakefmt"), "--check", *files], capture_output=True)
    assert result.returncode == 0, result.stderr.decode()


@pytest.mark.parametrize(
    "configfile", [None, *sorted((REPO / "tests" / "configs").glob("*.yaml"))], ids=str
)
def test_dry_run(tmp_path, configfile):
    args = ["-n", "--cores", "2"] + (["--configfile", str(configfile)] if configfile else [])
    result = snakemake(tmp_path, *args)
    assert "tokenize_chunk" in result.stdout


def test_bad_config_stops_before_any_job(tmp_path):
    result = snakemake(
        tmp_path,
        "--cores",
        "1",
        "--config",
        "seq_len=16",
        "files_per_chunk=0",
        check=False,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    # Both problems at once, each with its key: M=32 from config.yaml is not below S=16.
    assert "routing.prefix_len: the routing prefix M=32 must be shorter than seq_len S=16" in output
    assert "files_per_chunk: 0 is less than the minimum of 1" in output
    assert not (tmp_path / "results" / "tokens").exists()


def test_a_key_given_twice_in_a_config_file_stops_the_run(tmp_path):
    overlay = tmp_path / "twice.yaml"
    overlay.write_text("seq_len: 64\nseq_len: 128\n")
    result = snakemake(tmp_path, "-n", "--configfile", str(overlay), check=False)
    assert result.returncode != 0
    assert f"{overlay}: not valid YAML: duplicate key 'seq_len'" in result.stdout + result.stderr


def test_inputs_override_points_the_dag_at_another_corpus(tmp_path):
    corpus = tmp_path / "other"
    corpus.mkdir()
    for index in range(5):
        write_jsonl(corpus / f"part-{index}.jsonl.gz", make_records(10, seed=index))
    result = snakemake(
        tmp_path,
        "-n",
        "--cores",
        "1",
        "--config",
        f"inputs=['{corpus}/*.jsonl.gz']",
        "files_per_chunk=2",
    )
    assert "tokenize_chunk" in result.stdout
    # Five files in chunks of two: three tokenize jobs.
    jobs = [
        line for line in result.stdout.splitlines() if line.strip().startswith("tokenize_chunk")
    ]
    assert jobs and jobs[0].split()[-1] == "3"


def test_the_tokenizer_asks_for_what_the_cluster_section_gives_it(tmp_path):
    overlay = tmp_path / "cluster.yaml"
    overlay.write_text("cluster:\n  tokenizer: {cpus: 3, mem_mb: 1234, runtime: 7}\n")
    plan = snakemake(tmp_path, "-n", "--cores", "4", "--configfile", str(TINY), str(overlay))
    job = plan.stdout.split("rule train_tokenizer:")[1].split("Shell command")[0]
    assert "threads: 3" in job
    assert "runtime=7" in job and "mem_mb=1234" in job


def test_every_gpu_job_takes_gpus_no_other_job_holds(tmp_path):
    """On one machine of several GPUs each job asking for some is started by smalltalk.devices
    (tests/test_devices.py); granted two, training still runs one process per GPU."""
    overrides = ("--set-resources", "train_expert:gpu=2")
    plan = snakemake(tmp_path, "-n", "--cores", "4", "--configfile", str(TINY), *overrides)
    commands = re.findall(r"^Shell command: (.*)$", plan.stdout, re.MULTILINE)
    gpu_commands = r"-m smalltalk (train|score|shard|evaluate|lm-eval|route-validation) "
    gpu_jobs = [command for command in commands if re.search(gpu_commands, command)]
    assert len(gpu_jobs) > 5
    pool = "python -m smalltalk.devices --gpus "
    assert all(command.startswith(pool) for command in gpu_jobs), gpu_jobs
    assert any(c.startswith(pool + "1 -- python -m smalltalk train --config") for c in gpu_jobs)
    expert = pool + "2 -- torchrun --standalone --nproc-per-node 2 -m smalltalk train"
    assert any(command.startswith(expert) for command in gpu_jobs)


@pytest.mark.slow
def test_tiny_config_end_to_end(tmp_path):
    snakemake(tmp_path, "--cores", "2", "--configfile", str(TINY))
    results = tmp_path / "results" / "tiny"
    summary = (results / "tokens" / "summary.tsv").read_text().splitlines()
    assert summary[0].split("\t")[:3] == ["split", "chunks", "documents"]
    for chunk in ("c00000", "c00001"):
        for split in ("train", "val", "test"):
            table = pq.read_table(results / "tokens" / split / f"{chunk}.parquet")
            assert table.column_names == ["seq_id", "tokens", "source"]
        assert (results / "logs" / "tokenize" / f"{chunk}.log").exists()
        assert (results / "benchmarks" / "tokenize" / f"{chunk}.tsv").exists()
    train = pq.read_table(results / "tokens" / "train")
    assert len(set(train.column("source").to_pylist())) >= 6
    # EM and sharding: every train sequence in exactly one shard, one diagnostics row per round.
    check = json.loads((results / "segmentation" / "check.json").read_text())
    assert check["ok"] and check["shard_rows"] == train.num_rows
    diagnostics = pq.read_table(results / "routers" / "diagnostics.parquet")
    assert diagnostics.column("round").to_pylist() == [0, 1, 2]
    ledger = pq.read_table(results / "ledger" / "communication.parquet").to_pylist()
    assert any(row["stage"] == "sharding" for row in ledger)
    # Equal training FLOPs: the dense baseline sees as many tokens as all experts together.
    experts = [json.loads((results / f"experts/e{e}/summary.json").read_text()) for e in (0, 1)]
    dense = json.loads((results / "dense" / "summary.json").read_text())
    assert dense["tokens"] == sum(summary["tokens"] for summary in experts) > 0
    assert dense["flops"] == sum(summary["flops"] for summary in experts)
    overall = pq.read_table(results / "eval" / "summary" / "overall.parquet").to_pylist()
    assert {row["prefix_len"] for row in overall} == {8, 16}
    verdicts = {"mixture better", "dense better", "no difference (CI contains 1)"}
    for row in overall:  # every ratio to dense comes with its interval, in words too
        assert row["ratio_ci_low"] <= row["ratio"] <= row["ratio_ci_high"]
        assert row["verdict"] in verdicts
        assert row["verdict_topk"].replace("top-k", "mixture") in verdicts
    # The dense baselines on the mixture's whole training FLOPs, routers included: at least
    # that much, and less than one more step; the mixture's ratio to each, in words too.
    ledger = pq.read_table(results / "ledger" / "flops.parquet").to_pylist()
    costs = {row["component"]: row["flops"] for row in ledger if row["phase"] == "training"}
    mixture = costs["mixture total (Eq. 12)"]
    assert mixture > costs["experts (Eq. 15)"] == costs["dense baseline (Eq. 10)"]
    budget = json.loads((results / "baselines" / "budget.json").read_text())
    assert budget["mixture_flops"] == pytest.approx(mixture)
    for name, component in [
        ("dense_compute", "dense, compute-matched (Eq. 10)"),
        ("dense_large", "dense, larger (Eq. 10)"),
    ]:
        steps = budget["baselines"][name]["steps"]
        assert costs[component] * (steps - 1) / steps < mixture <= costs[component]
        for row in overall:
            assert row[f"ratio_{name}_ci_low"] <= row[f"ratio_{name}"]
            assert row[f"ratio_{name}"] <= row[f"ratio_{name}_ci_high"]
            assert row[f"verdict_{name}"].endswith(("better", "(CI contains 1)"))
    # The trained mixture answers an offline lm-eval task, next to the dense baseline.
    harness = pq.read_table(results / "harness" / "scores.parquet").to_pylist()
    assert {row["model"] for row in harness if row["metric"] == "acc"} == {"mixture", "dense"}
    # A finished run leaves nothing to do.
    again = snakemake(tmp_path, "-n", "--cores", "2", "--configfile", str(TINY))
    assert "Nothing to be done" in again.stdout + again.stderr
    # Same config and seed: the same tokens, assignments, shards and weights, byte for byte.
    kept = {
        path.relative_to(results): path.read_bytes()
        for folder in ("tokens", "routers", "shards")
        for path in (results / folder).rglob("*.parquet")
        if path.name != "metrics.parquet"  # holds wall-clock throughput
    }
    kept |= {
        path.relative_to(results): path.read_bytes() for path in results.rglob("*.safetensors")
    }
    snakemake(tmp_path, "--cores", "2", "--configfile", str(TINY), "--forceall")
    for relative, content in kept.items():
        assert (results / relative).read_bytes() == content, relative

    # The report: one self-contained HTML file with every figure.
    report = tmp_path / "report.html"
    snakemake(tmp_path, "--cores", "1", "--configfile", str(TINY), "--report", str(report))
    html = report.read_text()
    for figure in ("perplexity_vs_flops", "em_convergence", "segment_perplexity", "harness"):
        assert figure in html
    assert '<script src="http' not in html

    # Retraining one expert rebuilds only what depends on it; the others stay as they were.
    def snapshot(folder):
        return {
            path: (path.stat().st_mtime_ns, path.read_bytes())
            for path in folder.rglob("*")
            if path.is_file()
        }

    untouched = snapshot(results / "experts" / "e0") | snapshot(results / "dense")
    untouched |= snapshot(results / "shards") | snapshot(results / "routers")
    retrained = results / "experts" / "e1" / "model.safetensors"
    before = retrained.stat().st_mtime_ns
    target = str(retrained.relative_to(tmp_path))
    # Per-expert evaluation: a re-run of one expert schedules its scores of each test part, the
    # merges and what reads them; no router, no other expert and no dense model score anything.
    plan = snakemake(
        tmp_path, "-n", "--cores", "2", "--forcerun", target, "--configfile", str(TINY)
    )
    counts = job_counts(plan.stdout)
    assert counts["train_expert"] == counts["score_eval_part"] == counts["evaluate_part"] == 1
    assert not {"route_eval_part", "train_dense", "train_router", "shard_chunk"} & set(counts)
    assert re.findall(r"wildcards: split=test, model=(\w+), part=", plan.stdout) == ["e1"]
    snakemake(
        tmp_path, target, "--cores", "2", "--configfile", str(TINY), "--forcerun", "train_expert"
    )
    assert retrained.stat().st_mtime_ns > before
    # Trained again from step 0, not resumed from the checkpoint the first training left.
    retrained_summary = json.loads((results / "experts" / "e1" / "summary.json").read_text())
    assert retrained_summary["resumed_from_step"] == 0
    assert "not resuming" in (results / "logs" / "experts" / "e1.log").read_text()
    rerun = snakemake(tmp_path, "--cores", "2", "--configfile", str(TINY))
    assert "train_expert" not in rerun.stdout + rerun.stderr
    assert "train_dense" not in rerun.stdout + rerun.stderr
    for path, state in untouched.items():
        assert (path.stat().st_mtime_ns, path.read_bytes()) == state, path

    # Grow: a new corpus gets its own router and expert; nothing trained before changes.
    untouched = snapshot(results / "experts") | snapshot(results / "dense")
    untouched |= snapshot(results / "shards") | snapshot(results / "routers")
    untouched |= snapshot(results / "tokens" / "train")
    grow = tmp_path / "grow.yaml"
    grow.write_text(
        yaml.safe_dump({"grow": [{"name": "docs", "inputs": ["data/docs/docs-000.jsonl.zst"]}]})
    )
    plan = snakemake(tmp_path, "-n", "--cores", "2", "--configfile", str(TINY), str(grow))
    counts = job_counts(plan.stdout)
    assert counts["train_expert"] == counts["train_grown_router"] == 1
    assert not {"train_router", "shard_chunk", "train_dense"} & set(counts)
    # The new expert scores the old part; every model scores the new corpus's part: 3 experts,
    # the dense model and the 2 dense baselines on the mixture's budget.
    assert counts["score_eval_part"] == 1 + 6 and counts["route_eval_part"] == 1 + 3
    snakemake(tmp_path, "--cores", "2", "--configfile", str(TINY), str(grow))
    for path, state in untouched.items():
        assert (path.stat().st_mtime_ns, path.read_bytes()) == state, path
    for path in ("routers/final/e2.safetensors", "experts/e2/model.safetensors"):
        assert (results / path).is_file(), path
    assert (results / "tokens" / "test" / "g0c00000.parquet").is_file()
    table = pq.read_table(results / "eval" / "summary" / "grow.parquet").to_pylist()
    rows = {(row["corpus"], row["source"]): row for row in table}
    assert rows[("docs", "all")]["to_own"] > 0
    assert rows[("run", "all")]["to_own"] is None
    assert rows[("all", "all")]["sequences"] == sum(
        row["sequences"] for (corpus, source), row in rows.items() if source == "all" != corpus
    )
    assert "Grown: after against before" in (results / "report" / "results.html").read_text()
    import smalltalk

    mixture = smalltalk.load(results)
    assert mixture.experts == (0, 1, 2)
    text = "def main(argv):\n    return 0"
    assert len(mixture.route(text).router_nll) == 3
    # An export of the grown mixture holds the grown expert and routes as the results do.
    from smalltalk.export import export_mixture

    export_mixture(results, tmp_path / "export")
    exported = smalltalk.load(tmp_path / "export")
    assert exported.experts == (0, 1, 2)
    assert exported.route(text).router_nll == mixture.route(text).router_nll
    card = (tmp_path / "export" / "README.md").read_text()
    assert "data/docs/docs-000.jsonl.zst" in card
    again = snakemake(tmp_path, "-n", "--cores", "2", "--configfile", str(TINY), str(grow))
    assert "Nothing to be done" in again.stdout + again.stderr


def job_counts(dry_run: str) -> dict[str, int]:
    """Rule name: jobs planned, from a dry run's job stats."""
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", dry_run, re.MULTILINE))
    return {rule: int(count) for rule, count in counts.items() if rule not in ("total", "count")}


# A results folder and corpus files named so that an unquoted shell command would split them
# into several arguments or run the command hidden in them.
ODD_RESULTS = 'results/my "tiny" run;touch pwned;#'
ODD_CORPUS = ("it's part 0.jsonl.zst", '"part" 1;touch pwned-1;#.jsonl.zst')


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
    """The tiny config run to the end with ODD_RESULTS and ODD_CORPUS: (workdir, results)."""
    workdir = tmp_path_factory.mktemp("odd")
    corpus = workdir / "corpus"
    corpus.mkdir()
    for demo, name in zip(("demo-000", "demo-001"), ODD_CORPUS, strict=True):
        shutil.copy(REPO / "data" / "demo" / f"{demo}.jsonl.zst", corpus / name)
    overlay = workdir / "odd.yaml"
    overlay.write_text(
        yaml.safe_dump({"results": ODD_RESULTS, "inputs": [str(corpus / "*.jsonl.zst")]})
    )
    snakemake(workdir, "--cores", "2", "--configfile", str(TINY), str(overlay))
    return workdir, workdir / ODD_RESULTS


def odd_config_args(workdir: Path) -> list[str]:
    return ["--configfile", str(TINY), str(workdir / "odd.yaml")]


@pytest.mark.slow
def test_paths_with_spaces_quotes_and_semicolons_reach_every_job_as_one_argument(odd_run):
    workdir, results = odd_run
    assert not [path for path in workdir.rglob("pwned*")]
    assert not (workdir / "results" / "my").exists()
    assert json.loads((results / "segmentation" / "check.json").read_text())["ok"]
    for path in ("experts/e1/model.safetensors", "report/results.html", "report/ledger.html"):
        assert (results / path).is_file(), path
    tokens = pq.read_table(results / "tokens" / "train")
    assert tokens.num_rows > 0


@pytest.mark.slow
def test_a_dry_run_with_other_overrides_leaves_the_runs_config_untouched(odd_run):
    workdir, results = odd_run
    config = results / "config.yaml"
    before = (config.read_bytes(), config.stat().st_mtime_ns)
    plan = snakemake(
        workdir, "-n", "--cores", "2", *odd_config_args(workdir), "--config", "seed=999"
    )
    assert "train_tokenizer" in plan.stdout  # the change is seen, and would re-run the jobs
    assert (config.read_bytes(), config.stat().st_mtime_ns) == before
    assert yaml.safe_load(config.read_text())["seed"] != 999


@pytest.mark.slow
def test_a_changed_setting_re_runs_the_jobs_that_use_it_and_no_others(odd_run, tmp_path):
    """Every job reads the run's config file, but a new evaluation setting must not retrain
    the models; a new seed must (a dry run sees up to the EM checkpoint)."""
    workdir, _ = odd_run
    overlay = tmp_path / "temperature.yaml"
    overlay.write_text("eval:\n  temperature: 0.5\n")
    plan = snakemake(workdir, "-n", "--cores", "2", *odd_config_args(workdir), str(overlay))
    jobs = {line.split()[0] for line in plan.stdout.splitlines() if line.strip()}
    assert {"evaluate_part", "aggregate_eval"} <= jobs
    # The ensemble's temperature is the merge's business: no model scores anything again.
    assert not jobs & {"tokenize_chunk", "train_router", "shard_chunk", "train_expert"}
    assert not jobs & {"route_eval_part", "score_eval_part"}
    plan = snakemake(
        workdir, "-n", "--cores", "2", *odd_config_args(workdir), "--config", "seed=999"
    )
    jobs = {line.split()[0] for line in plan.stdout.splitlines() if line.strip()}
    assert {"train_tokenizer", "tokenize_chunk", "sample_em_blocks", "train_router"} <= jobs


@pytest.mark.slow
def test_a_run_rebuilds_deleted_experts_that_serving_needs(odd_run):
    workdir, results = odd_run
    shutil.rmtree(results / "experts")
    plan = snakemake(workdir, "-n", "--cores", "2", *odd_config_args(workdir))
    jobs = [line.split() for line in plan.stdout.splitlines()]
    assert ["train_expert", "2"] in jobs


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The tiny config run to the end in a workdir of its own: (workdir, results). The tests
    that use it run parts of it again, and the last one leaves it finished."""
    workdir = tmp_path_factory.mktemp("finished")
    snakemake(workdir, "--cores", "2", "--configfile", str(TINY))
    return workdir, workdir / "results" / "tiny"


def start_snakemake(workdir: Path, log: Path, *args: str) -> subprocess.Popen:
    """Snakemake in the background, in a process group of its own with its jobs."""
    with open(log, "w") as output:
        return subprocess.Popen(
            snakemake_command(workdir, *args),
            stdout=output,
            stderr=subprocess.STDOUT,
            env=SNAKEMAKE_ENV,
            start_new_session=True,
        )


def wait_until_it_holds_the_run_lock(run: subprocess.Popen, results: Path, log: Path) -> None:
    from smalltalk.runlock import read_holder

    deadline = time.monotonic() + 300
    while (read_holder(results / "run.lock") or {}).get("pid") != run.pid:
        assert run.poll() is None, f"it ended first:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"it never took the lock:\n{log.read_text()}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_run_on_the_same_results_is_refused_and_the_first_keeps_its_settings(
    finished_run, tmp_path
):
    """Run A retrains the experts with other steps; run B (other targets, so Snakemake's own
    lock lets it by) would rewrite the run's config under A's jobs. B must stop, naming A."""
    workdir, results = finished_run
    overlay = tmp_path / "steps.yaml"
    overlay.write_text("training:\n  expert: {steps: 40}\n")
    config_a = ["--cores", "1", "--configfile", str(TINY), str(overlay)]
    experts = [f"results/tiny/experts/e{e}/model.safetensors" for e in (0, 1)]
    log = tmp_path / "a.log"
    run_a = start_snakemake(workdir, log, *experts, *config_a, "--forcerun", "train_expert")
    try:
        wait_until_it_holds_the_run_lock(run_a, results, log)
        # A waits mid-run however long B takes to start (its jobs go on; Snakemake itself waits).
        os.kill(run_a.pid, signal.SIGSTOP)
        started = time.monotonic()
        summary = "results/tiny/tokens/summary.tsv"
        args_b = ["--cores", "1", "--configfile", str(TINY), "--forcerun", "summarize_tokens"]
        run_b = snakemake(workdir, summary, *args_b, check=False)
        refused_after = time.monotonic() - started
        os.kill(run_a.pid, signal.SIGCONT)
        output = run_b.stdout + run_b.stderr
        assert run_b.returncode != 0, output
        assert f"is in use by another run of the workflow: process {run_a.pid} on " in output
        assert f"{socket.gethostname()}, started " in output and "Wait for that run" in output
        assert refused_after < 120  # at once: it does not wait for A
        assert "localrule summarize_tokens" not in output  # it started nothing
        assert (
            yaml.safe_load((results / "config.yaml").read_text())["training"]["expert"]["steps"]
            == 40
        )
        assert run_a.wait(timeout=600) == 0, log.read_text()
    finally:
        if run_a.poll() is None:
            os.killpg(run_a.pid, signal.SIGKILL)
            run_a.wait()
    for e in (0, 1):  # A's experts trained as A was told
        assert json.loads((results / f"experts/e{e}/summary.json").read_text())["steps"] == 40
    from smalltalk.runlock import read_holder

    assert read_holder(results / "run.lock") is None  # given back at the end
    plan = snakemake(workdir, "-n", *experts, *config_a)
    assert "Nothing to be done" in plan.stdout + plan.stderr


@pytest.mark.slow
def test_a_run_killed_holding_the_run_lock_does_not_block_the_next(finished_run, tmp_path):
    from smalltalk.runlock import read_holder

    workdir, results = finished_run
    args = ["results/tiny/experts/e0/model.safetensors", "--cores", "1"]
    args += ["--configfile", str(TINY), "--forcerun", "train_expert"]
    log = tmp_path / "killed.log"
    killed = start_snakemake(workdir, log, *args)
    try:
        wait_until_it_holds_the_run_lock(killed, results, log)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # Snakemake and its jobs, with no clean-up
        killed.wait()
    assert read_holder(results / "run.lock")["pid"] == killed.pid  # its record stays
    snakemake(workdir, "--unlock", "--configfile", str(TINY))  # Snakemake's own lock only
    snakemake(workdir, *args)  # not refused: the kernel dropped the dead run's lock
    assert read_holder(results / "run.lock") is None


def jobs_run(output: str) -> set[str]:
    """The rules of the jobs a run started, from its log."""
    return set(re.findall(r"^(?:local)?rule (\w+):$", output, re.MULTILINE))


@pytest.mark.slow
def test_a_shard_a_killed_run_left_missing_is_rebuilt_and_checked_again_byte_for_byte(
    finished_run,
):
    """A forced re-shard killed while it shards a chunk leaves that chunk's shards removed (a
    job removes its outputs when it starts) and what read them still there, newer than all else
    they read: here, one of them deleted. A plain run must rebuild the shard, check the shards
    again and end as before; meanwhile `explain` refuses to describe the segments from the rest.
    """
    workdir, results = finished_run
    args = ["--cores", "2", "--configfile", str(TINY)]
    snakemake(workdir, *args)  # finished, whatever the tests before did to it
    kept = sharded_and_trained(results)
    missing = results / "shards" / "expert=1" / "c00001.parquet"
    missing.unlink()

    explain = [str(BIN / "python"), "-m", "smalltalk", "explain", "--results", str(results)]
    refused = subprocess.run([*explain, "def main():"], capture_output=True, text=True)
    assert refused.returncode == 1 and not refused.stdout
    assert f"{missing}: missing, though {results / 'segmentation' / 'check.json'} lists it" in (
        refused.stderr
    )

    rerun = snakemake(workdir, *args)
    assert {"shard_chunk", "check_shards"} <= jobs_run(rerun.stdout + rerun.stderr)
    for path, content in kept.items():
        assert path.read_bytes() == content, path
    again = snakemake(workdir, "-n", *args)
    assert "Nothing to be done" in again.stdout + again.stderr
    assert subprocess.run([*explain, "def main():"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_forced_re_shard_killed_midway_resumes_to_the_same_results(finished_run, tmp_path):
    """The kill itself (kill -9 of Snakemake and its jobs), then `--unlock` and a plain run: it
    must re-shard, check the shards and end byte for byte where the uninterrupted run would."""
    workdir, results = finished_run
    args = ["--cores", "1", "--configfile", str(TINY)]
    snakemake(workdir, *args)  # finished, whatever the tests before did to it
    kept = sharded_and_trained(results)
    shard_log = results / "logs" / "shard" / "c00001.log"
    before = shard_log.stat().st_mtime_ns
    log = tmp_path / "reshard.log"
    reshard = start_snakemake(workdir, log, *args, "--forcerun", "shard_chunk")
    try:
        deadline = time.monotonic() + 300
        while not shard_log.exists() or shard_log.stat().st_mtime_ns == before:
            assert reshard.poll() is None, f"it ended first:\n{log.read_text()}"
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        os.killpg(reshard.pid, signal.SIGKILL)  # once it has started to shard chunk c00001
        reshard.wait()
    snakemake(workdir, "--unlock", *args)
    resumed = snakemake(workdir, *args)
    assert {"shard_chunk", "check_shards"} <= jobs_run(resumed.stdout + resumed.stderr)
    for path, content in kept.items():
        assert path.read_bytes() == content, path
    again = snakemake(workdir, "-n", *args)
    assert "Nothing to be done" in again.stdout + again.stderr


def sharded_and_trained(results: Path) -> dict[Path, bytes]:
    """The shards, the shard check and the experts' weights, which the same config and seed
    make byte for byte the same (their metrics and checkpoints hold wall-clock times)."""
    kept = {
        path: path.read_bytes()
        for folder in ("shards", "segmentation", "experts")
        for path in sorted((results / folder).rglob("*"))
        if path.suffix in (".parquet", ".safetensors") or path.name == "check.json"
        if path.name != "metrics.parquet" and "ckpt" not in path.parts
    }
    assert len([path for path in kept if "shards" in path.parts]) == 4
    return kept


def test_dry_run_plans_every_em_round_only_under_the_fixed_schedule(tmp_path):
    """With routing.stop each round's diagnostics decide whether the next runs, so a fresh dry
    run plans round 1 only; with `stop: null` all T rounds are known before any has run."""

    def planned(stop: str) -> dict[str, str]:
        overlay = tmp_path / "stop.yaml"
        overlay.write_text(f"routing:\n  rounds: 3\n  stop: {stop}\n")
        args = ["-n", "--cores", "2", "--configfile", str(TINY), str(overlay)]
        result = snakemake(tmp_path, *args).stdout
        return dict(re.findall(r"^(\w+)\s+(\d+)$", result, re.MULTILINE))

    assert planned("{patience: 2}")["assign_round"] == "1"
    fixed = planned("{changed_below: null, nll_min_improvement: null}")
    assert fixed["assign_round"] == "3" and fixed["train_router"] == "6"
    assert fixed["final_routers"] == "1"


@pytest.mark.slow
def test_em_ends_at_the_round_its_stopping_rule_fires_and_later_stages_read_those_routers(
    tmp_path,
):
    """routing.rounds is the most EM may run: a rule that fires after round 2 (the routed NLL
    cannot improve by 100 nats) ends EM there, and every later stage reads routers/final/."""
    results = tmp_path / "results" / "early"
    overlay = tmp_path / "early.yaml"
    overlay.write_text(
        f"results: {results}\n"
        "routing:\n  rounds: 4\n  sequences_per_round: 256\n"
        "  stop: {changed_below: null, patience: 1, nll_min_improvement: 100}\n"
    )
    args = ["--cores", "2", "--configfile", str(TINY), str(overlay)]
    snakemake(tmp_path, *args)
    em = json.loads((results / "routers" / "final" / "em.json").read_text())
    assert em["final_round"] == 2 and em["max_rounds"] == 4
    assert em["reason"].startswith("no improvement of the mean routed NLL by 100 nats on")
    assert em["reason"].endswith("in the last round")
    assert [row["round"] for row in em["rounds"]] == [1, 2]
    assert not (results / "routers" / "r3").exists()
    diagnostics = pq.read_table(results / "routers" / "diagnostics.parquet")
    assert diagnostics.column("round").to_pylist() == [0, 1, 2]
    for e in (0, 1):
        final = (results / "routers" / "final" / f"e{e}.safetensors").read_bytes()
        assert final == (results / "routers" / "r2" / f"e{e}.safetensors").read_bytes()
    ledger = pq.read_table(results / "ledger" / "communication.parquet").column("stage")
    assert [s for s in ledger.to_pylist() if s.startswith("EM round")] == [
        "EM round 0",
        "EM round 1",
        "EM round 2",
    ]
    assert json.loads((results / "segmentation" / "check.json").read_text())["ok"]
    assert (results / "report" / "em_convergence.png").exists()
    assert (results / "eval" / "summary" / "overall.parquet").exists()
    again = snakemake(tmp_path, "-n", *args)
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.parametrize("method", ["tfidf_kmeans", "random", "source"])
def test_dry_run_of_each_baseline_routing_method_skips_the_router_em(tmp_path, method):
    overlay = tmp_path / "method.yaml"
    overlay.write_text(f"routing:\n  method: {method}\n")
    result = snakemake(
        tmp_path, "-n", "--cores", "2", "--configfile", str(TINY), str(overlay)
    ).stdout
    assert "fit_router" in result and "shard_chunk" in result and "train_expert" in result
    for em_rule in ("train_router", "score_router", "assign_round", "communication_ledger"):
        assert em_rule not in result


@pytest.mark.slow
def test_tfidf_routing_end_to_end_with_a_shared_dense_baseline(tmp_path):
    """c-BTM routing through the same shard, expert, evaluation and report stages, evaluated
    against the dense model of another run (training.dense_from), then compared with it."""
    dense_run = tmp_path / "results" / "dense-source"
    overlay = tmp_path / "dense.yaml"
    overlay.write_text(f"results: {dense_run}\nrouting:\n  method: source\n")
    snakemake(tmp_path, "--cores", "2", "--configfile", str(TINY), str(overlay))
    overlay = tmp_path / "tfidf.yaml"
    overlay.write_text(
        f"results: {tmp_path / 'results' / 'tfidf'}\nrouting:\n  method: tfidf_kmeans\n"
        f"training:\n  dense_from: {dense_run / 'dense'}\n"
    )
    result = snakemake(tmp_path, "--cores", "2", "--configfile", str(TINY), str(overlay))
    assert "train_dense" not in result.stdout + result.stderr
    results = tmp_path / "results" / "tfidf"
    assert (results / "routers" / "tfidf_kmeans.npz").exists()
    assert not list((results / "routers").glob("r*"))  # no EM rounds
    check = json.loads((results / "segmentation" / "check.json").read_text())
    assert check["ok"]
    flops = pq.read_table(results / "ledger" / "flops.parquet").to_pydict()
    costs = dict(zip(flops["component"], flops["flops"], strict=True))
    assert costs["routers: training (Eq. 13)"] == 0
    assert costs["mixture total (Eq. 12)"] == costs["experts (Eq. 15)"]
    assert costs["dense baseline (Eq. 10)"] == costs["experts (Eq. 15)"]  # equal FLOPs
    assert (results / "report" / "ledger.html").exists()
    assert not (results / "report" / "em_convergence.png").exists()

    table = tmp_path / "comparison.parquet"
    subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "smalltalk",
            "compare",
            "--run",
            f"tfidf={results}",
            "--run",
            f"source={dense_run}",
            "--out",
            str(table),
            "--figure",
            str(tmp_path / "comparison.png"),
            "--markdown",
            str(tmp_path / "comparison.md"),
        ],
        check=True,
        capture_output=True,
    )
    rows = pq.read_table(table).to_pylist()
    assert {(row["run"], row["method"]) for row in rows} == {
        ("tfidf", "tfidf_kmeans"),
        ("source", "source"),
    }
    # Both runs were evaluated against the very same dense model.
    dense = {row["prefix_len"]: row["ppl_dense"] for row in rows if row["run"] == "source"}
    assert all(row["ppl_dense"] == dense[row["prefix_len"]] for row in rows)
    markdown = (tmp_path / "comparison.md").read_text()
    assert markdown.count("\n") == 4
    assert all(row["verdict"] in markdown for row in rows if row["prefix_len"] == 16)


@pytest.mark.slow
def test_experts_branched_from_a_shared_trunk_keep_the_flops_equal(tmp_path):
    """BTM's seed phase through the real DAG: one trunk job, then the experts and the dense
    baseline go on from its checkpoint; the ledger still charges both sides the same FLOPs."""
    results = tmp_path / "results" / "branched"
    overlay = tmp_path / "branch.yaml"
    overlay.write_text(
        f"results: {results}\nrouting:\n  method: random\ntraining:\n  branch_steps: 10\n"
    )
    targets = [str(results / "ledger" / "flops.parquet")]
    snakemake(tmp_path, *targets, "--cores", "2", "--configfile", str(TINY), str(overlay))
    assert (results / "trunk" / "ckpt" / "step-00000010" / "state.pt").exists()
    for model in ("experts/e0", "experts/e1", "dense"):
        summary = json.loads((results / model / "summary.json").read_text())
        assert summary["branched_from_step"] == 10 and summary["resumed_from_step"] == 10
    dense_steps = pq.read_table(results / "dense" / "metrics.parquet").column("step").to_pylist()
    assert dense_steps[0] <= 10 < dense_steps[-1]  # the trunk's curve, then its own
    flops = pq.read_table(results / "ledger" / "flops.parquet").to_pydict()
    costs = dict(zip(flops["component"], flops["flops"], strict=True))
    assert costs["dense baseline (Eq. 10)"] == costs["experts (Eq. 15)"]


def test_the_robustness_benchmark_plans_every_corpus_and_seed_with_its_own_dense_baseline(
    tmp_path,
):
    for name in ("data", "config.yaml"):
        (tmp_path / name).symlink_to(REPO / name)
    # The benchmark's settings, but not the results.json and results.md the repo holds from a run:
    # with them in place there would be nothing to plan.
    (tmp_path / "benchmarks" / "robustness").mkdir(parents=True)
    benchmark = REPO / "benchmarks" / "robustness" / "Snakefile"
    (tmp_path / "benchmarks" / "robustness" / "config.yaml").symlink_to(
        benchmark.parent / "config.yaml"
    )
    plan = subprocess.run(
        [str(BIN / "snakemake"), "-n", "-s", str(benchmark), "--directory", str(tmp_path)]
        + ["--cores", "2", "--scheduler", "greedy"],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}"},
    )
    counts = dict(
        line.split() for line in plan.stdout.splitlines() if re.fullmatch(r"\w+\s+\d+", line)
    )
    settings = yaml.safe_load((benchmark.parent / "config.yaml").read_text())
    runs = len(settings["corpora"]) * len(settings["seeds"]) * len(settings["recipes"])
    dense = {job: n for job, n in counts.items() if job.endswith("_train_dense")}
    assert len(dense) == runs and set(dense.values()) == {"1"}
    assert counts["robustness_results"] == "1"


def test_results_pointing_at_a_file_stops_the_run_naming_the_key(tmp_path):
    (tmp_path / "not-a-folder").write_text("a file\n")
    result = snakemake(
        tmp_path, "-n", "--cores", "1", "--config", "results=not-a-folder", check=False
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "results: 'not-a-folder' is a file, not a directory for the run's results" in output
    assert "NotADirectoryError" not in output and "Traceback" not in output
