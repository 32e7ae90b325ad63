"""Evaluation (design stage 6): route each test sequence by its prefix, score it, aggregate.

`evaluate_chunk` writes one row per (test sequence, inference prefix length M̂): the E routers'
prefix NLLs, the expert they pick by argmin (Eq. 4 and 8, no capacity at inference, §2.2), and the
summed NLL of the sequence under that expert, the dense baseline, the best expert in hindsight
(oracle) and a c-BTM-style top-k ensemble; `smalltalk.aggregate` turns those rows into the
paper's numbers.

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

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from smalltalk.checkpoint import load_model, resolve_device
from smalltalk.config import ModelConfig
from smalltalk.files import write_parquet_atomically
from smalltalk.model import LM
from smalltalk.routers import Router, RoutingBatch
from smalltalk.routing import route
from smalltalk.scoring import (
    ensemble_log_weights,
    predicted_positions,
    token_logprobs,
)
from smalltalk.tokens import gather_rows, token_matrix

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


# ---- the workflow's evaluation, in three kinds of job ------------------------------------------
#
# The workflow evaluates a part of the test split (a few token files of one corpus) in pieces, so
# that retraining or adding one expert re-scores only that expert's piece: `route_part` writes one
# router's (or one fitted baseline's) costs, and `score_part` one model's per-sequence NLLs and
# per-token log-probabilities after the training prefix; `merge_part` turns those files into the
# `EVAL_SCHEMA` rows (routing, oracle, top-k) with no model loaded. `evaluate_chunk` does all
# three for one token file in one process, without the intermediate files.

ROUTES_METADATA = b"smalltalk.routes"  # JSON in the file's schema: the M̂ and number of routers
SCORES_METADATA = b"smalltalk.train_prefix_len"  # M: log-probs are of tokens j >= M

ROUTES_SCHEMA = pa.schema(
    [
        ("seq_id", pa.int64()),
        ("router_nll", pa.list_(pa.float32())),  # costs (P, E') flattened, M̂-major
    ]
)
SCORES_SCHEMA = pa.schema(
    [
        ("seq_id", pa.int64()),
        ("nll_after", pa.float64()),  # summed NLL of the tokens j >= M
        ("nll_full", pa.float64()),  # summed NLL of all S predicted tokens
        ("logprobs_after", pa.list_(pa.float32())),  # log p of each token j >= M (the top-k mix)
    ]
)


@dataclass(frozen=True)
class SequenceScores:
    """One model's scores of n sequences: what the mixture's rows need of it."""

    nll_after: np.ndarray  # (n,) float64, tokens j >= M
    nll_full: np.ndarray  # (n,) float64, tokens j = 1..S
    logprobs_after: np.ndarray  # (n, T) float32, T = S + 1 - M

    def __len__(self) -> int:
        return len(self.nll_after)


@torch.inference_mode()
def score_sequences(
    model: LM, tokens: np.ndarray, train_prefix_len: int, batch_size: int
) -> SequenceScores:
    """`model`'s `SequenceScores` of the rows of tokens (n, S+1)."""
    first = predicted_positions(tokens.shape[1], start=train_prefix_len).start - 1
    logprobs = token_logprobs(model, tokens, batch_size)  # (n, S): column j-1 is token j
    after = logprobs[:, first:]  # (n, T)
    return SequenceScores(
        nll_after=(-after.double().sum(dim=1)).cpu().numpy(),
        nll_full=(-logprobs.sum(dim=1, dtype=torch.float64)).cpu().numpy(),
        logprobs_after=after.cpu().numpy(),
    )


def merge_scores(
    table: pa.Table,
    router_nll: np.ndarray,
    experts: Sequence[SequenceScores],
    dense: SequenceScores,
    *,
    prefix_lens: Sequence[int],
    seq_len: int,
    topk: int,
    temperature: float,
    expert_ids: Sequence[int] | None = None,
    baselines: Mapping[str, SequenceScores] | None = None,
) -> pa.Table:
    """The `EVAL_SCHEMA` rows of n sequences of S + 1 tokens (`table`: seq_id, source) from
    the routers' costs (n, P, E), each expert's scores and the dense model's. `expert_ids` names
    the E experts in the rows (default 0..E-1): a subset of a mixture keeps its indices.
    `baselines` adds a column nll_{name} per further dense baseline (`training.baselines`)."""
    n, n_prefixes, n_experts = router_nll.shape
    expert_ids = np.arange(n_experts) if expert_ids is None else np.asarray(expert_ids)
    routed = route(router_nll.reshape(n * n_prefixes, n_experts)).reshape(n, n_prefixes)
    log_weights = ensemble_log_weights(router_nll, topk, temperature)  # (n, P, E)
    n_scored = experts[0].logprobs_after.shape[1] if n else 0  # T
    # log sum_e w_e p_e(x_t), one expert at a time; weight -inf adds nothing (logaddexp(a, -inf)
    # == a exactly), so experts outside every row's top k are skipped.
    mixture = np.full((n, n_prefixes, n_scored), -np.inf)  # (n, P, T)
    for e in np.flatnonzero(np.isfinite(log_weights).any(axis=(0, 1))):
        after = experts[e].logprobs_after.astype(np.float64)  # (n, T)
        np.logaddexp(mixture, log_weights[:, :, e, None] + after[:, None, :], out=mixture)
    nll_topk = -mixture.sum(axis=2)  # (n, P)
    nll_after = np.stack([scores.nll_after for scores in experts], axis=1)  # (n, E)
    nll_full = np.stack([scores.nll_full for scores in experts], axis=1)

    rows = np.arange(n)[:, None]  # (n, 1), broadcast against (n, P)
    oracle = nll_after.argmin(axis=1) if n else np.zeros(0, np.int64)  # lowest index on ties
    per_row = np.repeat(np.arange(n), n_prefixes)  # (n*P,) sequence of each output row
    router_values = pa.array(router_nll.reshape(-1), pa.float32())  # (n*P*E,)
    offsets = pa.array(np.arange(0, n * n_prefixes + 1, dtype=np.int32) * n_experts)
    baselines = baselines or {}
    return pa.table(
        {
            "seq_id": table.column("seq_id").take(per_row),
            "source": table.column("source").take(per_row),
            "prefix_len": np.tile(np.asarray(prefix_lens, np.int32), n),
            "expert": expert_ids[routed].reshape(-1).astype(np.int16),
            "router_nll": pa.ListArray.from_arrays(offsets, router_values),
            "n_tokens": np.full(n * n_prefixes, n_scored, np.int32),
            "nll_expert": nll_after[rows, routed].reshape(-1),
            "nll_dense": dense.nll_after[per_row],
            "n_tokens_full": np.full(n * n_prefixes, seq_len, np.int32),
            "nll_expert_full": nll_full[rows, routed].reshape(-1),
            "nll_dense_full": dense.nll_full[per_row],
            "oracle_expert": expert_ids[oracle][per_row].astype(np.int16),
            "nll_oracle": nll_after[np.arange(n), oracle][per_row],
            "nll_topk": nll_topk.reshape(-1),
            **{f"nll_{name}": scores.nll_after[per_row] for name, scores in baselines.items()},
        },
        schema=eval_schema(baselines),
    )


def eval_schema(baselines: Sequence[str] = ()) -> pa.Schema:
    """`EVAL_SCHEMA` and a column nll_{name} per further dense baseline: the summed NLL of the
    same tokens as nll_dense."""
    return pa.schema([*EVAL_SCHEMA, *(pa.field(f"nll_{name}", pa.float64()) for name in baselines)])


def read_tokens(paths: Sequence[str | os.PathLike], columns: list[str]) -> pa.Table:
    """The `columns` of the token files, one after the other."""
    if not paths:
        raise ValueError("no token file given")
    return pa.concat_tables([pq.read_table(path, columns=columns) for path in paths])


def route_part(
    *,
    tokens_paths: Sequence[str | os.PathLike],
    router: Router,
    prefix_lens: Sequence[int],
    out: str | os.PathLike,
) -> np.ndarray:
    """One router's (or fitted baseline's) costs of every sequence of the token files (in order)
    for each M̂ (deduplicated, ascending): `ROUTES_SCHEMA` rows to `out`; returns (n, P, E')."""
    table = read_tokens(tokens_paths, ["seq_id", "tokens", "source"])
    batch = RoutingBatch.from_table(table)
    prefix_lens = sorted({int(m) for m in prefix_lens})
    if len(batch):
        _check_prefix_lens(prefix_lens, batch.tokens.shape[1], router.max_prefix_len)
    costs = router.costs(batch, prefix_lens)  # (n, P, E')
    n, n_prefixes, n_routers = costs.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * n_prefixes * n_routers)
    routes = pa.table(
        {
            "seq_id": table.column("seq_id"),
            "router_nll": pa.ListArray.from_arrays(offsets, pa.array(costs.reshape(-1))),
        },
        schema=ROUTES_SCHEMA.with_metadata(
            {ROUTES_METADATA: json.dumps({"prefix_lens": prefix_lens, "routers": n_routers})}
        ),
    )
    write_parquet_atomically(routes, out)
    return costs


def read_routes(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, list[int], np.ndarray]:
    """The `route_part` files of one chunk side by side: (seq_ids, prefix_lens, costs (n, P, E)),
    E the routers of all files in their order. Files of other sequences or M̂ are refused."""
    seq_ids, prefix_lens, parts = None, None, []
    for path in paths:
        table = pq.read_table(path)
        meta = (table.schema.metadata or {}).get(ROUTES_METADATA)
        if meta is None or table.schema.remove_metadata() != ROUTES_SCHEMA:
            raise ValueError(f"{path}: not a route_part file")
        meta = json.loads(meta)
        lens, width = meta["prefix_lens"], meta["routers"]
        ids = table.column("seq_id").to_numpy()
        if seq_ids is None:
            seq_ids, prefix_lens = ids, lens
        elif lens != prefix_lens or not np.array_equal(ids, seq_ids):
            raise ValueError(
                f"{path}: routes other sequences or prefix lengths than {paths[0]} (stale file?)"
            )
        flat = table.column("router_nll").combine_chunks().flatten().to_numpy()
        parts.append(flat.reshape(len(ids), len(lens), width))
    if seq_ids is None:
        raise ValueError("read_routes needs at least one file")
    return seq_ids, prefix_lens, np.concatenate(parts, axis=2)


def score_part(
    *,
    tokens_paths: Sequence[str | os.PathLike],
    model_config: ModelConfig,
    weights: str | os.PathLike,
    train_prefix_len: int,
    batch_size: int,
    out: str | os.PathLike,
    slice_rows: int = SLICE_ROWS,
    device: str = "auto",
) -> pa.Table:
    """One model's `SCORES_SCHEMA` rows of every sequence of the token files, in order, to `out`.
    Scored in slices of `slice_rows` sequences; `device` "auto" is CUDA when present."""
    table = read_tokens(tokens_paths, ["seq_id", "tokens"])
    tokens = token_matrix(table.column("tokens"))  # (n, S+1)
    if len(tokens):
        _check_model_length(model_config, tokens.shape[1], train_prefix_len)
    model = load_model(model_config, weights, resolve_device(device))
    parts = [
        score_sequences(model, tokens[i : i + slice_rows], train_prefix_len, batch_size)
        for i in range(0, len(tokens), slice_rows)
    ]
    n_scored = tokens.shape[1] - max(train_prefix_len, 1) if len(tokens) else 0
    scores = SequenceScores(
        nll_after=np.concatenate([p.nll_after for p in parts]) if parts else np.zeros(0),
        nll_full=np.concatenate([p.nll_full for p in parts]) if parts else np.zeros(0),
        logprobs_after=np.concatenate([p.logprobs_after for p in parts])
        if parts
        else np.zeros((0, n_scored), np.float32),
    )
    offsets = pa.array(np.arange(len(tokens) + 1, dtype=np.int32) * n_scored)
    result = pa.table(
        {
            "seq_id": table.column("seq_id"),
            "nll_after": scores.nll_after,
            "nll_full": scores.nll_full,
            "logprobs_after": pa.ListArray.from_arrays(
                offsets, pa.array(scores.logprobs_after.reshape(-1), pa.float32())
            ),
        },
        schema=SCORES_SCHEMA.with_metadata({SCORES_METADATA: str(train_prefix_len)}),
    )
    write_parquet_atomically(result, out)
    return result


def read_scores(path: str | os.PathLike) -> tuple[np.ndarray, int, SequenceScores]:
    """A `score_part` file: (seq_ids, its training prefix M, the scores)."""
    table = pq.read_table(path)
    meta = (table.schema.metadata or {}).get(SCORES_METADATA)
    if meta is None or table.schema.remove_metadata() != SCORES_SCHEMA:
        raise ValueError(f"{path}: not a score_part file")
    logprobs = table.column("logprobs_after").combine_chunks()
    n = table.num_rows
    width = len(logprobs[0]) if n else 0
    return (
        table.column("seq_id").to_numpy(),
        int(meta),
        SequenceScores(
            nll_after=table.column("nll_after").to_numpy(),
            nll_full=table.column("nll_full").to_numpy(),
            logprobs_after=logprobs.flatten().to_numpy().reshape(n, width),
        ),
    )


def merge_part(
    *,
    tokens_paths: Sequence[str | os.PathLike],
    routes: Sequence[str | os.PathLike],
    expert_scores: Sequence[str | os.PathLike],
    dense_scores: str | os.PathLike,
    topk: int,
    temperature: float,
    out: str | os.PathLike,
    experts: Sequence[int] | None = None,
    slice_rows: int = SLICE_ROWS,
    baseline_scores: Mapping[str, str | os.PathLike] | None = None,
) -> pa.Table:
    """The `EVAL_SCHEMA` rows of the token files from their `route_part` files (routers in
    expert order) and `score_part` files (expert e's at position e, then the dense model's, then
    each further dense baseline's of `baseline_scores`, a column nll_{name} each).

    `experts` keeps a subset of the mixture (its routers and experts, by index; default all):
    the rows of the mixture before it grew, or after some experts retired. A top-k larger than
    the experts kept mixes them all.
    """
    table = read_tokens(tokens_paths, ["seq_id", "source"])
    seq_ids, prefix_lens, router_nll = read_routes(routes)
    n_all = router_nll.shape[2]
    if len(expert_scores) != n_all:
        raise ValueError(f"{n_all} routers but {len(expert_scores)} expert score files")
    kept = list(range(n_all)) if experts is None else sorted(set(experts))
    if not kept or not all(0 <= e < n_all for e in kept):
        raise ValueError(
            f"experts {list(experts or [])} must be a non-empty subset of 0..{n_all - 1}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    baseline_scores = dict(baseline_scores or {})
    scores, train_prefix_lens = [], set()
    for path in [*(expert_scores[e] for e in kept), dense_scores, *baseline_scores.values()]:
        ids, train_prefix_len, part = read_scores(path)
        train_prefix_lens.add(train_prefix_len)
        if not np.array_equal(ids, seq_ids):
            raise ValueError(f"{path}: scores other sequences than {routes[0]} (stale file?)")
        scores.append(part)
    if not np.array_equal(table.column("seq_id").to_numpy(), seq_ids):
        raise ValueError(
            f"{routes[0]}: routes other sequences than {', '.join(map(str, tokens_paths))} "
            "(stale file?)"
        )
    if len(train_prefix_lens) > 1:
        raise ValueError(f"score files after different training prefixes {train_prefix_lens}")
    # T = S + 1 - max(M, 1) tokens after the prefix, so S follows from the log-probs' width.
    seq_len = scores[0].logprobs_after.shape[1] + max(train_prefix_lens.pop(), 1) - 1
    router_nll = router_nll[:, :, kept]
    baseline_parts = dict(zip(baseline_scores, scores[len(kept) + 1 :], strict=True))
    slices = [
        merge_scores(
            table.slice(start, slice_rows),
            router_nll[start : start + slice_rows],
            [_rows(part, start, slice_rows) for part in scores[: len(kept)]],
            _rows(scores[len(kept)], start, slice_rows),
            prefix_lens=prefix_lens,
            seq_len=seq_len,
            topk=min(topk, len(kept)),
            temperature=temperature,
            expert_ids=kept,
            baselines={
                name: _rows(part, start, slice_rows) for name, part in baseline_parts.items()
            },
        )
        for start in range(0, table.num_rows, slice_rows)
    ]
    result = pa.concat_tables(slices) if slices else eval_schema(baseline_scores).empty_table()
    write_parquet_atomically(result, out)
    return result


def _rows(scores: SequenceScores, start: int, count: int) -> SequenceScores:
    end = start + count
    return SequenceScores(
        scores.nll_after[start:end], scores.nll_full[start:end], scores.logprobs_after[start:end]
    )


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
    """Route and score every sequence of one test token file; write `EVAL_SCHEMA` rows to `out`:
    the rows `merge_part` writes from the workflow's parts, in one process and without them.

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
    device = resolve_device(device)
    router_nll = router.costs(batch, prefix_lens)  # (N, P, E)
    table = table.select(["seq_id", "source"])
    slices = []
    for start in range(0, len(tokens), slice_rows):
        rows = tokens[start : start + slice_rows]
        experts = []
        for path in expert_weights:  # one model loaded at a time
            experts.append(
                score_sequences(
                    load_model(expert_config, path, device),
                    rows,
                    train_prefix_len,
                    batch_size,
                )
            )
        dense = score_sequences(
            load_model(expert_config, dense_weights, device),
            rows,
            train_prefix_len,
            batch_size,
        )
        slices.append(
            merge_scores(
                table.slice(start, slice_rows),
                router_nll[start : start + slice_rows],
                experts,
                dense,
                prefix_lens=prefix_lens,
                seq_len=tokens.shape[1] - 1,
                topk=topk,
                temperature=temperature,
            )
        )
    result = pa.concat_tables(slices) if slices else EVAL_SCHEMA.empty_table()
    write_parquet_atomically(result, out)
    return result


def _check_prefix_lens(prefix_lens: list[int], length: int, router_max_prefix_len: int | None):
    """Router LMs read M̂ - 1 tokens (Eq. 9), experts S; at least one token follows the prefix."""
    seq_len = length - 1
    longest = min(seq_len, router_max_prefix_len or seq_len)
    if not prefix_lens or any(not 2 <= m <= longest for m in prefix_lens):
        raise ValueError(
            f"prefix_lens {prefix_lens} must lie in [2, {longest}] for sequences of {length} "
            f"tokens and routers reading at most {router_max_prefix_len} tokens"
        )


def _check_model_length(config: ModelConfig, length: int, train_prefix_len: int):
    seq_len = length - 1
    errors = []
    if not 1 <= train_prefix_len <= seq_len:
        errors.append(f"train_prefix_len must lie in [1, {seq_len}], got {train_prefix_len}")
    if seq_len > config.seq_len:
        errors.append(
            f"sequences of {length} tokens need experts with seq_len >= {seq_len}, "
            f"got {config.seq_len}"
        )
    if errors:
        raise ValueError("; ".join(errors))


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
        for check, arguments in (
            (_check_prefix_lens, (prefix_lens, length, router_max_prefix_len)),
            (_check_model_length, (expert_config, length, train_prefix_len)),
        ):
            try:
                check(*arguments)
            except ValueError as error:
                errors.append(str(error))
    if errors:
        raise ValueError("evaluate_chunk: " + "; ".join(errors))


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
    gather_rows(tokens_paths, expert_of, out_paths)
    return np.bincount(experts, minlength=len(out_paths)).tolist()
