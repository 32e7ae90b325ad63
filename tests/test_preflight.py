"""The SLURM pre-flight check: what jobs ask for against what sinfo says the partitions offer."""

from __future__ import annotations

import os

import pytest

from smalltalk.preflight import (
    ClusterError,
    Nodes,
    Request,
    check_partitions,
    parse_sinfo,
    unmet_requests,
)

# `sinfo --noheader --format=%P|%c|%m|%G` on a small cluster: a default CPU partition with two
# node types, a GPU partition, and a debug partition of 2-CPU nodes.
SINFO = """\
cpu*|64|257000|(null)
cpu*|128|515000+|(null)
gpu|32|257000|gpu:a100:4(S:0-1)
gpu|64|515000|gpu:h100:8(S:0-3),shard:16
debug|2|3900|(null)
"""


def test_sinfo_lines_become_node_groups_with_gpus_by_type():
    nodes = parse_sinfo(SINFO)
    assert nodes[0] == Nodes(partition="cpu", default=True, cpus=64, mem_mb=257000, gpus={})
    assert nodes[1].mem_mb == 515000  # the + of differing nodes: at least this much
    assert nodes[3] == Nodes(
        partition="gpu", default=False, cpus=64, mem_mb=515000, gpus={"h100": 8}
    )
    assert parse_sinfo("p|8|1000|gpu:2,gpu:v100:1\n")[0].gpus == {"": 2, "v100": 1}


def test_a_tokenizer_asking_for_more_cpus_than_debug_nodes_have_is_named():
    requests = {
        "train_tokenizer": [Request(partition="debug", cpus=4, mem_mb=2000)],
        "tokenize_chunk": [Request(partition="debug", cpus=1, mem_mb=2000)],
    }
    (problem,) = unmet_requests(requests, parse_sinfo(SINFO))
    assert problem.startswith("train_tokenizer: asks for 4 CPUs, 2000 MB on 'debug'")
    assert "2 CPUs, 3900 MB" in problem


def test_requests_some_node_of_their_partition_meets_pass():
    requests = {
        "tokenize_chunk": [Request(partition=None, cpus=100, mem_mb=500000)],  # default: cpu
        "train_expert": [Request(partition="gpu", cpus=32, mem_mb=200000, gpus=8)],
        "train_router": [Request(partition="gpu", cpus=8, gpus=4, gpu_model="a100")],
    }
    assert unmet_requests(requests, parse_sinfo(SINFO)) == []


def test_memory_gpus_of_a_model_and_unknown_partitions_are_each_checked():
    requests = {
        "fit_router": [Request(partition=None, cpus=1, mem_mb=600000)],
        "train_dense": [Request(partition="gpu", cpus=8, gpus=8, gpu_model="a100")],
        "evaluate_chunk": [Request(partition="gpus", cpus=1, gpus=1)],
    }
    problems = unmet_requests(requests, parse_sinfo(SINFO))
    assert [problem.split(":")[0] for problem in problems] == [
        "evaluate_chunk",
        "fit_router",
        "train_dense",
    ]
    assert "partition 'gpus'; sinfo lists ['cpu', 'debug', 'gpu']" in problems[0]
    assert "8 a100 GPUs on 'gpu'" in problems[2]


def fake_sinfo(folder, script, monkeypatch):
    folder.mkdir()
    (folder / "sinfo").write_text(f"#!/bin/sh\n{script}\n")
    (folder / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")


def test_check_partitions_reads_sinfo_and_stops_with_every_problem(tmp_path, monkeypatch):
    fake_sinfo(tmp_path / "bin", f"cat <<'EOF'\n{SINFO}EOF", monkeypatch)
    check_partitions({"tokenize_chunk": [Request(partition="debug", cpus=2)]})
    with pytest.raises(ClusterError, match="train_tokenizer: asks for 4 CPUs on 'debug'"):
        check_partitions({"train_tokenizer": [Request(partition="debug", cpus=4)]})


def test_a_failing_sinfo_stops_the_run_with_its_message(tmp_path, monkeypatch):
    fake_sinfo(
        tmp_path / "bin", "echo 'Unable to contact slurm controller' >&2; exit 1", monkeypatch
    )
    with pytest.raises(ClusterError, match="Unable to contact slurm controller"):
        check_partitions({"tokenize_chunk": [Request(partition="debug", cpus=1)]})
