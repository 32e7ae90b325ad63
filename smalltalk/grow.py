"""Growing a mixture (config `grow`): what a grown expert trains on besides its corpus, and what
growing did to the test perplexities.

`capture_chunk`: the train sequences of the run's own corpus that a grown router takes from the
run's routers at inference (its prefix NLL below all of theirs, as stored by sharding). The
grown expert trains on its corpus and on those, so that the sequences its router will send it
are in its training distribution, as every EM expert's are (its shard is what its router wins).

`grow_summary`: the test rows of the mixture after it grew against the same test sequences
under the mixture before it grew (its first E experts).

Every test sequence belongs to a corpus: the run's own (named `run`) or grow entry k's, read off
its seq_id (the chunk index in its upper bits, `smalltalk.data.plan_grown_chunks`). For each
corpus and each of its sources, and for all of them together, the table gives the perplexity
before and after with the ratio's paired-bootstrap 95 % interval (`smalltalk.stats`), and where
the mixture now routes the sequences: the share to any grown expert, and for a grown corpus the
share to its own expert. All at the training routing prefix M̂ = M.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from smalltalk.config import router_train_prefix_len
from smalltalk.data import GROWN_CHUNKS
from smalltalk.files import parquet_writers, write_parquet_atomically, write_text_atomically
from smalltalk.stats import bootstrap_ratio, verdict
from smalltalk.tokens import sample_seq_ids

RUN_CORPUS = "run"  # the corpus the mixture was first trained on
ALL = "all"  # the source column of a whole corpus's row, and the corpus column of the total row

GROW_SCHEMA = pa.schema(
    [
        ("corpus", pa.string()),
        ("source", pa.string()),
        ("sequences", pa.int64()),
        ("ppl_before", pa.float64()),  # the first E experts, routed among themselves
        ("ppl_after", pa.float64()),  # all E + k experts
        ("ratio", pa.float64()),  # ppl_after / ppl_before, same tokens
        ("ratio_ci_low", pa.float64()),
        ("ratio_ci_high", pa.float64()),
        ("verdict", pa.string()),  # "grown better", "before better", "no difference ..."
        ("to_grown", pa.float64()),  # share of the sequences routed to any grown expert
        ("to_own", pa.float64()),  # share routed to this grown corpus's own expert (else null)
    ]
)

PAIRED = """
SELECT
    a.seq_id, a.source, a.n_tokens, a.expert, b.nll_expert AS nll_before, a.nll_expert AS nll_after
FROM read_parquet($after) AS a
JOIN read_parquet($before) AS b USING (seq_id, prefix_len)
WHERE a.prefix_len = $prefix_len
ORDER BY a.seq_id
"""


# A grown router that trains as long as an EM router takes a share of the run's own sequences
# that costs them perplexity; 7/8 of that budget was chosen on the demo's validation split
# (README: Grow, retire, export): the new corpus keeps most of its sequences, the run's
# sources lose under 1 %.
GROWN_ROUTER_STEP_SHARE = 7 / 8


@dataclass(frozen=True)
class GrownRouterPlan:
    """How grown router E + k trains (`grown_router_plan`)."""

    steps: int
    seed_offset: int
    seq_ids: np.ndarray  # the sample of its corpus's train sequences it trains on
    prefix_len: int | None  # tokens it learns of each sequence (None: all)


def grown_router_plan(
    config: dict,
    index: int,
    em_summary: str | os.PathLike,
    train_files: Sequence[str | os.PathLike],
    steps: int | None = None,
) -> GrownRouterPlan:
    """Grown router `index`'s training: from scratch, on as many of its corpus's sequences as
    each EM router over all its rounds (`em.json` says how many rounds ran), for
    `GROWN_ROUTER_STEP_SHARE` of their steps; `steps` (else its entry's `router_steps`)
    overrides the steps. No EM router has an index >= E, so its seed is its own."""
    routing = config["routing"]
    grown = index - routing["n_experts"]
    if not 0 <= grown < len(config["grow"]):
        raise ValueError(f"router {index} is no grown router of this run's `grow`")
    rounds = json.loads(Path(em_summary).read_text())["final_round"]
    seed_offset = 1000 + index
    sequences = rounds * routing["sequences_per_round"] // routing["n_experts"]
    return GrownRouterPlan(
        steps=steps
        or config["grow"][grown].get("router_steps")
        or max(1, round(GROWN_ROUTER_STEP_SHARE * rounds * routing["steps_per_round"])),
        seed_offset=seed_offset,
        seq_ids=sample_seq_ids(train_files, sequences, config["seed"] + seed_offset),
        prefix_len=router_train_prefix_len(config),
    )


def capture_chunk(
    *,
    tokens_path: str | os.PathLike,
    shard_scores_path: str | os.PathLike,
    router,
    prefix_len: int,
    out: str | os.PathLike,
) -> int:
    """Write to `out` the rows of one train chunk of the run's corpus that `router` (a grown
    router LM) would take at inference: its prefix NLL, rounded to float16 as the run's routers'
    scores are stored (`shard.shard_chunk`), below every one of theirs (ties stay with the run).
    Returns the number of rows written."""
    import pyarrow.parquet as pq

    from smalltalk.routers import RoutingBatch

    scores = pq.read_table(shard_scores_path, columns=["seq_id", "nll"])
    parquet = pq.ParquetFile(tokens_path)
    taken, offset = 0, 0
    with parquet_writers([out], parquet.schema_arrow) as (writer,):
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group)
            rows = slice(offset, offset + table.num_rows)
            offset += table.num_rows
            if not np.array_equal(
                table.column("seq_id").to_numpy(), scores.column("seq_id").to_numpy()[rows]
            ):
                raise ValueError(f"{shard_scores_path}: scores other sequences than {tokens_path}")
            nll = router.costs(RoutingBatch.from_table(table), [prefix_len])[:, 0, 0]
            run = scores.column("nll").slice(rows.start, table.num_rows).combine_chunks()
            best = run.flatten().to_numpy().reshape(table.num_rows, -1).min(axis=1)
            captured = nll.astype(np.float16) < best
            if captured.any():
                writer.write_table(table.filter(pa.array(captured)))
            taken += int(captured.sum())
    if offset != scores.num_rows:
        raise ValueError(f"{shard_scores_path}: scores other sequences than {tokens_path}")
    return taken


def grow_summary(
    *,
    after: Sequence[str | os.PathLike],
    before: Sequence[str | os.PathLike],
    n_experts: int,
    names: Sequence[str],
    prefix_len: int,
    out: str | os.PathLike,
) -> pa.Table:
    """The `GROW_SCHEMA` table from the `EVAL_SCHEMA` rows after and before growing (the same
    test chunks), E = `n_experts`, `names` the grow entries' names; written to `out`."""
    con = duckdb.connect(config={"threads": 1})
    rows = con.execute(
        PAIRED,
        {
            "after": [str(p) for p in after],
            "before": [str(p) for p in before],
            "prefix_len": prefix_len,
        },
    ).fetchnumpy()
    con.close()
    if len(rows["seq_id"]) == 0:
        raise ValueError(f"no test rows at M̂ = {prefix_len} in both {after[0]} and {before[0]}")
    entry = (rows["seq_id"] >> 32) // GROWN_CHUNKS - 1  # -1: the run's own corpus
    if entry.max() >= len(names):
        raise ValueError(f"test rows of grow entry {entry.max()}, but only {len(names)} entries")
    corpora = np.array([RUN_CORPUS, *names], dtype=object)[entry + 1]
    sources = np.asarray(rows["source"], dtype=object)
    expert = rows["expert"].astype(np.int64)

    groups = [(ALL, ALL, np.ones(len(expert), bool))]
    for corpus in [RUN_CORPUS, *names]:
        in_corpus = corpora == corpus
        if in_corpus.any():
            groups.append((corpus, ALL, in_corpus))
            groups += [
                (corpus, source, in_corpus & (sources == source))
                for source in sorted(set(sources[in_corpus]))
            ]
    table = {name: [] for name in GROW_SCHEMA.names}
    for corpus, source, at in groups:
        tokens = rows["n_tokens"][at]
        (ci,) = bootstrap_ratio(rows["nll_after"][at], rows["nll_before"][at], tokens)
        own = n_experts + names.index(corpus) if corpus in names else None
        values = {
            "corpus": corpus,
            "source": source,
            "sequences": int(at.sum()),
            "ppl_before": float(np.exp(rows["nll_before"][at].sum() / tokens.sum())),
            "ppl_after": float(np.exp(rows["nll_after"][at].sum() / tokens.sum())),
            "ratio": ci[0],
            "ratio_ci_low": ci[1],
            "ratio_ci_high": ci[2],
            "verdict": verdict(*ci, a="grown", b="before"),
            "to_grown": float((expert[at] >= n_experts).mean()),
            "to_own": None if own is None else float((expert[at] == own).mean()),
        }
        for name, value in values.items():
            table[name].append(value)
    result = pa.table(table, schema=GROW_SCHEMA)
    write_parquet_atomically(result, Path(out))
    return result


def markdown(table: pa.Table, out: str | os.PathLike) -> Path:
    """The `grow_summary` table as Markdown (the README's figures), written to `out`."""
    lines = [
        "| corpus | source | sequences | ppl before | ppl after | after/before (95 % CI) "
        "| verdict | to grown experts | to its own expert |",
        "|---|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for row in table.to_pylist():
        own = "-" if row["to_own"] is None else f"{100 * row['to_own']:.1f}%"
        lines.append(
            f"| {row['corpus']} | {row['source']} | {row['sequences']} "
            f"| {row['ppl_before']:.2f} | {row['ppl_after']:.2f} "
            f"| {row['ratio']:.3f} [{row['ratio_ci_low']:.3f}, {row['ratio_ci_high']:.3f}] "
            f"| {row['verdict']} | {100 * row['to_grown']:.1f}% | {own} |"
        )
    return write_text_atomically("\n".join(lines) + "\n", out)
