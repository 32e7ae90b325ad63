"""Routing methods behind one interface (`routing.method`): a cost per (sequence, expert).

Sharding balances the costs of each chunk (`routing.balanced_assign`, equal-size segments);
inference and evaluation route each sequence to its cheapest expert (`routing.route`). So every
method feeds the same shard, expert, evaluation and report stages unchanged.

- `smalltalk` (paper §2.2): the E router LMs' mean NLL of the first M tokens.
- `tfidf_kmeans` (c-BTM, Gururangan et al. 2023, §2.2 there): TF-IDF of the prefix text, truncated
  SVD, L2 normalisation, then balanced k-means fitted on the EM sample; the cost is the squared
  distance to each centroid, so inference picks the nearest centroid from the same prefix the
  routers read.
- `random`: a seeded hash of (seq_id, expert); balanced at sharding, uniform at inference.
- `source`: the corpus's own source label, its sources packed into E groups of about equal
  size; a reference that needs labels at inference (the probe in the paper's reviews).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from smalltalk import checkpoint
from smalltalk.files import write_bytes_atomically
from smalltalk.routing import balanced_assign
from smalltalk.scoring import prefix_nll
from smalltalk.tokens import sampling_keys, token_matrix

METHODS = ("smalltalk", "tfidf_kmeans", "random", "source")
BASELINES = METHODS[1:]  # fitted once from the EM sample, one `.npz` file each


@dataclass(frozen=True)
class RoutingBatch:
    """What any method may read of n sequences: ids, tokens (n, S+1) and source labels."""

    seq_ids: np.ndarray
    tokens: np.ndarray
    sources: np.ndarray

    @classmethod
    def from_table(cls, table: pa.Table) -> RoutingBatch:
        return cls(
            seq_ids=table.column("seq_id").to_numpy(),
            tokens=token_matrix(table.column("tokens")),
            sources=np.asarray(table.column("source").to_pylist(), dtype=object),
        )

    def __len__(self) -> int:
        return len(self.seq_ids)


class Router(Protocol):
    method: str
    n_experts: int
    max_prefix_len: int | None  # the longest prefix it can read (None: any)

    def costs(self, batch: RoutingBatch, prefix_lens: Sequence[int]) -> np.ndarray:
        """(n, len(prefix_lens), E) float32; lower is better. For `smalltalk` the routers'
        mean prefix NLL, which the evaluation tables report as `router_nll`."""
        ...


# ---- smalltalk: the router LMs -----------------------------------------------------------------


class LMRouters:
    """The E router LMs (paper §2.2). `keep_loaded` holds all E in memory (shard jobs score
    many row groups); otherwise each is loaded, used for every M̂ and released in turn."""

    method = "smalltalk"

    def __init__(
        self,
        config,
        weights: Sequence[str | os.PathLike],
        device: str = "auto",
        keep_loaded: bool = False,
    ):
        if not weights:
            raise ValueError("the smalltalk method needs one router weights file per expert")
        self.config, self.weights, self.device = config, list(weights), device
        self.n_experts = len(self.weights)
        self.max_prefix_len = config.seq_len + 1  # an LM reads M - 1 tokens (Eq. 9)
        self._loaded = [self._load(path) for path in self.weights] if keep_loaded else None

    def _load(self, path):
        return checkpoint.load_model(self.config, path, self.device)

    def costs(self, batch: RoutingBatch, prefix_lens: Sequence[int]) -> np.ndarray:
        scores = np.empty((len(batch), len(prefix_lens), self.n_experts), dtype=np.float32)
        if len(batch) == 0:
            return scores
        for e, path in enumerate(self.weights):
            router = self._loaded[e] if self._loaded else self._load(path)
            for p, prefix_len in enumerate(prefix_lens):
                scores[:, p, e] = prefix_nll(router, batch.tokens, prefix_len)
            del router
        return scores


# ---- c-BTM: TF-IDF -> SVD -> balanced k-means --------------------------------------------------


def _vectorizer(vocabulary=None, max_features=None):
    from sklearn.feature_extraction.text import TfidfVectorizer

    # c-BTM's settings: sublinear term frequency, English stop words, l2-normalised rows.
    return TfidfVectorizer(
        sublinear_tf=True,
        stop_words="english",
        vocabulary=vocabulary,
        max_features=max_features,
        dtype=np.float64,
    )


class TfidfKMeansRouter:
    method = "tfidf_kmeans"
    max_prefix_len = None

    def __init__(self, vocabulary, idf, components, centroids, tokenizer_model):
        import sentencepiece as spm

        self.vectorizer = _vectorizer({term: i for i, term in enumerate(vocabulary)})
        self.vectorizer.idf_ = idf  # the fitted weights; the vocabulary is fixed above
        self.components, self.centroids = components, centroids
        self.n_experts = len(centroids)
        self.tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer_model))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return embed_texts(self.vectorizer, self.components, texts)

    def costs(self, batch: RoutingBatch, prefix_lens: Sequence[int]) -> np.ndarray:
        scores = np.empty((len(batch), len(prefix_lens), self.n_experts), dtype=np.float32)
        for p, prefix_len in enumerate(prefix_lens):
            texts = decode_prefixes(self.tokenizer, batch.tokens, prefix_len)
            scores[:, p] = squared_distances(self.embed(texts), self.centroids)
        return scores


def decode_prefixes(tokenizer, tokens: np.ndarray, prefix_len: int) -> list[str]:
    """The text of each row's first `prefix_len` tokens: what a router would read."""
    return tokenizer.decode([row.tolist() for row in tokens[:, :prefix_len]]) if len(tokens) else []


def embed_texts(vectorizer, components: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """TF-IDF -> projection on the SVD components -> L2 normalisation (c-BTM), (n, k)."""
    from sklearn.preprocessing import normalize

    if not len(texts):
        return np.empty((0, components.shape[0]))
    return normalize(vectorizer.transform(texts) @ components.T)


def squared_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return (
        (points**2).sum(axis=1, keepdims=True)
        - 2 * points @ centroids.T
        + (centroids**2).sum(axis=1)[None, :]
    ).clip(min=0)


def balanced_kmeans(
    points: np.ndarray, n_clusters: int, *, iterations: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """k-means whose assignment step is the balanced assignment (equal-size clusters, as
    c-BTM trains its experts); k-means++ seeding. Returns (centroids (k, d), labels (n,))."""
    from sklearn.cluster import kmeans_plusplus

    if len(points) < n_clusters:
        raise ValueError(f"balanced k-means needs at least {n_clusters} points, got {len(points)}")
    centroids, _ = kmeans_plusplus(points, n_clusters, random_state=seed)
    labels = None
    for _ in range(iterations):
        new_labels = balanced_assign(squared_distances(points, centroids))
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for k in range(n_clusters):
            centroids[k] = points[labels == k].mean(axis=0)
    return centroids, labels


# ---- random and source -------------------------------------------------------------------------


class RandomRouter:
    method = "random"
    max_prefix_len = None

    def __init__(self, n_experts: int, seed: int):
        self.n_experts, self.seed = n_experts, seed

    def costs(self, batch: RoutingBatch, prefix_lens: Sequence[int]) -> np.ndarray:
        # A hash per (sequence, expert): the same sequence routes the same way in every job.
        keys = np.stack(
            [sampling_keys(batch.seq_ids, self.seed + e) for e in range(self.n_experts)], axis=1
        )
        uniform = (keys >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
        return np.repeat(uniform[:, None, :], len(prefix_lens), axis=1)


class SourceRouter:
    method = "source"
    max_prefix_len = None

    def __init__(self, sources: Sequence[str], groups: np.ndarray, n_experts: int):
        self.group_of = dict(zip(sources, groups.tolist(), strict=True))
        self.n_experts = n_experts

    def costs(self, batch: RoutingBatch, prefix_lens: Sequence[int]) -> np.ndarray:
        # 0 for the source's own group, 1 elsewhere; a source unseen when fitting costs 1
        # everywhere (it goes to expert 0 at inference, and wherever there is room at sharding).
        cost = np.ones((len(batch), self.n_experts), dtype=np.float32)
        for row, source in enumerate(batch.sources):
            group = self.group_of.get(source)
            if group is not None:
                cost[row, group] = 0.0
        return np.repeat(cost[:, None, :], len(prefix_lens), axis=1)


def group_sources(counts: dict[str, int], n_groups: int) -> dict[str, int]:
    """Largest source first into the currently smallest group (LPT): E groups of about equal
    size; ties by name then group index, so the grouping is deterministic."""
    sizes = [0] * n_groups
    groups = {}
    for source, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        group = min(range(n_groups), key=lambda g: (sizes[g], g))
        groups[source] = group
        sizes[group] += count
    return groups


# ---- where a run keeps its routers, fitting them from the EM sample, loading them


def fit_tfidf_kmeans(
    texts: Sequence[str],
    n_experts: int,
    *,
    seed: int,
    svd_dims: int = 100,
    max_features: int | None = None,
    iterations: int = 20,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """c-BTM's clustering of `texts`: TF-IDF, truncated SVD, balanced k-means. Returns the
    fitted arrays (what `TfidfKMeansRouter` loads), each text's cluster and a summary."""
    from sklearn.decomposition import TruncatedSVD

    vectorizer = _vectorizer(max_features=max_features)
    tfidf = vectorizer.fit_transform(texts)
    dims = min(svd_dims, tfidf.shape[1] - 1)
    svd = TruncatedSVD(n_components=dims, algorithm="arpack", random_state=seed).fit(tfidf)
    points = embed_texts(vectorizer, svd.components_, texts)
    centroids, labels = balanced_kmeans(points, n_experts, iterations=iterations, seed=seed)
    arrays = {
        "vocabulary": np.array(vectorizer.get_feature_names_out(), dtype=str),
        "idf": vectorizer.idf_,
        "components": svd.components_,
        "centroids": centroids,
    }
    summary = {
        "features": tfidf.shape[1],
        "svd_dims": dims,
        "explained_variance": float(svd.explained_variance_ratio_.sum()),
        "cluster_sizes": np.bincount(labels, minlength=n_experts).tolist(),
    }
    return arrays, labels, summary


# ---- fitting from the EM sample and loading ----------------------------------------------------


def fit_baseline(
    *,
    method: str,
    sample_paths: Sequence[str | os.PathLike],
    n_experts: int,
    prefix_len: int,
    seed: int,
    tokenizer_model: str | os.PathLike,
    out: str | os.PathLike,
    svd_dims: int = 100,
    max_features: int | None = None,
    iterations: int = 20,
) -> dict:
    """Fit a baseline router on the sequences of `sample_paths` and save it to `out` (.npz,
    read back without pickle). Returns a summary for the log."""
    table = pa.concat_tables(
        [pq.read_table(path, columns=["seq_id", "tokens", "source"]) for path in sample_paths]
    ).sort_by("seq_id")  # files may come in any order: fit on a canonical one
    batch = RoutingBatch.from_table(table)
    arrays: dict[str, np.ndarray] = {
        "method": np.array(method),
        "n_experts": np.array(n_experts),
        "seed": np.array(seed),
    }
    summary = {"method": method, "sequences": len(batch), "n_experts": n_experts}
    if method == "tfidf_kmeans":
        import sentencepiece as spm

        tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
        texts = decode_prefixes(tokenizer, batch.tokens, prefix_len)
        fitted, labels, fit_summary = fit_tfidf_kmeans(
            texts,
            n_experts,
            seed=seed,
            svd_dims=svd_dims,
            max_features=max_features,
            iterations=iterations,
        )
        arrays |= fitted
        summary |= fit_summary
    elif method == "source":
        names, counts = np.unique(batch.sources.astype(str), return_counts=True)
        groups = group_sources(dict(zip(names.tolist(), counts.tolist(), strict=True)), n_experts)
        arrays |= {
            "sources": np.array(list(groups), dtype=str),
            "groups": np.array(list(groups.values()), dtype=np.int64),
        }
        summary |= {"groups": groups}
    elif method != "random":
        raise ValueError(f"routing.method: no baseline called {method!r}; choose from {BASELINES}")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomically(buffer.getvalue(), out)
    return summary


def load_router(
    *,
    method: str,
    paths: Sequence[str | os.PathLike],
    router_config=None,
    tokenizer_model: str | os.PathLike | None = None,
    device: str = "auto",
    keep_loaded: bool = False,
) -> Router:
    """The router of a trained run: the E router LMs' weights for `smalltalk`, else the one
    `.npz` file `fit_baseline` wrote."""
    if method == "smalltalk":
        return LMRouters(router_config, paths, device=device, keep_loaded=keep_loaded)
    if len(paths) != 1:
        raise ValueError(f"routing.method {method}: expected one fitted router file, got {paths}")
    path = Path(paths[0])
    with np.load(path, allow_pickle=False) as saved:
        stored = str(saved["method"])
        if stored != method:
            raise ValueError(f"{path} holds a {stored!r} router, but routing.method is {method!r}")
        n_experts = int(saved["n_experts"])
        if method == "random":
            return RandomRouter(n_experts, int(saved["seed"]))
        if method == "source":
            return SourceRouter(saved["sources"].tolist(), saved["groups"], n_experts)
        return TfidfKMeansRouter(
            saved["vocabulary"].tolist(),
            saved["idf"],
            saved["components"],
            saved["centroids"],
            tokenizer_model,
        )
