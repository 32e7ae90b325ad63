"""FLOPs (paper App. A.3) and communication (App. A.4): by hand, against Table 3, and as counted."""

import pytest

from smalltalk import flops
from smalltalk.config import PRESETS, ModelConfig
from smalltalk.model import counted_flops

# A config small enough to count by hand: V=10, H=4, D_ff=16, L=2.
HAND = ModelConfig(vocab_size=10, seq_len=8, n_layer=2, n_head=2, n_embd=4)


def test_forward_flops_by_hand():
    B, S = 3, 4
    assert flops.embedding_flops(B, S, 4) == 3 * 4 * 4 == 48
    assert flops.attention_flops(B, S, 4) == 8 * 3 * 4 * 16 + 4 * 3 * 16 * 4 == 2304
    assert flops.ffn_flops(B, S, 4, 16) == 4 * 3 * 4 * 4 * 16 == 3072
    assert flops.output_flops(B, S, 4, 10) == 2 * 3 * 4 * 4 * 10 + 3 * 3 * 4 * 10 == 1320
    assert flops.forward_flops(HAND, B, S) == 48 + 2 * (2304 + 3072) + 1320 == 12120
    assert flops.train_step_flops(HAND, B, S) == 3 * 12120
    assert flops.training_flops(HAND, steps=5, batch=B, seq_len=S) == 5 * 3 * 12120  # Eq. 10


def test_inference_flops_is_one_forward_per_sequence():
    # Eq. 11 at S = 4 for one sequence: 16 + 2 * (8*4*16 + 4*16*4 + 4*4*4*16) + 2*4*4*10 + 3*4*10
    assert flops.inference_flops(HAND, 4) == 16 + 2 * (512 + 256 + 1024) + 320 + 120 == 4040
    assert flops.inference_flops(HAND, 4, n_sequences=3) == flops.forward_flops(HAND, 3, 4)


def test_mixture_equations_by_hand():
    E, steps, batch, S, M = 2, 5, 3, 4, 2
    per_prefix = flops.inference_flops(HAND, M)  # one router on one M-token prefix
    assert per_prefix == 8 + 2 * (8 * 2 * 16 + 4 * 4 * 4 + 4 * 2 * 4 * 16) + 160 + 60 == 1892
    assert flops.router_training_flops(HAND, E, steps, batch, S) == 2 * 5 * 3 * 12120  # Eq. 13
    assert flops.em_scoring_flops(HAND, E, steps, batch, M) == E * (steps * batch * E) * 1892
    assert flops.expert_training_flops(HAND, E, steps, batch, S) == 2 * 5 * 3 * 12120  # Eq. 15
    assert flops.segmentation_scoring_flops(HAND, E, 7, 11, M) == E * (7 * 11 * E) * 1892
    assert flops.routers_training_overhead(HAND, E, steps, batch, 7, 11, S, M) == (
        2 * 5 * 3 * 12120 + E * (steps * batch * E) * 1892 + E * (7 * 11 * E) * 1892
    )
    assert flops.routing_inference_flops(HAND, E, M) == 2 * 1892


# ---- Table 3 --------------------------------------------------------------------------------

# Every cost printed in Table 3: training in 1e19 FLOPs (dense; mixture = same + routers) and
# inference per 1024-token sequence in 1e12 FLOPs (one model; + routing).
PRINTED = {
    ("335M", 4): (31.02, 0.22, 0.79, 0.01),
    ("335M", 8): (62.03, 0.75, 0.79, 0.02),
    ("335M", 16): (124.06, 2.71, 0.79, 0.04),
    ("335M", 32): (248.12, 10.28, 0.79, 0.08),
    ("1.3B", 4): (221.33, 0.36, 2.81, 0.01),
    ("1.3B", 16): (885.32, 4.87, 2.81, 0.04),
    ("1.3B", 32): (1770.65, 18.94, 2.81, 0.08),
}
COLUMNS = ("dense_training", "routers_training", "inference", "routing_inference")
# Eq. 10 gives 885.3267 for the 1T-token 1.3B dense run (1024k steps x 1024 sequences, Table 2),
# which rounds to 885.33; the paper prints 885.32, which is 4 x 221.33, its 266B-token cost rounded
# first. The 32-expert row (1770.653 -> 1770.65) is consistent with exact Eq. 10, so we keep Eq. 10
# and allow this one entry a unit in the last place.
LAST_DIGIT_OFF_IN_PAPER = {(("1.3B", 16), "dense_training")}


def table3() -> dict:
    return {(r["model"], r["experts"]): r for r in flops.paper_table3()}


@pytest.mark.parametrize(
    ("run", "column", "printed"),
    [
        (run, column, value)
        for run, values in PRINTED.items()
        for column, value in zip(COLUMNS, values, strict=True)
    ],
)
def test_table3_entry(run, column, printed):
    computed = table3()[run][column]
    if (run, column) in LAST_DIGIT_OFF_IN_PAPER:
        assert abs(computed - printed) < 0.01
    else:
        assert round(computed, 2) == printed


def test_table3_mixtures_train_as_much_as_their_dense_baseline():
    for row in flops.paper_table3():  # §3.1: same tokens, hence same expert FLOPs
        assert row["experts_training"] == row["dense_training"]


# Training overheads as printed: 100 * routers / dense, unrounded.
PRINTED_TRAINING_PCT = {
    ("335M", 4): 0.07,
    ("335M", 8): 1.20,
    ("335M", 16): 2.19,
    ("335M", 32): 4.14,
    ("1.3B", 4): 0.16,
    ("1.3B", 16): 0.55,
    ("1.3B", 32): 1.07,
}
# Where the paper slipped: 0.07% for 0.71% (0.2206 / 31.02); 2.19% where 2.708 / 124.06 is 2.18%.
OURS_WHERE_PAPER_SLIPPED = {("335M", 4): 0.71, ("335M", 16): 2.18}
# Inference overheads as printed: the ratio of the two rounded costs (0.01 / 0.79 = 1.27%);
# unrounded, the 335M routing overheads are 1.31%, 2.62%, 5.23% and 10.46%.
PRINTED_INFERENCE_PCT = {
    ("335M", 4): 1.27,
    ("335M", 8): 2.53,
    ("335M", 16): 5.06,
    ("335M", 32): 10.13,
    ("1.3B", 4): 0.36,
    ("1.3B", 16): 1.42,
    ("1.3B", 32): 2.85,
}


@pytest.mark.parametrize("run", sorted(PRINTED))
def test_table3_overheads(run):
    row = table3()[run]
    expected = OURS_WHERE_PAPER_SLIPPED.get(run, PRINTED_TRAINING_PCT[run])
    assert round(row["training_overhead_pct"], 2) == expected
    rounded_ratio = 100 * round(row["routing_inference"], 2) / round(row["inference"], 2)
    assert round(rounded_ratio, 2) == PRINTED_INFERENCE_PCT[run]


def test_format_paper_table3():
    text = flops.format_paper_table3()
    assert "31.02 + 0.22" in text and "0.79 + 0.01" in text
    assert "1770.65 + 18.94" in text and "2.81 + 0.08" in text
    assert len(text.splitlines()) == 2 + len(PRINTED)


# ---- communication, App. A.4 ----------------------------------------------------------------


def test_communication_numbers_of_appendix_a4():
    T = 45_000_000  # tokens per router between exchanges
    assert flops.router_communication_rounds(128_000, 32, 1024, T) == 94  # "N_comm ≈ 94"
    assert flops.router_bytes_per_exchange(T, 32, 1024) == 5.625e6  # "5.625MB"
    assert flops.score_exchange_bytes(1_000_000, n_routers=1) == 2_000_000  # §2.2 "2MB per 1M"
    # Eq. 17: (2^31 - 1) / (2 · 128 · E) ≈ 2^23 / E. The paper writes "≤ 2^18 for all E"; it is
    # ≥ 2^18 (2^21 steps at E = 4), i.e. one 2 GB message lasts an expert's whole 256k steps.
    for E in (4, 8, 16, 32):
        steps = flops.expert_steps_between_comms(2**31 - 1, 128, E)
        assert steps == pytest.approx(2**23 / E, rel=1e-6) and steps >= 2**18 - 1
    assert flops.data_parallel_bytes_per_step(1_300_000_000) == 10.4e9  # "10.4GB"


# ---- analytic against counted ---------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_counted_flops_equal_the_matmul_terms(training):
    config = PRESETS["tiny"]
    counted = counted_flops(config, batch=2, seq_len=64, training=training)
    assert counted == (3 if training else 1) * flops.matmul_flops(config, 2, 64)


@pytest.mark.parametrize(
    ("name", "tolerance"),
    # App. A.3.1 also counts the embedding lookup (B·S·H) and softmax (3·B·S·V), which PyTorch's
    # counter does not: 1.6% of the tiny model, 0.7% of the 4.4M router, 0.01% of the 335M expert.
    [("tiny", 0.02), ("router-4.4m", 0.01), ("expert-335m", 0.001)],
)
def test_analytic_flops_agree_with_counted(name, tolerance):
    config = PRESETS[name]
    seq_len = config.seq_len
    analytic = flops.forward_flops(config, 1, seq_len)
    counted = counted_flops(config, batch=1, seq_len=seq_len)
    assert 0 < analytic - counted < tolerance * counted
