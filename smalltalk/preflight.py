"""Before a SLURM run submits anything: can every rule's jobs run on their partition at all?

A job asking for more CPUs, memory or GPUs than any node of its partition has is accepted by
sbatch and then pends forever (reason PartitionConfig or Resources). `sinfo` says what each
partition's nodes offer, so the workflow compares first and stops with every problem named.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# One line per group of like nodes: partition (the default one marked *), CPUs, memory (MB),
# generic resources (GPUs). sinfo writes a trailing + where the grouped nodes differ.
SINFO = ["sinfo", "--noheader", "--format=%P|%c|%m|%G"]


class ClusterError(RuntimeError):
    """Some jobs ask for more than their partition's nodes have; the message lists them."""


@dataclass(frozen=True, slots=True)
class Nodes:
    """A group of like nodes of one partition, as one line of SINFO output gives it."""

    partition: str
    default: bool
    cpus: int
    mem_mb: int
    gpus: Mapping[str, int]
    """GPUs per node by type ('' for GPUs listed without one)."""


@dataclass(frozen=True, slots=True)
class Request:
    """What one job asks for; partition None is the cluster's default partition."""

    partition: str | None
    cpus: int
    mem_mb: int | None = None
    gpus: int = 0
    gpu_model: str | None = None


def parse_gres(gres: str) -> dict[str, int]:
    """GPUs by type from sinfo's %G, e.g. 'gpu:a100:4(S:0-1),gpu:2' -> {'a100': 4, '': 2}."""
    gpus: dict[str, int] = {}
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] != "gpu" or len(parts) < 2 or not parts[-1].isdigit():
            continue
        kind = parts[1] if len(parts) > 2 else ""
        gpus[kind] = gpus.get(kind, 0) + int(parts[-1])
    return gpus


def parse_sinfo(text: str) -> list[Nodes]:
    """The node groups in the output of SINFO."""
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        partition, cpus, mem_mb, gres = line.strip().split("|")
        nodes.append(
            Nodes(
                partition=partition.rstrip("*"),
                default=partition.endswith("*"),
                cpus=int(cpus.rstrip("+")),
                mem_mb=int(mem_mb.rstrip("+")),
                gpus=parse_gres(gres),
            )
        )
    return nodes


def fits(request: Request, node: Nodes) -> bool:
    if request.cpus > node.cpus or (request.mem_mb or 0) > node.mem_mb:
        return False
    if request.gpu_model:
        return node.gpus.get(request.gpu_model, 0) >= request.gpus
    return sum(node.gpus.values()) >= request.gpus


def unmet_requests(requests: Mapping[str, Iterable[Request]], nodes: list[Nodes]) -> list[str]:
    """A line for each distinct request no node of its partition can meet, by rule name."""
    partitions = sorted({node.partition for node in nodes})
    default = next((node.partition for node in nodes if node.default), None)
    problems = []
    for rule, rule_requests in sorted(requests.items()):
        for request in sorted(set(rule_requests), key=repr):
            partition = request.partition or default
            if partition not in partitions:
                named = (
                    f"partition {partition!r}" if partition else "no partition, and none is default"
                )
                problems.append(f"{rule}: asks for {named}; sinfo lists {partitions}")
                continue
            offered = [node for node in nodes if node.partition == partition]
            if not any(fits(request, node) for node in offered):
                problems.append(
                    f"{rule}: asks for {_describe(request)} on {partition!r}, "
                    f"whose nodes have {', '.join(map(_describe_node, offered))}"
                )
    return problems


def _describe(request: Request) -> str:
    text = _count(request.cpus, "CPU")
    if request.mem_mb:
        text += f", {request.mem_mb} MB"
    if request.gpus:
        text += ", " + _count(request.gpus, f"{request.gpu_model or ''} GPU".strip())
    return text


def _describe_node(node: Nodes) -> str:
    gpus = " + ".join(_count(n, f"{kind} GPU".strip()) for kind, n in node.gpus.items())
    return f"{_count(node.cpus, 'CPU')}, {node.mem_mb} MB" + (f", {gpus}" if gpus else "")


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


def check_partitions(requests: Mapping[str, Iterable[Request]]) -> None:
    """Raise ClusterError listing every rule whose jobs could never start on this cluster."""
    try:
        output = subprocess.run(SINFO, capture_output=True, text=True, check=True).stdout
    except OSError as error:
        raise ClusterError(f"cannot ask SLURM what its partitions offer: {error}") from None
    except subprocess.CalledProcessError as error:
        raise ClusterError(
            f"cannot ask SLURM what its partitions offer: {error.stderr.strip() or error}"
        ) from None
    problems = unmet_requests(requests, parse_sinfo(output))
    if problems:
        raise ClusterError(
            "these jobs would wait in the SLURM queue forever; lower their requests (the "
            "config's `cluster` section, --set-threads, --set-resources) or choose another "
            "partition:\n  " + "\n  ".join(problems)
        )
