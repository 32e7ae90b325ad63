"""The paper's numbers from the per-sequence evaluation rows (`smalltalk.evaluate`), with DuckDB:
perplexity per inference prefix length M̂ (Fig. 4b), per routed segment (Fig. 5), per source, and
the experts' load. Overall and per source they carry the mixture/dense perplexity ratio with a
paired-bootstrap 95 % interval over the test sequences and its verdict in words
(`smalltalk.stats`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from smalltalk.files import write_parquet_atomically
from smalltalk.stats import bootstrap_ratio, verdict

# Perplexity of a set of rows is exp(total NLL / total tokens): per token, pooled over the rows
# (every row scores the same number of tokens, so this is also the mean per-row NLL per token).
# Each query reads the view `per_sequence` (all evaluated chunks) or an aggregate made before it.

OVERALL = """
SELECT
    prefix_len,
    exp(sum(nll_expert) / sum(n_tokens))           AS ppl_mixture,  -- argmin routing (Eq. 8)
    exp(sum(nll_dense) / sum(n_tokens))            AS ppl_dense,
    exp(sum(nll_oracle) / sum(n_tokens))           AS ppl_oracle,   -- best expert per sequence
    exp(sum(nll_topk) / sum(n_tokens))             AS ppl_topk,     -- c-BTM-style ensemble
    exp(sum(nll_expert_full) / sum(n_tokens_full)) AS ppl_mixture_full,
    exp(sum(nll_dense_full) / sum(n_tokens_full))  AS ppl_dense_full,
    1 - ppl_mixture / ppl_dense                    AS relative_gain,  -- §3.2's "gain"
    count(*)                                       AS sequences,
    sum(n_tokens)::BIGINT                          AS tokens,
    sum(n_tokens_full)::BIGINT                     AS tokens_full
FROM per_sequence
GROUP BY prefix_len
ORDER BY prefix_len
"""
"""Fig. 4b: test perplexity per inference prefix length M̂."""

PER_SEGMENT = """
WITH experts AS (  -- every expert, including any that no test sequence was routed to
    SELECT sizes.prefix_len, e.expert::SMALLINT AS expert
    FROM (
        SELECT prefix_len, max(len(router_nll)) AS n_experts FROM per_sequence GROUP BY prefix_len
    ) AS sizes, range(sizes.n_experts) AS e(expert)
),
segments AS (
    SELECT
        prefix_len,
        expert,
        count(*)        AS sequences,
        sum(n_tokens)   AS tokens,
        sum(nll_expert) AS nll_expert,
        sum(nll_dense)  AS nll_dense
    FROM per_sequence
    GROUP BY prefix_len, expert
)
SELECT
    prefix_len,
    expert,
    coalesce(sequences, 0)                                                 AS sequences,
    coalesce(sequences / sum(sequences) OVER (PARTITION BY prefix_len), 0) AS share,
    exp(nll_expert / tokens)                                AS ppl_expert,  -- NULL if no rows
    exp(nll_dense / tokens)                                 AS ppl_dense,
    coalesce(tokens, 0)::BIGINT                             AS tokens
FROM experts LEFT JOIN segments USING (prefix_len, expert)
ORDER BY prefix_len, expert
"""
"""Fig. 5: each routed segment's perplexity under its expert and under the dense model."""

LOAD = """
SELECT prefix_len, expert, sequences, share
FROM per_segment
ORDER BY prefix_len, expert
"""
"""Test sequences routed to each expert (no capacity at inference, §3.4), zeros included."""

PER_SOURCE = """
SELECT
    prefix_len,
    source,
    count(*)                              AS sequences,
    exp(sum(nll_expert) / sum(n_tokens))  AS ppl_mixture,
    exp(sum(nll_dense) / sum(n_tokens))   AS ppl_dense,
    1 - ppl_mixture / ppl_dense           AS relative_gain,
    sum(n_tokens)::BIGINT                 AS tokens
FROM per_sequence
GROUP BY prefix_len, source
ORDER BY prefix_len, source
"""
"""Perplexity per data source (corpus subset), mixture against dense."""

SEGMENT_SOURCE = """
SELECT prefix_len, expert, source, count(*) AS sequences
FROM per_sequence
GROUP BY prefix_len, expert, source
ORDER BY prefix_len, expert, source
"""
"""Segment x source counts: where each expert's test sequences come from (the heatmap)."""

AGGREGATES = {
    "overall": OVERALL,
    "per_segment": PER_SEGMENT,
    "load": LOAD,  # reads per_segment, so after it
    "per_source": PER_SOURCE,
    "segment_source": SEGMENT_SOURCE,
}

# Perplexity ratios against dense with paired-bootstrap 95 % intervals (`smalltalk.stats`), added
# to an aggregate's rows: {aggregate: (its group columns, {suffix: (model's NLL column, name)})}.
# Suffix "" adds ratio, ratio_ci_low, ratio_ci_high and verdict; "_topk" adds ratio_topk, ...
RATIO_INTERVALS = {
    "overall": (("prefix_len",), {"": ("nll_expert", "mixture"), "_topk": ("nll_topk", "top-k")}),
    "per_source": (("prefix_len", "source"), {"": ("nll_expert", "mixture")}),
}


BASELINE_NAMES = {"dense_compute": "compute-matched dense", "dense_large": "larger dense"}
"""The further dense baselines an evaluation may score (`training.baselines`): the mixture's
ratio to each gets columns of its own, suffixed _{baseline} (ppl_dense_compute,
ratio_dense_compute, ratio_dense_compute_ci_low, ..., verdict_dense_compute)."""


def aggregate(
    eval_files: Sequence[str | os.PathLike], out_dir: str | os.PathLike
) -> dict[str, pa.Table]:
    """Run `AGGREGATES` over the `evaluate_chunk` files; write `out_dir/{name}.parquet` each."""
    if not eval_files:
        raise ValueError("aggregate needs at least one evaluation file")
    # One thread: floating-point sums in a fixed order, so a rerun writes identical files.
    con = duckdb.connect(config={"threads": 1})
    con.read_parquet([str(path) for path in eval_files]).create_view("per_sequence")
    columns = set(con.sql("SELECT * FROM per_sequence LIMIT 0").columns)
    baselines = [name for name in BASELINE_NAMES if f"nll_{name}" in columns]
    tables = {}
    for name, query in AGGREGATES.items():
        tables[name] = pa.table(con.sql(query))
        if name in RATIO_INTERVALS:
            keys, models = RATIO_INTERVALS[name]
            tables[name] = _with_ratio_intervals(con, tables[name], keys, models)
            for baseline in baselines:
                tables[name] = _with_baseline(con, tables[name], keys, baseline)
        con.register(name, tables[name])  # later queries may read it
        write_parquet_atomically(tables[name], Path(out_dir) / f"{name}.parquet")
    con.close()
    return tables


_RATIO_COLUMNS = {
    "ratio{}": pa.float64(),  # perplexity of the model / perplexity of dense, same tokens
    "ratio{}_ci_low": pa.float64(),  # 95 % paired-bootstrap interval over test sequences
    "ratio{}_ci_high": pa.float64(),
    "verdict{}": pa.string(),  # "mixture better", "dense better", "no difference (CI contains 1)"
}


def _with_baseline(
    con: duckdb.DuckDBPyConnection, table: pa.Table, keys: Sequence[str], baseline: str
) -> pa.Table:
    """`table` with the baseline's perplexity per group (ppl_{baseline}) and the mixture's ratio
    to it, with its paired-bootstrap interval and verdict (ratio_{baseline}, ...)."""
    groups = ", ".join(keys)
    ppl = pa.table(
        con.sql(
            f"SELECT {groups}, exp(sum(nll_{baseline}) / sum(n_tokens)) AS ppl "
            f"FROM per_sequence GROUP BY {groups}"
        )
    ).to_pylist()
    by_group = {tuple(row[key] for key in keys): row["ppl"] for row in ppl}
    column = [by_group[tuple(row[key] for key in keys)] for row in table.select(keys).to_pylist()]
    table = table.append_column(f"ppl_{baseline}", pa.array(column, pa.float64()))
    return _with_ratio_intervals(
        con,
        table,
        keys,
        {f"_{baseline}": ("nll_expert", "mixture")},
        baseline=f"nll_{baseline}",
        baseline_name=BASELINE_NAMES[baseline],
    )


def _with_ratio_intervals(
    con: duckdb.DuckDBPyConnection,
    table: pa.Table,
    keys: Sequence[str],
    models: dict[str, tuple[str, str]],
    *,
    baseline: str = "nll_dense",
    baseline_name: str = "dense",
) -> pa.Table:
    """`table` (one row per group of `keys`) with, per model, its perplexity ratio to the
    `baseline` column's model over the group's test sequences, the paired-bootstrap interval and
    the verdict in words."""
    nll_columns = [column for column, _ in models.values()]
    # Sequences in a fixed order (the resamples index into it), whatever the files' order.
    order = ", ".join([*keys, "seq_id", *nll_columns, baseline, "n_tokens"])
    rows = con.sql(
        f"SELECT {', '.join(keys)}, {', '.join(nll_columns)}, {baseline}, n_tokens "
        f"FROM per_sequence ORDER BY {order}"
    ).fetchnumpy()
    new = {column.format(suffix): [] for suffix in models for column in _RATIO_COLUMNS}
    for group in table.select(list(keys)).to_pylist():
        at = np.logical_and.reduce([rows[key] == value for key, value in group.items()])
        cis = bootstrap_ratio(
            np.column_stack([rows[column][at] for column in nll_columns]),
            rows[baseline][at],
            rows["n_tokens"][at],
        )
        for (suffix, (_, name)), ci in zip(models.items(), cis, strict=True):
            words = verdict(*ci, a=name, b=baseline_name)
            for column, value in zip(_RATIO_COLUMNS, [*ci, words], strict=True):
                new[column.format(suffix)].append(value)
    for suffix in models:
        for column, kind in _RATIO_COLUMNS.items():
            table = table.append_column(
                column.format(suffix), pa.array(new[column.format(suffix)], kind)
            )
    return table
