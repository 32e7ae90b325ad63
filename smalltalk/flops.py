"""FLOPs and communication of SmallTalk LM, one pure function per equation of the paper's App. A.

Symbols follow App. A.2: L layers, H hidden size, D_ff feed-forward width, V vocabulary, S sequence
length (M for a routing prefix), B batch size, E experts (= routers). Every count is an exact Python
int, so totals at the paper's scale (1e21 FLOPs) carry no rounding. `paper_table3()` recomputes the
paper's Table 3 from its Tables 1 and 2; `model.counted_flops()` measures a model with PyTorch's
counter.
"""

from __future__ import annotations

import math

from smalltalk.config import PRESETS, ModelConfig

# ---- one Transformer, App. A.3.1 ------------------------------------------------------------


def embedding_flops(batch: int, seq_len: int, hidden: int) -> int:
    """FLOPs_emb = B·S·H (App. A.3.1): a lookup really, counted 'for completeness'."""
    return batch * seq_len * hidden


def attention_flops(batch: int, seq_len: int, hidden: int) -> int:
    """FLOPs_MHA = 8·B·S·H² + 4·B·S²·H (App. A.3.1).

    q, k, v projections (6·B·S·H²) + QKᵀ and attention·V (4·B·S²·H, the full S×S square: causal
    masking saves nothing in this count) + output projection (2·B·S·H²).
    """
    return 8 * batch * seq_len * hidden**2 + 4 * batch * seq_len**2 * hidden


def ffn_flops(batch: int, seq_len: int, hidden: int, d_ff: int) -> int:
    """FLOPs_FFN = 4·B·S·H·D_ff (App. A.3.1): two matmuls H -> D_ff -> H."""
    return 4 * batch * seq_len * hidden * d_ff


def output_flops(batch: int, seq_len: int, hidden: int, vocab: int) -> int:
    """FLOPs_out = 2·B·S·H·V + 3·B·S·V (App. A.3.1): the projection to logits, then the softmax."""
    return 2 * batch * seq_len * hidden * vocab + 3 * batch * seq_len * vocab


def forward_flops(config: ModelConfig, batch: int, seq_len: int) -> int:
    """FLOPs_forward = FLOPs_emb + L·(FLOPs_MHA + FLOPs_FFN) + FLOPs_out (App. A.3.1), for a batch
    of `batch` sequences of `seq_len` tokens (S for training, the prefix M for routing)."""
    H = config.n_embd
    per_layer = attention_flops(batch, seq_len, H) + ffn_flops(batch, seq_len, H, config.d_ff)
    return (
        embedding_flops(batch, seq_len, H)
        + config.n_layer * per_layer
        + output_flops(batch, seq_len, H, config.vocab_size)
    )


def train_step_flops(config: ModelConfig, batch: int, seq_len: int) -> int:
    """FLOPs_train_step = 3 · FLOPs_forward (App. A.3.1): the backward pass costs two forwards."""
    return 3 * forward_flops(config, batch, seq_len)


def training_flops(config: ModelConfig, steps: int, batch: int, seq_len: int) -> int:
    """Total training FLOPs = 3 · N_steps · FLOPs_forward (Eq. 10)."""
    return steps * train_step_flops(config, batch, seq_len)


def inference_flops(config: ModelConfig, seq_len: int, n_sequences: int = 1) -> int:
    """Total inference FLOPs (Eq. 11): one forward pass per sequence of `seq_len` tokens.

    Eq. 11 as printed keeps a factor B in its embedding term only; the rest is per sequence, so we
    read B as 1 there and scale the whole by `n_sequences` (App. A.3.2 does the same for shading).
    """
    return forward_flops(config, n_sequences, seq_len)


# ---- the mixture, App. A.3.2 ----------------------------------------------------------------


def router_training_flops(
    router: ModelConfig, n_routers: int, router_steps: int, router_batch: int, seq_len: int
) -> int:
    """Eq. 13: E routers, each trained N_steps_router steps on batches of B_r full sequences."""
    return n_routers * training_flops(router, router_steps, router_batch, seq_len)


def em_scoring_flops(
    router: ModelConfig, n_routers: int, router_steps: int, router_batch: int, prefix_len: int
) -> int:
    """Eq. 14, 'shading data for routers': during EM every one of the E routers scores the prefix
    (M tokens) of every sequence the E routers train on, N_steps_router · B_r · E of them."""
    n_sequences = router_steps * router_batch * n_routers
    return n_routers * inference_flops(router, prefix_len, n_sequences)


def expert_training_flops(
    expert: ModelConfig, n_experts: int, expert_steps: int, expert_batch: int, seq_len: int
) -> int:
    """Eq. 15: E experts, each trained N_steps_expert steps on batches of B full sequences."""
    return n_experts * training_flops(expert, expert_steps, expert_batch, seq_len)


def segmentation_scoring_flops(
    router: ModelConfig, n_routers: int, expert_steps: int, expert_batch: int, prefix_len: int
) -> int:
    """Eq. 16, 'shading data for experts': every router scores the prefix of every sequence the
    E experts train on, N_steps_expert · B · E of them."""
    n_sequences = expert_steps * expert_batch * n_routers
    return n_routers * inference_flops(router, prefix_len, n_sequences)


def routers_training_overhead(
    router: ModelConfig,
    n_experts: int,
    router_steps: int,
    router_batch: int,
    expert_steps: int,
    expert_batch: int,
    seq_len: int,
    prefix_len: int,
) -> int:
    """What the routers add to the experts' training in Eq. 12: Eq. 13 + Eq. 14 + Eq. 16."""
    return (
        router_training_flops(router, n_experts, router_steps, router_batch, seq_len)
        + em_scoring_flops(router, n_experts, router_steps, router_batch, prefix_len)
        + segmentation_scoring_flops(router, n_experts, expert_steps, expert_batch, prefix_len)
    )


def routing_inference_flops(router: ModelConfig, n_routers: int, prefix_len: int) -> int:
    """Routing one sequence at inference: each of the E routers scores its M-token prefix (Eq. 11
    at S = M, §2.2 'Deriving a practical model'); the chosen expert's cost comes on top."""
    return n_routers * inference_flops(router, prefix_len)


# ---- communication, App. A.4 ----------------------------------------------------------------


def score_exchange_bytes(n_sequences: int, n_routers: int, bytes_per_score: int = 2) -> int:
    """Bytes of scores the routers publish for one assignment: one float16 score per sequence and
    router (§2.2: 2 MB per 1M sequences per router). The only data SmallTalk routers exchange."""
    return n_sequences * n_routers * bytes_per_score


def router_communication_rounds(
    router_steps: int, router_batch: int, seq_len: int, tokens_between_comms: int
) -> int:
    """N_comm ≤ N_steps_router · S · B_r / T (App. A.4): all-gathers during router training, one per
    T tokens a router trains on. Rounded up: 128k steps, B_r = 32, T = 45M give the paper's 94."""
    return math.ceil(router_steps * seq_len * router_batch / tokens_between_comms)


def router_bytes_per_exchange(
    tokens_between_comms: int, n_routers: int, seq_len: int, bytes_per_score: int = 2
) -> float:
    """Data per router ≈ 2 · 2 · T · E / S bytes per exchange (App. A.4): T/S sequences' float16
    scores from each of E routers, sent and received (the factor 2 of a bandwidth-optimal
    all-gather). T = 45M, E = 32, S = 1024 give the paper's 5.625 MB."""
    return 2 * bytes_per_score * tokens_between_comms * n_routers / seq_len


def expert_steps_between_comms(message_bytes: int, expert_batch: int, n_experts: int) -> float:
    """N_steps_per_comm ≈ K / (2 · B · E) (Eq. 17): expert steps one K-byte message of float16
    scores feeds, when the E experts each draw B sequences per step. (App. A.4's prose says
    K / (4 · B · E), and Eq. 17 bounds the result by 2^18 from above where it is a lower bound.)"""
    return message_bytes / (2 * expert_batch * n_experts)


def data_parallel_bytes_per_step(n_params: int, bytes_per_gradient: int = 4) -> int:
    """Data per node = 2 · W · 4 bytes per step (App. A.4): a bandwidth-optimal all-reduce of
    float32 gradients in data-parallel training, which SmallTalk avoids (10.4 GB at 1.3B)."""
    return 2 * n_params * bytes_per_gradient


# ---- the paper's Table 3, from its Tables 1 and 2 -------------------------------------------

# Table 2, (steps, batch size) per run. The 335M mixture of 32 experts and its dense baseline are
# in Table 3 but not in Table 2: we give them the 335M experts' 256k steps at batch 128 and a dense
# run with the same tokens (§3.1 'same number of total tokens'); only steps x batch enters FLOPs.
PAPER_RUNS: dict[tuple[str, int], dict[str, tuple[int, int]]] = {
    ("335M", 4): {"dense": (256_000, 512), "experts": (256_000, 128)},
    ("335M", 8): {"dense": (512_000, 512), "experts": (256_000, 128)},
    ("335M", 16): {"dense": (1_024_000, 512), "experts": (256_000, 128)},
    ("335M", 32): {"dense": (1_024_000, 1024), "experts": (256_000, 128)},  # inferred
    ("1.3B", 4): {"dense": (512_000, 512), "experts": (512_000, 128)},
    ("1.3B", 16): {"dense": (1_024_000, 1024), "experts": (512_000, 128)},
    ("1.3B", 32): {"dense": (1_024_000, 2048), "experts": (512_000, 128)},
}
PAPER_EXPERTS = {"335M": PRESETS["expert-335m"], "1.3B": PRESETS["expert-1.3b"]}  # Table 1
PAPER_ROUTER = PRESETS["router-4.4m"]  # §3.1: 4.4M routers
PAPER_ROUTER_STEPS, PAPER_ROUTER_BATCH = 128_000, 32  # Table 2, '4.4M (router)'
PAPER_SEQ_LEN, PAPER_PREFIX_LEN = 1024, 256  # S and M, §3.1


def paper_table3() -> list[dict]:
    """Table 3's cost columns: training in 1e19 FLOPs, inference per 1024-token sequence in 1e12.

    One row per (expert size, E): the dense baseline's training cost, the experts' (equal, by the
    paper's design), what the routers add (Eq. 13 + 14 + 16), the inference cost of one model and
    what routing adds, with the overheads in percent of the dense cost. Values are unrounded.
    """
    rows = []
    for (size, n_experts), run in PAPER_RUNS.items():
        expert = PAPER_EXPERTS[size]
        dense = training_flops(expert, *run["dense"], PAPER_SEQ_LEN)
        experts = expert_training_flops(expert, n_experts, *run["experts"], PAPER_SEQ_LEN)
        routers = routers_training_overhead(
            PAPER_ROUTER,
            n_experts,
            PAPER_ROUTER_STEPS,
            PAPER_ROUTER_BATCH,
            *run["experts"],
            PAPER_SEQ_LEN,
            PAPER_PREFIX_LEN,
        )
        inference = inference_flops(expert, PAPER_SEQ_LEN)
        routing = routing_inference_flops(PAPER_ROUTER, n_experts, PAPER_PREFIX_LEN)
        rows.append(
            {
                "model": size,
                "experts": n_experts,
                "dense_training": dense / 1e19,
                "experts_training": experts / 1e19,
                "routers_training": routers / 1e19,
                "training_overhead_pct": 100 * routers / dense,
                "inference": inference / 1e12,
                "routing_inference": routing / 1e12,
                "inference_overhead_pct": 100 * routing / inference,
            }
        )
    return rows


def format_paper_table3() -> str:
    """Table 3's cost columns as aligned text, in the paper's units and rounding."""
    header = (
        f"{'model':<6} {'E':>3}  {'training (1e19 FLOPs)':>24}  {'overhead':>8}"
        f"  {'inference (1e12 FLOPs)':>22}  {'overhead':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in paper_table3():
        training = f"{r['experts_training']:.2f} + {r['routers_training']:.2f}"
        inference = f"{r['inference']:.2f} + {r['routing_inference']:.2f}"
        training_pct, inference_pct = r["training_overhead_pct"], r["inference_overhead_pct"]
        lines.append(
            f"{r['model']:<6} {r['experts']:>3}  {training:>24}  {training_pct:>7.2f}%"
            f"  {inference:>22}  {inference_pct:>7.2f}%"
        )
    return "\n".join(lines)


# ---- what PyTorch counts of them (`model.counted_flops`) ------------------------------------


def matmul_flops(config: ModelConfig, batch: int, seq_len: int) -> int:
    """The matrix-multiply part of App. A.3.1's forward count: all of it but the embedding lookup
    and the softmax, i.e. what `torch.utils.flop_counter` counts for our `LM`."""
    return forward_flops(config, batch, seq_len) - (
        embedding_flops(batch, seq_len, config.n_embd)
        + 3 * batch * seq_len * config.vocab_size  # the softmax of FLOPs_out
    )
