"""Router EM (paper §2.2, Algorithm 1) as files that independent jobs exchange.

Round 0 assigns a fresh block of N sequences at random; in round r = 1..T each router e
trains on the sequences of block r-1 assigned to it, continuing from its round r-1 weights,
then scores the prefixes of block r on its own. The gather job turns the E score vectors into
a balanced assignment (§2.2, Fig. 1). Score vectors are the only thing routers exchange.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from smalltalk.files import (
    write_bytes_atomically,
    write_parquet_atomically,
    write_text_atomically,
)
from smalltalk.model import LM
from smalltalk.routers import decode_prefixes, fit_tfidf_kmeans
from smalltalk.routing import balanced_assign, random_balanced_assign, route
from smalltalk.scoring import prefix_nll
from smalltalk.tokens import gather_rows, sample_seq_ids, token_matrix

# --------------------------------------------------------------------------- files


def sample_blocks(
    *,
    train_files: Sequence[str | os.PathLike],
    block_paths: Sequence[str | os.PathLike],
    block_size: int,
    probe_files: Sequence[str | os.PathLike],
    probe_path: str | os.PathLike,
    probe_size: int,
    seed: int,
) -> list[int]:
    """Draw the EM blocks: len(block_paths) disjoint blocks of `block_size` train sequences
    (Algorithm 1's 'N new sequences' per round) plus a fixed probe set of validation sequences
    that every round's routers score, for diagnostics. Reads one row group at a time.
    Returns the block sizes."""
    needed = len(block_paths) * block_size
    chosen = sample_seq_ids(train_files, needed, seed)
    if len(chosen) < needed:
        raise ValueError(
            f"EM needs routing.rounds + 1 = {len(block_paths)} blocks of "
            f"routing.sequences_per_round = {block_size} train sequences, but the sampled "
            f"chunks hold only {len(chosen)}: lower either or raise routing.em_chunks"
        )
    block_of = dict(zip(chosen.tolist(), (np.arange(needed) // block_size).tolist(), strict=True))
    gather_rows(train_files, block_of, block_paths)
    probe = sample_seq_ids(probe_files, probe_size, seed + 1) if probe_size else np.empty(0)
    gather_rows(probe_files, dict.fromkeys(probe.tolist(), 0), [probe_path])
    return [block_size] * len(block_paths)


# --------------------------------------------------------------------------- scoring


def score_file(
    model: LM, tokens_path: str | os.PathLike, prefix_len: int, out: str | os.PathLike
) -> Path:
    """One router's scores for one file: `seq_id`, `nll` as float16 (the paper's 2 bytes)."""
    table = pq.read_table(tokens_path, columns=["seq_id", "tokens"])
    nll = prefix_nll(model, token_matrix(table.column("tokens")), prefix_len)
    scores = pa.table(
        {
            "seq_id": table.column("seq_id"),
            "nll": pa.array(nll.astype(np.float16), type=pa.float16()),
        }
    )
    return write_parquet_atomically(scores, out)


def read_scores(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
    """Gather E score files into (seq_ids (n,), nll (n, E) float32), rows in seq_id order."""
    seq_ids, columns = None, []
    for path in paths:
        table = pq.read_table(path).sort_by("seq_id")
        ids = table.column("seq_id").to_numpy()
        if seq_ids is None:
            seq_ids = ids
        elif not np.array_equal(ids, seq_ids):
            raise ValueError(f"{path}: scores a different set of sequences than {paths[0]}")
        columns.append(table.column("nll").to_numpy().astype(np.float32))
    return seq_ids, np.stack(columns, axis=1)


# --------------------------------------------------------------------------- assignment


def assign_first_round(
    block_path: str | os.PathLike,
    n_experts: int,
    seed: int,
    out: str | os.PathLike,
    *,
    init: str = "random",
    tokenizer_model: str | os.PathLike | None = None,
    prefix_len: int | None = None,
    tfidf: Mapping | None = None,
) -> Path:
    """Round 0 (Algorithm 1, line 3): a balanced assignment of block 0, seeded random as in the
    paper (`init: random`), or c-BTM's TF-IDF balanced k-means clusters of the routing prefixes'
    text (`init: tfidf_kmeans`), which starts EM from segments that already follow content."""
    columns = ["seq_id"] if init == "random" else ["seq_id", "tokens"]
    table = pq.read_table(block_path, columns=columns).sort_by("seq_id")
    seq_ids = table.column("seq_id").to_numpy()
    if init == "random":
        experts = random_balanced_assign(len(seq_ids), n_experts, seed)
    elif init == "tfidf_kmeans":
        import sentencepiece as spm

        if tokenizer_model is None or prefix_len is None:
            raise ValueError("routing.init tfidf_kmeans needs the tokenizer and the prefix length")
        tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
        texts = decode_prefixes(tokenizer, token_matrix(table.column("tokens")), prefix_len)
        _, experts, _ = fit_tfidf_kmeans(texts, n_experts, seed=seed, **(tfidf or {}))
    else:
        raise ValueError(f"routing.init: unknown {init!r}; choose random or tfidf_kmeans")
    return write_parquet_atomically(_assignment_table(seq_ids, experts), out)


def assign_round(
    score_paths: Sequence[str | os.PathLike], out: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounds 1..T (Algorithm 1, line 9): the balanced assignment of the gathered scores."""
    seq_ids, nll = read_scores(score_paths)
    experts = balanced_assign(nll)
    write_parquet_atomically(_assignment_table(seq_ids, experts), out)
    return seq_ids, nll, experts


def _assignment_table(seq_ids: np.ndarray, experts: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "seq_id": pa.array(seq_ids, pa.int64()),
            "expert": pa.array(experts.astype(np.int16), pa.int16()),
        }
    )


def assigned_seq_ids(assignment_path: str | os.PathLike, expert: int) -> np.ndarray:
    table = pq.read_table(assignment_path)
    experts = table.column("expert").to_numpy()
    return table.column("seq_id").to_numpy()[experts == expert]


# --------------------------------------------------------------------------- diagnostics


def normalized_mutual_information(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """NMI with the arithmetic-mean normalisation (scikit-learn's default); 1 when either labelling
    is a single class and both agree, 0 for independent labellings."""
    if len(labels_a) == 0:
        return float("nan")
    _, a = np.unique(labels_a, return_inverse=True)
    _, b = np.unique(labels_b, return_inverse=True)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1)
    joint /= joint.sum()
    pa_, pb = joint.sum(axis=1), joint.sum(axis=0)
    nonzero = joint > 0
    mutual = float((joint[nonzero] * np.log(joint[nonzero] / np.outer(pa_, pb)[nonzero])).sum())
    entropy_a = -float((pa_ * np.log(pa_)).sum())
    entropy_b = -float((pb * np.log(pb)).sum())
    if entropy_a == 0 and entropy_b == 0:
        return 1.0
    denominator = (entropy_a + entropy_b) / 2
    return max(0.0, mutual / denominator) if denominator > 0 else 0.0


def round_diagnostics(
    *,
    round_index: int,
    block_path: str | os.PathLike,
    assignment_path: str | os.PathLike,
    n_experts: int,
    nll: np.ndarray | None,
    probe_path: str | os.PathLike | None = None,
    probe_scores: Sequence[str | os.PathLike] | None = None,
    previous_probe_scores: Sequence[str | os.PathLike] | None = None,
) -> tuple[pa.Table, pa.Table]:
    """One row of EM diagnostics for a round, and its segment x source contingency table.

    load_*: share of the block per expert under the balanced assignment and under argmin routing
    (no capacity, as at inference); changed: share of the probe sequences whose argmin expert
    differs from the previous round's; mean routed prefix NLL; NMI of segments against sources.
    """
    block = pq.read_table(block_path, columns=["seq_id", "source"]).sort_by("seq_id")
    assignment = pq.read_table(assignment_path).sort_by("seq_id")
    if not np.array_equal(
        block.column("seq_id").to_numpy(), assignment.column("seq_id").to_numpy()
    ):
        raise ValueError(f"{assignment_path} does not assign exactly the sequences of {block_path}")
    experts = assignment.column("expert").to_numpy().astype(np.int64)
    sources = np.asarray(block.column("source").to_pylist(), dtype=object)
    n = max(len(experts), 1)
    load = np.bincount(experts, minlength=n_experts) / n
    row: dict[str, object] = {
        "round": round_index,
        "sequences": len(experts),
        "nmi_source": normalized_mutual_information(experts, sources),
        "max_load": float(load.max()) if len(load) else math.nan,
        "mean_routed_nll": math.nan,
        "argmin_max_load": math.nan,
        "probe_nmi_source": math.nan,
        "probe_changed": math.nan,
    }
    for e in range(n_experts):
        row[f"load_e{e}"] = float(load[e])
    if nll is not None:
        row["mean_routed_nll"] = float(nll[np.arange(len(experts)), experts].mean())
        argmin = np.bincount(route(nll), minlength=n_experts) / n
        row["argmin_max_load"] = float(argmin.max())
    if probe_scores and probe_path is not None:
        probe_ids, probe_nll = read_scores(probe_scores)
        probe_experts = route(probe_nll) if len(probe_ids) else np.empty(0, np.int64)
        probe = pq.read_table(probe_path, columns=["seq_id", "source"]).sort_by("seq_id")
        if not np.array_equal(probe.column("seq_id").to_numpy(), probe_ids):
            raise ValueError(
                f"{probe_scores[0]} does not score exactly the sequences of {probe_path}"
            )
        probe_sources = np.asarray(probe.column("source").to_pylist(), dtype=object)
        row["probe_nmi_source"] = normalized_mutual_information(probe_experts, probe_sources)
        if previous_probe_scores:
            previous_ids, previous_nll = read_scores(previous_probe_scores)
            if np.array_equal(previous_ids, probe_ids) and len(probe_ids):
                row["probe_changed"] = float((route(previous_nll) != probe_experts).mean())
    contingency = (
        pa.table({"expert": experts, "source": sources.tolist()})
        .group_by(["expert", "source"])
        .aggregate([("expert", "count")])
        .rename_columns(["expert", "source", "sequences"])
        .sort_by([("expert", "ascending"), ("source", "ascending")])
    )
    round_column = pa.array([round_index] * contingency.num_rows, pa.int32())
    contingency = contingency.add_column(0, "round", round_column)
    return pa.Table.from_pylist([row]), contingency


# --------------------------------------------------------------------------- stopping


def em_stop_reason(
    diagnostics: Sequence[Mapping[str, float]], *, max_rounds: int, stop: Mapping | None
) -> str | None:
    """Why EM ends after the last of `diagnostics` (the rows of rounds 1..r, in order), or None
    while it goes on. Algorithm 1 runs a fixed T rounds; with `stop` (routing.stop) EM ends
    once the segmentation is stable: fewer than `changed_below` of the probe sequences change
    expert in each of the last `patience` rounds, or the mean routed prefix NLL has not improved
    on its best before them by `nll_min_improvement` nats. Round T ends it in any case."""
    rounds = [int(row["round"]) for row in diagnostics]
    if rounds != list(range(1, len(rounds) + 1)):
        raise ValueError(f"EM diagnostics must be rounds 1..r in order, got rounds {rounds}")
    last = rounds[-1] if rounds else 0
    if stop and last >= stop["patience"]:
        patience = stop["patience"]
        recent = diagnostics[-patience:]
        recent_rounds = "the last round" if patience == 1 else f"each of the last {patience} rounds"
        changed_below = stop.get("changed_below")
        # A round without a share (NaN: no probe, or round 1 with nothing before) is not stable.
        if changed_below is not None and all(
            row["probe_changed"] < changed_below for row in recent
        ):
            return (
                f"stable: fewer than {changed_below:.1%} of the probe sequences changed expert "
                f"in {recent_rounds}"
            )
        min_improvement = stop.get("nll_min_improvement")
        before = [row["mean_routed_nll"] for row in diagnostics[:-patience]]
        before = [nll for nll in before if math.isfinite(nll)]
        if min_improvement is not None and before:
            best = min(before)
            if not any(row["mean_routed_nll"] <= best - min_improvement for row in recent):
                return (
                    f"no improvement of the mean routed NLL by {min_improvement:g} nats on "
                    f"{best:.4f} in {recent_rounds}"
                )
    if last >= max_rounds:
        return f"reached the maximum of {max_rounds} rounds (routing.rounds)"
    return None


def read_diagnostics(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """The rows of one diagnostics file per round, in the given order."""
    return [row for path in paths for row in pq.read_table(path).to_pylist()]


def finish_em(
    *,
    diagnostics_paths: Sequence[str | os.PathLike],
    router_paths: Sequence[str | os.PathLike],
    out_routers: Sequence[str | os.PathLike],
    summary_path: str | os.PathLike,
    max_rounds: int,
    stop: Mapping | None,
) -> dict:
    """Copy the routers of the round that ended EM to their fixed place and record why it
    ended, with each round's criteria. The diagnostics are those of rounds 1..r, the routers
    those of round r; refuses a round after which EM would have gone on, or stopped earlier."""
    rows = read_diagnostics(diagnostics_paths)
    for r in range(1, len(rows)):
        if reason := em_stop_reason(rows[:r], max_rounds=max_rounds, stop=stop):
            raise ValueError(f"EM stopped after round {r} ({reason}), not round {len(rows)}")
    reason = em_stop_reason(rows, max_rounds=max_rounds, stop=stop)
    if reason is None:
        raise ValueError(f"EM goes on after round {len(rows)}: no stopping rule holds yet")
    if len(router_paths) != len(out_routers):
        raise ValueError(f"{len(router_paths)} routers to copy into {len(out_routers)} paths")
    for source, target in zip(router_paths, out_routers, strict=True):
        write_bytes_atomically(Path(source).read_bytes(), target)

    def finite(value):  # JSON has no NaN: a criterion not measured that round is null
        return value if value is not None and math.isfinite(value) else None

    summary = {
        "final_round": len(rows),
        "max_rounds": max_rounds,
        "reason": reason,
        "stop": dict(stop) if stop else None,
        "rounds": [
            {
                "round": row["round"],
                "probe_changed": finite(row["probe_changed"]),
                "mean_routed_nll": finite(row["mean_routed_nll"]),
                "nmi_source": finite(row["nmi_source"]),
            }
            for row in rows
        ],
    }
    write_text_atomically(json.dumps(summary, indent=2) + "\n", summary_path)
    return summary
