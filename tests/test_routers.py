"""The routing methods behind `routing.method`: c-BTM's TF-IDF + balanced k-means, random and
source-label routing, fitted and reloaded, and sharding through any of them."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from conftest import DOMAINS
from hypothesis import given, settings
from hypothesis import strategies as st

from smalltalk.em import normalized_mutual_information
from smalltalk.routers import (
    RandomRouter,
    RoutingBatch,
    SourceRouter,
    balanced_kmeans,
    fit_baseline,
    group_sources,
    load_router,
)
from smalltalk.shard import check_shards, shard_chunk
from smalltalk.tokens import token_schema

SEQ = 33  # tokens per row: S + 1
PREFIX = 16


def domain_text(rng: random.Random, domain: str, words: int = 40) -> str:
    return " ".join(rng.choices(DOMAINS[domain], k=words))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    lines = [domain_text(rng, domain) for domain in sorted(DOMAINS) for _ in range(50)]
    (folder / "text.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(folder / "text.txt"),
        model_prefix=str(folder / "spm"),
        vocab_size=300,
        byte_fallback=True,
        model_type="bpe",
        minloglevel=2,
    )
    return folder / "spm.model"


def write_domain_tokens(path, tokenizer, first_id: int, count: int, seed: int) -> pa.Table:
    """`count` rows of one random domain each: SEQ tokens of that domain's words."""
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer))
    rng = random.Random(seed)
    rows, sources = [], []
    for _ in range(count):
        domain = rng.choice(sorted(DOMAINS))
        ids = processor.encode(domain_text(rng, domain, words=60))[:SEQ]
        rows.append(ids)
        sources.append(domain)
    table = pa.table(
        {
            "seq_id": pa.array(first_id + np.arange(count), pa.int64()),
            "tokens": pa.array(rows, pa.list_(pa.uint16())),
            "source": pa.array(sources, pa.string()),
        },
        schema=token_schema(300),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=64)
    return table


def labels_of(sources) -> np.ndarray:
    return np.unique(np.asarray(sources, dtype=str), return_inverse=True)[1]


# ---- balanced k-means and source groups --------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(4, 120),
    k=st.integers(1, 4),
    dims=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_balanced_kmeans_makes_equal_clusters(n, k, dims, seed):
    points = np.random.default_rng(seed).normal(size=(n, dims))
    centroids, labels = balanced_kmeans(points, k, iterations=10, seed=seed)
    sizes = np.bincount(labels, minlength=k)
    # The balanced assignment's capacity (paper §2.2): no cluster above ceil(n / k).
    assert sizes.max() <= -(-n // k) and sizes.sum() == n
    assert centroids.shape == (k, dims)
    again = balanced_kmeans(points, k, iterations=10, seed=seed)
    assert np.array_equal(again[1], labels) and np.array_equal(again[0], centroids)


def test_balanced_kmeans_finds_separated_clusters_of_equal_size():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]])
    truth = np.repeat(np.arange(3), 50)
    points = centres[truth] + rng.normal(scale=0.5, size=(150, 2))
    _, labels = balanced_kmeans(points, 3, iterations=20, seed=1)
    assert normalized_mutual_information(labels, truth) == pytest.approx(1.0)


def test_balanced_kmeans_needs_a_point_per_cluster():
    with pytest.raises(ValueError, match="at least 3 points"):
        balanced_kmeans(np.zeros((2, 2)), 3, iterations=1, seed=0)


@given(
    st.dictionaries(st.text(min_size=1, max_size=5), st.integers(1, 1000), min_size=1),
    st.integers(1, 6),
)
def test_source_groups_are_balanced_and_deterministic(counts, n_groups):
    groups = group_sources(counts, n_groups)
    assert set(groups) == set(counts) and set(groups.values()) <= set(range(n_groups))
    sizes = np.zeros(n_groups, dtype=np.int64)
    for source, group in groups.items():
        sizes[group] += counts[source]
    # Largest-first greedy: the heaviest group exceeds the lightest by at most one source.
    if len(counts) >= n_groups:
        assert sizes.max() - sizes.min() <= max(counts.values())
    assert group_sources(dict(reversed(list(counts.items()))), n_groups) == groups


# ---- the routers' costs ------------------------------------------------------------------------


def test_random_router_is_a_function_of_the_sequence_id():
    router = RandomRouter(n_experts=4, seed=7)
    ids = np.arange(10_000, dtype=np.int64)
    batch = RoutingBatch(ids, np.zeros((len(ids), SEQ), np.int64), np.array(["a"] * len(ids)))
    costs = router.costs(batch, [8, 16])
    assert costs.shape == (10_000, 2, 4) and np.array_equal(costs[:, 0], costs[:, 1])
    part = RoutingBatch(ids[::3], batch.tokens[::3], batch.sources[::3])
    assert np.array_equal(router.costs(part, [8])[:, 0], costs[::3, 0])
    counts = np.bincount(costs[:, 0].argmin(axis=1), minlength=4)
    assert counts.min() > 2_300  # about uniform: 2,500 expected per expert
    other = RandomRouter(n_experts=4, seed=8).costs(batch, [8])[:, 0].argmin(axis=1)
    assert (other != costs[:, 0].argmin(axis=1)).mean() > 0.6


def test_source_router_routes_by_label_and_unseen_labels_cost_the_same_everywhere():
    router = SourceRouter(["a", "b", "c"], np.array([1, 0, 1]), n_experts=3)
    batch = RoutingBatch(
        np.arange(4), np.zeros((4, SEQ), np.int64), np.array(["a", "b", "c", "new"], dtype=object)
    )
    costs = router.costs(batch, [4])[:, 0]
    assert costs.argmin(axis=1).tolist()[:3] == [1, 0, 1]
    assert np.all(costs[3] == costs[3, 0])


# ---- fitted from a sample, saved, reloaded, sharding through them ------------------------------


def fit(method, samples, out, tokenizer, n_experts=3, seed=5):
    return fit_baseline(
        method=method,
        sample_paths=samples,
        n_experts=n_experts,
        prefix_len=PREFIX,
        seed=seed,
        tokenizer_model=tokenizer,
        out=out,
        svd_dims=8,
        iterations=20,
    )


@pytest.mark.parametrize("method", ["tfidf_kmeans", "source", "random"])
def test_fitted_router_round_trips_and_shards_every_sequence_once(tmp_path, tokenizer, method):
    sample = write_domain_tokens(tmp_path / "sample.parquet", tokenizer, 0, 300, seed=0)
    out = tmp_path / f"{method}.npz"
    summary = fit(method, [tmp_path / "sample.parquet"], out, tokenizer)
    assert summary["sequences"] == 300 and not list(tmp_path.glob(".*tmp*"))
    router = load_router(method=method, paths=[out], tokenizer_model=tokenizer)
    assert router.method == method and router.n_experts == 3
    batch = RoutingBatch.from_table(sample)
    routed = router.costs(batch, [PREFIX])[:, 0].argmin(axis=1)
    if method != "random":  # three domains with disjoint words: found from a 16-token prefix
        assert normalized_mutual_information(routed, labels_of(batch.sources)) > 0.95
    if method == "tfidf_kmeans":
        assert summary["cluster_sizes"] == [100, 100, 100]

    train = []
    for chunk in range(2):
        path = tmp_path / "tokens/train" / f"c{chunk}.parquet"
        write_domain_tokens(path, tokenizer, (chunk + 1) << 32, 151, seed=chunk + 1)
        train.append(path)
        loads = shard_chunk(
            tokens_path=path,
            router=router,
            prefix_len=PREFIX,
            shard_paths=[tmp_path / f"shards/expert={e}/c{chunk}.parquet" for e in range(3)],
            scores_path=tmp_path / f"scores/c{chunk}.parquet",
        )
        assert loads.sum() == 151 and loads.max() <= 51  # capacity ceil(151 / 3)
    report = check_shards(
        train_files=train,
        shard_files=sorted((tmp_path / "shards").rglob("*.parquet")),
        n_experts=3,
        out=tmp_path / "check.json",
    )
    assert report["ok"]


def test_fitting_is_deterministic_and_order_free(tmp_path, tokenizer):
    write_domain_tokens(tmp_path / "a.parquet", tokenizer, 0, 120, seed=0)
    write_domain_tokens(tmp_path / "b.parquet", tokenizer, 1000, 120, seed=1)
    outputs = []
    for name, order in (("one", ["a", "b"]), ("two", ["b", "a"])):
        out = tmp_path / f"{name}.npz"
        fit("tfidf_kmeans", [tmp_path / f"{part}.parquet" for part in order], out, tokenizer)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_a_router_file_of_another_method_is_refused(tmp_path, tokenizer):
    write_domain_tokens(tmp_path / "s.parquet", tokenizer, 0, 30, seed=0)
    out = tmp_path / "r.npz"
    fit("random", [tmp_path / "s.parquet"], out, tokenizer, n_experts=2)
    with pytest.raises(ValueError, match="holds a 'random' router, but routing.method is 'source'"):
        load_router(method="source", paths=[out])
    with pytest.raises(ValueError, match="no baseline called 'kmeans'"):
        fit("kmeans", [tmp_path / "s.parquet"], out, tokenizer, n_experts=2)
    assert str(np.load(out)["method"]) == "random"  # the failed fit left the file as it was


@pytest.mark.parametrize("init", ["random", "tfidf_kmeans"])
def test_em_round_zero_is_balanced_deterministic_and_tfidf_follows_content(
    tmp_path, tokenizer, init
):
    from smalltalk.em import assign_first_round
    from smalltalk.em import normalized_mutual_information as nmi

    block = write_domain_tokens(tmp_path / "b0.parquet", tokenizer, 0, 400, seed=3)
    n_experts = len(DOMAINS)

    def first_round(out):
        assign_first_round(
            tmp_path / "b0.parquet",
            n_experts,
            seed=11,
            out=tmp_path / out,
            init=init,
            tokenizer_model=tokenizer,
            prefix_len=PREFIX,
        )
        return pq.read_table(tmp_path / out)

    assignment = first_round("a.parquet")
    assert assignment.equals(first_round("again.parquet"))
    assert assignment.column("seq_id").to_pylist() == sorted(block.column("seq_id").to_pylist())
    loads = np.bincount(assignment.column("expert").to_numpy(), minlength=n_experts)
    assert loads.max() <= -(-len(block) // n_experts)  # the balanced capacity, ceil(n / E)
    sources = block.sort_by("seq_id").column("source").to_numpy(zero_copy_only=False)
    agreement = nmi(assignment.column("expert").to_numpy(), sources)
    # Domains of disjoint words: c-BTM's clusters find them; a random split knows nothing.
    assert agreement > 0.5 if init == "tfidf_kmeans" else agreement < 0.05


def test_em_round_zero_refuses_an_unknown_init(tmp_path, tokenizer):
    from smalltalk.em import assign_first_round

    write_domain_tokens(tmp_path / "b0.parquet", tokenizer, 0, 40, seed=3)
    with pytest.raises(ValueError, match="routing.init"):
        assign_first_round(tmp_path / "b0.parquet", 2, 1, tmp_path / "a.parquet", init="kmeans")
