"""Evaluation (design stage 6): route each test sequence by its prefix, score it, aggregate.

`evaluate_chunk` writes one row per (test sequence, inference prefix length M̂): the E routers'
prefix NLLs, the expert they pick by argmin (Eq. 4 and 8, no capacity at inference, §2.2), and the
summed NLL of the sequence under that expert, the dense baseline, the best expert in hindsight
(oracle) and a c-BTM-style top-k ensemble. `aggregate` turns those rows into the paper's numbers
with DuckDB: perplexity per M̂ (Fig. 4b), per routed segment (Fig. 5), per source, expert load;
overall and per source they carry the mixture/dense perplexity ratio with a paired-bootstrap
95 % interval over the test sequences and its verdict in words (`smalltalk.stats`).

Which tokens are scored. A row of a token file holds S + 1 tokens x_0..x_S; token j is predicted
from x_0..x_{j-1} (`scoring.predicted_positions`). `nll_*` columns sum over the tokens j >= M,
where M is the *training* routing prefix (`routing.prefix_len`), for every M̂: each curve over M̂
then averages the same tokens, so differences come from routing alone, and for M̂ <= M the router
saw none of them. (For M̂ > M, routing reads the first M̂ - M scored tokens.) `nll_*_full` columns
sum over all S predicted tokens (j = 1..S), the usual whole-sequence perplexity (Eq. 1).

`route_sequences` and `split_by_expert` give each expert its routed part of the validation set,
so the in-training validation curves follow the mixture the way the test evaluates it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from smalltalk import em
from smalltalk.files import write_parquet_atomically
from smalltalk.model import LM, ModelConfig
from smalltalk.routers import Router, RoutingBatch
from smalltalk.routing import route
from smalltalk.scoring import inference_autocast, predicted_positions
from smalltalk.stats import bootstrap_ratio, verdict

SLICE_ROWS = 2048  # sequences scored per model load; bounds the (rows, M̂s, S) top-k mixture

EVAL_SCHEMA = pa.schema(
    [
        ("seq_id", pa.int64()),
        ("source", pa.string()),
        ("prefix_len", pa.int32()),  # M̂: tokens the routers read at inference (Fig. 4b)
        ("expert", pa.int16()),  # argmin of router_nll: the routed expert (Eq. 4, 8)
        ("router_nll", pa.list_(pa.float32())),  # E routers' mean NLL per predicted prefix token
        ("n_tokens", pa.int32()),  # tokens scored after the training prefix M: S + 1 - M
        ("nll_expert", pa.float64()),  # summed NLL (nats) of those tokens, routed expert
        ("nll_dense", pa.float64()),  # same tokens, dense baseline
        ("n_tokens_full", pa.int32()),  # all S predicted tokens of the sequence
        ("nll_expert_full", pa.float64()),
        ("nll_dense_full", pa.float64()),
        ("oracle_expert", pa.int16()),  # the expert with the lowest nll over the n_tokens tokens
        ("nll_oracle", pa.float64()),  # its NLL: the bound on any routing of this sequence
        ("nll_topk", pa.float64()),  # -sum_t log sum_e w_e p_e(x_t), w over the top-k routers
    ]
)
"""Columns of `evaluate_chunk`'s output, one row per (test sequence, M̂)."""


# ---- per-token log-probabilities -------------------------------------------------------------


@torch.inference_mode()
def token_logprobs(model: LM, tokens: np.ndarray, batch_size: int) -> torch.Tensor:
    """log p(x_j | x_0..x_{j-1}) for j = 1..L-1 of each row of tokens (n, L): (n, L-1) float32,
    left on the model's device. Same numbers as `scoring.sequence_nll` sums (batches of
    `batch_size`, bf16 autocast on CUDA only, log-softmax in float32)."""
    device = next(model.parameters()).device
    n, length = tokens.shape
    logprobs = torch.empty((n, length - 1), dtype=torch.float32, device=device)
    for i in range(0, n, batch_size):
        batch = torch.from_numpy(tokens[i : i + batch_size].astype(np.int64))
        batch = batch.to(device, non_blocking=True)  # (b, L)
        with inference_autocast(device):
            logits, _ = model(batch[:, :-1])  # (b, L-1, V): logits[:, t] predicts token t+1
        nll = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")
        logprobs[i : i + len(batch)] = -nll  # (b, L-1)
    return logprobs


def ensemble_log_weights(router_nll: np.ndarray, topk: int, temperature: float) -> np.ndarray:
    """log w_e of the top-k ensemble for router NLLs (..., E): float64, -inf outside the top k.

    As in c-BTM (Gururangan et al. 2023), only the k experts whose routers fit the prefix best
    (lowest mean NLL; ties to the lower index) are mixed, with w = softmax(-router_nll /
    temperature) over them. With temperature 1 / (M̂ - 1) this is the router posterior of Eq. 5
    (uniform prior) restricted to the top k; temperature -> 0 gives argmin routing (Eq. 4).
    """
    order = np.argsort(router_nll, axis=-1, kind="stable")[..., :topk]  # (..., k)
    logits = np.take_along_axis(router_nll, order, axis=-1).astype(np.float64) / -temperature
    top = logits.max(axis=-1, keepdims=True)
    log_norm = top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    log_weights = np.full(router_nll.shape, -np.inf)
    np.put_along_axis(log_weights, order, logits - log_norm, axis=-1)
    return log_weights


# ---- one test chunk --------------------------------------------------------------------------


def evaluate_chunk(
    *,
    tokens_path: str | os.PathLike,
    router: Router,
    expert_config: ModelConfig,
    expert_weights: Sequence[str | os.PathLike],
    dense_weights: str | os.PathLike,
    prefix_lens: Sequence[int],
    train_prefix_len: int,
    topk: int,
    temperature: float,
    batch_size: int,
    out: str | os.PathLike,
    slice_rows: int = SLICE_ROWS,
    device: str = "auto",
) -> pa.Table:
    """Route and score every sequence of one test token file; write `EVAL_SCHEMA` rows to `out`.

    Rows come in file order, each sequence's M̂ ascending (`prefix_lens` is deduplicated and
    sorted). `router` is any routing method (`smalltalk.routers`); its costs fill `router_nll`.
    Routers see the whole chunk at once (they are small); experts and the dense model
    are loaded one at a time for each slice of `slice_rows` sequences, so memory stays bounded
    by one model plus the slice's (slice_rows, len(prefix_lens), S) top-k mixture. `device`
    "auto" is CUDA when present (bf16 autocast), else the CPU (float32).
    """
    table = pq.read_table(tokens_path, columns=["seq_id", "tokens", "source"])
    batch = RoutingBatch.from_table(table)
    tokens = batch.tokens  # (N, S+1)
    prefix_lens = sorted({int(m) for m in prefix_lens})
    _check_arguments(
        length=tokens.shape[1] if len(tokens) else None,
        router_max_prefix_len=router.max_prefix_len,
        expert_config=expert_config,
        n_routers=router.n_experts,
        n_experts=len(expert_weights),
        prefix_lens=prefix_lens,
        train_prefix_len=train_prefix_len,
        topk=topk,
        temperature=temperature,
        batch_size=batch_size,
        slice_rows=slice_rows,
    )
    device = _device(device)
    router_nll = router.costs(batch, prefix_lens)  # (N, P, E)
    slices = []
    for start in range(0, len(tokens), slice_rows):
        rows = slice(start, start + slice_rows)
        slices.append(
            _evaluate_slice(
                table.slice(start, slice_rows),
                tokens[rows],
                router_nll[rows],
                expert_config=expert_config,
                expert_weights=expert_weights,
                dense_weights=dense_weights,
                prefix_lens=prefix_lens,
                train_prefix_len=train_prefix_len,
                topk=topk,
                temperature=temperature,
                batch_size=batch_size,
                device=device,
            )
        )
    result = pa.concat_tables(slices) if slices else EVAL_SCHEMA.empty_table()
    write_parquet_atomically(result, out)
    return result


@torch.inference_mode()
def _evaluate_slice(
    table: pa.Table,
    tokens: np.ndarray,
    router_nll: np.ndarray,
    *,
    expert_config: ModelConfig,
    expert_weights: Sequence[str | os.PathLike],
    dense_weights: str | os.PathLike,
    prefix_lens: list[int],
    train_prefix_len: int,
    topk: int,
    temperature: float,
    batch_size: int,
    device: str,
) -> pa.Table:
    """The `EVAL_SCHEMA` rows of n sequences: tokens (n, S+1), router_nll (n, P, E) for the
    P prefix lengths M̂; T below counts the tokens scored after the training prefix M."""
    n, n_prefixes, n_experts = router_nll.shape
    scored = predicted_positions(tokens.shape[1], start=train_prefix_len)  # tokens j >= M
    first = scored.start - 1  # column of token `scored.start` in the (n, S) log-prob matrix

    routed = route(router_nll.reshape(n * n_prefixes, n_experts)).reshape(n, n_prefixes)
    log_weights = ensemble_log_weights(router_nll, topk, temperature)  # (n, P, E)
    in_ensemble = np.isfinite(log_weights).any(axis=(0, 1))  # (E,) experts some row mixes
    log_weights = torch.from_numpy(log_weights).to(device)

    nll_after = torch.empty((n, n_experts), dtype=torch.float64, device=device)  # j >= M
    nll_full = torch.empty((n, n_experts), dtype=torch.float64, device=device)
    # log sum_e w_e p_e(x_t), accumulated one expert at a time so only one is ever loaded.
    mixture = torch.full(
        (n, n_prefixes, len(scored)), -torch.inf, dtype=torch.float64, device=device
    )  # (n, P, T)
    for e, path in enumerate(expert_weights):
        expert = em.load_model(expert_config, path, device)
        logprobs = token_logprobs(expert, tokens, batch_size)  # (n, S)
        after = logprobs[:, first:].double()  # (n, T)
        nll_after[:, e] = -after.sum(dim=1)
        nll_full[:, e] = -logprobs.sum(dim=1, dtype=torch.float64)
        if in_ensemble[e]:  # weight -inf adds nothing: logaddexp(a, -inf) == a exactly
            weighted = log_weights[:, :, e, None] + after[:, None, :]  # (n, P, T)
            mixture = torch.logaddexp(mixture, weighted)
        del expert, logprobs
    dense = em.load_model(expert_config, dense_weights, device)
    logprobs = token_logprobs(dense, tokens, batch_size)  # (n, S)
    nll_dense = -logprobs[:, first:].sum(dim=1, dtype=torch.float64)  # (n,)
    nll_dense_full = -logprobs.sum(dim=1, dtype=torch.float64)  # (n,)
    del dense, logprobs
    nll_topk = -mixture.sum(dim=2)  # (n, P)

    # Device-to-host copies, once all models have run on the slice.
    nll_after, nll_full = nll_after.cpu().numpy(), nll_full.cpu().numpy()
    nll_dense, nll_dense_full = nll_dense.cpu().numpy(), nll_dense_full.cpu().numpy()
    nll_topk = nll_topk.cpu().numpy()

    rows = np.arange(n)[:, None]  # (n, 1), broadcast against (n, P)
    oracle = nll_after.argmin(axis=1)  # (n,) lowest index on ties
    per_row = np.repeat(np.arange(n), n_prefixes)  # (n*P,) sequence of each output row
    router_values = pa.array(router_nll.reshape(-1), pa.float32())  # (n*P*E,)
    offsets = pa.array(np.arange(0, n * n_prefixes + 1, dtype=np.int32) * n_experts)
    return pa.table(
        {
            "seq_id": table.column("seq_id").take(per_row),
            "source": table.column("source").take(per_row),
            "prefix_len": np.tile(np.asarray(prefix_lens, np.int32), n),
            "expert": routed.reshape(-1).astype(np.int16),
            "router_nll": pa.ListArray.from_arrays(offsets, router_values),
            "n_tokens": np.full(n * n_prefixes, len(scored), np.int32),
            "nll_expert": nll_after[rows, routed].reshape(-1),
            "nll_dense": nll_dense[per_row],
            "n_tokens_full": np.full(n * n_prefixes, tokens.shape[1] - 1, np.int32),
            "nll_expert_full": nll_full[rows, routed].reshape(-1),
            "nll_dense_full": nll_dense_full[per_row],
            "oracle_expert": oracle[per_row].astype(np.int16),
            "nll_oracle": nll_after[np.arange(n), oracle][per_row],
            "nll_topk": nll_topk.reshape(-1),
        },
        schema=EVAL_SCHEMA,
    )


def _check_arguments(
    *,
    length: int | None,
    router_max_prefix_len: int | None,
    expert_config: ModelConfig,
    n_routers: int,
    n_experts: int,
    prefix_lens: list[int],
    train_prefix_len: int,
    topk: int,
    temperature: float,
    batch_size: int,
    slice_rows: int,
) -> None:
    """Every problem with `evaluate_chunk`'s arguments in one ValueError (length: S + 1)."""
    errors = []
    if n_experts < 1 or n_routers != n_experts:
        errors.append(f"need one router per expert, got {n_routers} routers, {n_experts} experts")
    if not 1 <= topk <= max(n_experts, 1):
        errors.append(f"topk must lie in [1, E = {n_experts}], got {topk}")
    if not temperature > 0:
        errors.append(f"temperature must be positive, got {temperature}")
    if batch_size < 1 or slice_rows < 1:
        errors.append(f"batch_size and slice_rows must be >= 1, got {batch_size}, {slice_rows}")
    if not prefix_lens:
        errors.append("prefix_lens is empty")
    if length is not None:
        # Router LMs read M̂ - 1 tokens (Eq. 9), experts S; at least one token follows the prefix.
        seq_len = length - 1
        longest = min(seq_len, router_max_prefix_len or seq_len)
        if any(not 2 <= m <= longest for m in prefix_lens):
            errors.append(
                f"prefix_lens {prefix_lens} must lie in [2, {longest}] for sequences of {length} "
                f"tokens and routers reading at most {router_max_prefix_len} tokens"
            )
        if not 1 <= train_prefix_len <= seq_len:
            errors.append(f"train_prefix_len must lie in [1, {seq_len}], got {train_prefix_len}")
        if seq_len > expert_config.seq_len:
            errors.append(
                f"sequences of {length} tokens need experts with seq_len >= {seq_len}, "
                f"got {expert_config.seq_len}"
            )
    if errors:
        raise ValueError("evaluate_chunk: " + "; ".join(errors))


# ---- aggregates (DuckDB over the per-sequence rows) ------------------------------------------

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


def aggregate(
    eval_files: Sequence[str | os.PathLike], out_dir: str | os.PathLike
) -> dict[str, pa.Table]:
    """Run `AGGREGATES` over the `evaluate_chunk` files; write `out_dir/{name}.parquet` each."""
    if not eval_files:
        raise ValueError("aggregate needs at least one evaluation file")
    # One thread: floating-point sums in a fixed order, so a rerun writes identical files.
    con = duckdb.connect(config={"threads": 1})
    con.read_parquet([str(path) for path in eval_files]).create_view("per_sequence")
    tables = {}
    for name, query in AGGREGATES.items():
        tables[name] = pa.table(con.sql(query))
        if name in RATIO_INTERVALS:
            tables[name] = _with_ratio_intervals(con, tables[name], *RATIO_INTERVALS[name])
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


def _with_ratio_intervals(
    con: duckdb.DuckDBPyConnection,
    table: pa.Table,
    keys: Sequence[str],
    models: dict[str, tuple[str, str]],
) -> pa.Table:
    """`table` (one row per group of `keys`) with, per model, its perplexity ratio to dense over
    the group's test sequences, the paired-bootstrap interval and the verdict in words."""
    nll_columns = [column for column, _ in models.values()]
    # Sequences in a fixed order (the resamples index into it), whatever the files' order.
    order = ", ".join([*keys, "seq_id", *nll_columns, "nll_dense", "n_tokens"])
    rows = con.sql(
        f"SELECT {', '.join(keys)}, {', '.join(nll_columns)}, nll_dense, n_tokens "
        f"FROM per_sequence ORDER BY {order}"
    ).fetchnumpy()
    new = {column.format(suffix): [] for suffix in models for column in _RATIO_COLUMNS}
    for group in table.select(list(keys)).to_pylist():
        at = np.logical_and.reduce([rows[key] == value for key, value in group.items()])
        cis = bootstrap_ratio(
            np.column_stack([rows[column][at] for column in nll_columns]),
            rows["nll_dense"][at],
            rows["n_tokens"][at],
        )
        for (suffix, (_, name)), ci in zip(models.items(), cis, strict=True):
            for column, value in zip(_RATIO_COLUMNS, [*ci, verdict(*ci, a=name)], strict=True):
                new[column.format(suffix)].append(value)
    for suffix in models:
        for column, kind in _RATIO_COLUMNS.items():
            table = table.append_column(
                column.format(suffix), pa.array(new[column.format(suffix)], kind)
            )
    return table


# ---- routed validation subsets ---------------------------------------------------------------


def route_sequences(
    *,
    tokens_path: str | os.PathLike,
    router: Router,
    prefix_len: int,
    out: str | os.PathLike,
    limit: int | None = None,
) -> pa.Table:
    """Route the first `limit` (None: all) sequences of a token file by their first `prefix_len`
    tokens, argmin over the router's costs as at inference (Eq. 4, 8); write `seq_id` int64,
    `expert` int16 to `out` and return that table."""
    table = pq.read_table(tokens_path, columns=["seq_id", "tokens", "source"])
    if limit is not None:
        table = table.slice(0, limit)
    nll = router.costs(RoutingBatch.from_table(table), [prefix_len])[:, 0]
    routing = pa.table(
        {
            "seq_id": table.column("seq_id"),
            "expert": pa.array(route(nll).astype(np.int16), pa.int16()),
        }
    )
    write_parquet_atomically(routing, out)
    return routing


def split_by_expert(
    tokens_paths: Sequence[str | os.PathLike],
    routing_path: str | os.PathLike,
    out_paths: Sequence[str | os.PathLike],
) -> list[int]:
    """Copy each routed row of the token files into out_paths[expert] (same schema; an expert
    with no rows gets an empty file), atomically. Returns the rows written per expert."""
    routing = pq.read_table(routing_path, columns=["seq_id", "expert"])
    seq_ids = routing.column("seq_id").to_numpy()
    experts = routing.column("expert").to_numpy().astype(np.int64)
    if len(experts) and not 0 <= experts.min() <= experts.max() < len(out_paths):
        raise ValueError(
            f"{routing_path} routes to experts {experts.min()}..{experts.max()}, "
            f"but only {len(out_paths)} output files were given"
        )
    present = np.concatenate(
        [pq.read_table(p, columns=["seq_id"]).column("seq_id").to_numpy() for p in tokens_paths]
    )
    missing = np.setdiff1d(seq_ids, present)
    if len(missing):
        raise ValueError(
            f"{routing_path} routes {len(missing)} seq_ids that no token file holds, "
            f"e.g. {missing[0]}"
        )
    expert_of = dict(zip(seq_ids.tolist(), experts.tolist(), strict=True))
    em.gather_rows(tokens_paths, expert_of, out_paths)
    return np.bincount(experts, minlength=len(out_paths)).tolist()


def _device(device: str) -> str:
    """ "auto": CUDA when present, else the CPU (as `em.load_model`); any other name as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
