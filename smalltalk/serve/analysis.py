"""What each segment holds, and a text's routing beside it: `smalltalk explain`.

Reads the training shards of the results directory a mixture was loaded from (an export holds
none), once they are the ones the workflow's shard check listed (segmentation/check.json): each
EM segment's size and source mix by DuckDB over every shard, and its most characteristic tokens
by TF-IDF over a sample of its sequences.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from smalltalk.serve.mixture import Mixture


@dataclass(frozen=True)
class Segment:
    """What one expert was trained on: its shard's size, source mix and most typical tokens."""

    expert: int
    sequences: int
    share: float
    """Of all train sequences."""
    sources: dict[str, float] = field(default_factory=dict)
    """Share of the segment's sequences per source label, largest first."""
    tokens: tuple[str, ...] = ()
    """Pieces with the highest TF-IDF weight of this segment against the others."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Profiling reads every shard: once per mixture, however many texts it explains.
_profiled: weakref.WeakKeyDictionary[Mixture, list[Segment]] = weakref.WeakKeyDictionary()


def segments(mixture: Mixture, top_tokens: int = 10, sample: int = 5000) -> list[Segment]:
    """The served experts' segments: size and source mix (over all their shards) and most
    characteristic tokens (TF-IDF over a sample of their sequences, `segment_profiles`)."""
    if mixture not in _profiled:
        if mixture.files.exported:
            raise FileNotFoundError(
                f"{mixture.results}: an export holds no training shards, so it cannot tell "
                "what each segment holds; ask the results directory it was exported from"
            )
        from smalltalk.shard import checked_shards

        # Every shard the shard check saw, or no report: a segment's size and source mix from
        # part of its shards (a run killed while re-sharding) would mislead without a word.
        checked_shards(mixture.files.shards, mixture.files.shard_check)
        # EM's segments only: a grown expert's segment is its whole corpus, not a shard.
        profiles = segment_profiles(
            mixture.files.shards,
            mixture.config["routing"]["n_experts"],
            mixture.tokenizer,
            top_tokens,
            sample,
        )
        _profiled[mixture] = [s for s in profiles if s.expert in mixture.experts]
    return _profiled[mixture]


def explain(mixture: Mixture, text: str, prefix_tokens: int | None = None) -> dict[str, Any]:
    """The routing of `text` (every router's prefix NLL) beside what each segment holds."""
    routing = mixture.route_ids([mixture.encode(text)], prefix_tokens)[0]
    return {
        "routing": routing.as_dict(),
        "segments": [
            {
                **segment.as_dict(),
                "router_nll": routing.router_nll[routing.routers.index(segment.expert)],
            }
            for segment in segments(mixture)
        ],
    }


def segment_profiles(
    shards: Path, n_experts: int, tokenizer, top_tokens: int = 10, sample: int = 5000
) -> list[Segment]:
    """Every segment in `shards/expert={e}/*.parquet`: sizes and sources by DuckDB over every
    shard, tokens from the first `sample` sequences of each segment.

    Each sequence is a document of token counts; TF-IDF (scikit-learn's TfidfTransformer,
    sublinear tf, l2 rows) discounts the tokens every sequence has, and a segment's most
    characteristic tokens are those whose mean weight in its sequences most exceeds their mean
    weight in the other segments'.
    """
    files = sorted(shards.glob("expert=*/*.parquet"))
    if not files:
        raise FileNotFoundError(f"{shards}: no shards; has the workflow sharded the train split?")
    sizes, sources = _sources(files, n_experts)
    tokens, labels = _sample(shards, n_experts, sample)
    means = _mean_tfidf(tokens, labels, n_experts, tokenizer.get_piece_size())  # (E, V)
    readable = np.array(
        [
            not (tokenizer.is_control(i) or tokenizer.is_unknown(i) or tokenizer.is_byte(i))
            and len(tokenizer.id_to_piece(i).strip("▁")) > 1
            for i in range(tokenizer.get_piece_size())
        ]
    )  # single characters, bytes and specials say little
    total = max(int(sizes.sum()), 1)
    profiles = []
    for e in range(n_experts):
        others = np.delete(means, e, axis=0).mean(axis=0) if n_experts > 1 else 0.0
        contrast = np.where(readable & (means[e] > 0), means[e] - others, -np.inf)
        order = np.argsort(-contrast, kind="stable")[:top_tokens]
        profiles.append(
            Segment(
                expert=e,
                sequences=int(sizes[e]),
                share=float(sizes[e] / total),
                sources={s: n / max(int(sizes[e]), 1) for s, n in sources[e].items()},
                tokens=tuple(tokenizer.id_to_piece(int(i)) for i in order if contrast[i] > -np.inf),
            )
        )
    return profiles


def _sources(files: list[Path], n_experts: int) -> tuple[np.ndarray, list[dict[str, int]]]:
    """Sequences per segment (E,) and per segment and source, largest first, over all shards."""
    import duckdb

    con = duckdb.connect(config={"threads": 1})
    counts = con.execute(
        "SELECT expert, source, count(*) AS n FROM read_parquet(?, hive_partitioning = true) "
        "GROUP BY ALL ORDER BY expert, n DESC, source",
        [[str(f) for f in files]],
    ).fetchall()
    con.close()
    sizes = np.zeros(n_experts, dtype=np.int64)
    sources: list[dict[str, int]] = [{} for _ in range(n_experts)]
    for expert, source, n in counts:
        sizes[int(expert)] += n
        sources[int(expert)][source] = n
    return sizes, sources


def _sample(shards: Path, n_experts: int, sample: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `sample` sequences of each segment (n, S+1) and their segments (n,)."""
    import pyarrow.parquet as pq

    from smalltalk.tokens import token_matrix

    parts, labels = [], []
    for e in range(n_experts):
        taken = 0
        for path in sorted(shards.glob(f"expert={e}/*.parquet")):
            if taken >= sample:
                break
            tokens = token_matrix(pq.read_table(path, columns=["tokens"]).column("tokens"))
            parts.append(tokens[: sample - taken].astype(np.int64))  # (n, S+1)
            labels.append(np.full(len(parts[-1]), e))
            taken += len(parts[-1])
    return np.concatenate(parts), np.concatenate(labels)


def _mean_tfidf(
    tokens: np.ndarray, labels: np.ndarray, n_experts: int, vocab_size: int
) -> np.ndarray:
    """(E, V) mean TF-IDF weight of each token over each segment's sequences; a segment without
    sequences keeps zeros."""
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfTransformer

    rows = np.repeat(np.arange(len(tokens)), tokens.shape[1])
    per_sequence = sparse.csr_matrix(
        (np.ones(tokens.size, np.float32), (rows, tokens.ravel())),
        shape=(len(tokens), vocab_size),
    )  # (n, V) token counts, duplicates summed
    weights = TfidfTransformer(sublinear_tf=True).fit_transform(per_sequence)
    return np.stack(
        [np.asarray(weights[labels == e].mean(axis=0)).ravel() for e in range(n_experts)]
    )
