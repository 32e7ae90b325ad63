"""The paired bootstrap of perplexity ratios, the verdict words and the spread over seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from smalltalk import stats
from smalltalk.stats import RatioCI, bootstrap_ratio, seed_spread, verdict


@st.composite
def scored_sequences(draw, min_size=1):
    """(nll_a, nll_b, n_tokens) of N sequences: NLLs near 2-5 nats per token, as a small LM's."""
    n = draw(st.integers(min_size, 60))
    n_tokens = draw(hnp.arrays(np.int64, n, elements=st.integers(1, 200)))
    per_token = st.floats(0.5, 8.0, allow_nan=False, allow_infinity=False)
    nll_a = n_tokens * draw(hnp.arrays(np.float64, n, elements=per_token))
    nll_b = n_tokens * draw(hnp.arrays(np.float64, n, elements=per_token))
    return nll_a, nll_b, n_tokens


@settings(max_examples=60, deadline=None)
@given(scored_sequences(), st.integers(0, 2**32 - 1))
def test_interval_contains_the_point_estimate(sequences, seed):
    nll_a, nll_b, n_tokens = sequences
    (ci,) = bootstrap_ratio(nll_a, nll_b, n_tokens, resamples=200, seed=seed)
    assert ci.ratio == pytest.approx(np.exp((nll_a.sum() - nll_b.sum()) / n_tokens.sum()))
    assert ci.low <= ci.ratio * (1 + 1e-12)
    assert ci.ratio <= ci.high * (1 + 1e-12)


@settings(max_examples=30, deadline=None)
@given(scored_sequences())
def test_identical_models_give_ratio_one_with_a_degenerate_interval(sequences):
    nll, _, n_tokens = sequences
    assert bootstrap_ratio(nll, nll, n_tokens, resamples=100) == [RatioCI(1.0, 1.0, 1.0)]


@settings(max_examples=30, deadline=None)
@given(scored_sequences(), st.floats(-1.0, 1.0))
def test_a_constant_shift_per_token_gives_exactly_its_ratio(sequences, shift):
    _, nll_b, n_tokens = sequences
    ci = bootstrap_ratio(nll_b + shift * n_tokens, nll_b, n_tokens, resamples=100)[0]
    for value in ci:
        assert value == pytest.approx(math.exp(shift), rel=1e-9)


def test_same_seed_same_numbers_other_seed_other_numbers():
    nll_a, nll_b, n_tokens = _simulated(np.random.default_rng(1), 500, true_log_ratio=0.01)
    first = bootstrap_ratio(nll_a, nll_b, n_tokens, seed=3)
    assert bootstrap_ratio(nll_a, nll_b, n_tokens, seed=3) == first
    other = bootstrap_ratio(nll_a, nll_b, n_tokens, seed=4)
    assert other != first and other[0].ratio == first[0].ratio


def test_columns_are_compared_with_the_baseline_on_shared_resamples():
    nll_a, nll_b, n_tokens = _simulated(np.random.default_rng(2), 300, true_log_ratio=-0.02)
    both = bootstrap_ratio(np.column_stack([nll_a, nll_b]), nll_b, n_tokens, resamples=300)
    assert both[0] == bootstrap_ratio(nll_a, nll_b, n_tokens, resamples=300)[0]
    assert both[1] == RatioCI(1.0, 1.0, 1.0)


def test_chunked_resamples_equal_one_chunk(monkeypatch):
    nll_a, nll_b, n_tokens = _simulated(np.random.default_rng(5), 100, true_log_ratio=0.0)
    whole = bootstrap_ratio(nll_a, nll_b, n_tokens, resamples=50)
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 250)  # two resamples at a time
    assert bootstrap_ratio(nll_a, nll_b, n_tokens, resamples=50) == whole


def _simulated(rng, n, true_log_ratio):
    """n sequences whose per-token NLL difference a - b has mean true_log_ratio: noisy,
    correlated between the models, with sequence lengths that vary."""
    n_tokens = rng.integers(20, 200, size=n)
    difficulty = rng.gamma(4.0, 0.8, size=n)  # per-token NLL of each sequence, shared
    nll_b = n_tokens * difficulty
    nll_a = nll_b + n_tokens * rng.normal(true_log_ratio, 0.3, size=n)
    return nll_a, nll_b, n_tokens


def test_intervals_cover_the_true_ratio_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials, covered = 200, 0
    for trial in range(trials):
        nll_a, nll_b, n_tokens = _simulated(rng, 200, true_log_ratio=0.05)
        (ci,) = bootstrap_ratio(nll_a, nll_b, n_tokens, resamples=400, seed=trial)
        # Token-weighted mean of the differences: the shifts are drawn per token around 0.05.
        covered += ci.low <= math.exp(0.05) <= ci.high
    assert 0.89 <= covered / trials <= 0.99


def test_no_sequences_give_nan_not_an_error():
    empty = np.array([])
    assert all(math.isnan(v) for v in bootstrap_ratio(empty, empty, empty)[0])


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="one row per sequence"):
        bootstrap_ratio(np.ones(3), np.ones(2), np.ones(3))


@pytest.mark.parametrize(
    ("ci", "words"),
    [
        ((0.95, 0.93, 0.97), "mixture better"),
        ((1.05, 1.01, 1.09), "dense better"),
        ((0.99, 0.97, 1.01), "no difference (CI contains 1)"),
        ((1.0, 1.0, 1.0), "no difference (CI contains 1)"),
        ((math.nan, math.nan, math.nan), "no data"),
    ],
)
def test_verdict_reads_the_interval_against_one(ci, words):
    assert verdict(*ci) == words


def test_verdict_names_the_models_compared():
    assert verdict(0.9, 0.85, 0.95, a="top-k ensemble") == "top-k ensemble better"


def test_seed_spread_by_hand():
    spread = seed_spread([0.96, 0.98, 1.0])
    assert spread.seeds == 3
    assert spread.mean == pytest.approx(0.98)
    assert spread.std == pytest.approx(0.02)
    assert (spread.min, spread.max) == (0.96, 1.0)
    half = 4.302652729911275 * 0.02 / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert (spread.low, spread.high) == pytest.approx((0.98 - half, 0.98 + half))


def test_fewer_than_three_seeds_give_no_interval():
    spread = seed_spread([0.96, 0.98])
    assert math.isnan(spread.low) and math.isnan(spread.high)
    assert verdict(spread.mean, spread.low, spread.high) == "no data"


@pytest.mark.parametrize("equal_lengths", [True, False])
def test_bootstrap_equals_a_plain_resampling_loop(monkeypatch, equal_lengths):
    rng = np.random.default_rng(7)
    nll_a, nll_b, n_tokens = _simulated(rng, 40, true_log_ratio=0.02)
    if equal_lengths:
        n_tokens = np.full(40, 64)
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 1)  # one resample per draw, as the loop
    (ci,) = bootstrap_ratio(nll_a, nll_b, n_tokens, resamples=300, seed=11)
    draws = np.random.default_rng(11)
    ratios = []
    for _ in range(300):
        rows = draws.integers(0, 40, size=(1, 40), dtype=np.uint32)[0]
        ratios.append(np.exp((nll_a[rows] - nll_b[rows]).sum() / n_tokens[rows].sum()))
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(ratios, [0.025, 0.975])))
