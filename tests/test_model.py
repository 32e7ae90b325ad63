"""The LM: rotary positions, causality, tied embeddings, configuration and the paper's sizes."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, load_model, save_model

from smalltalk.config import PRESETS, ModelConfig
from smalltalk.model import LM, KVCache, apply_rotary, rotary_tables


def tiny_model(seed: int = 0, **overrides) -> LM:
    torch.manual_seed(seed)
    return LM(ModelConfig.from_preset("tiny", **overrides))


# ---- rotary positions -----------------------------------------------------------------------


def test_rotary_dot_product_depends_only_on_position_difference():
    head_dim, seq_len = 16, 64
    cos, sin = rotary_tables(head_dim, seq_len, base=10000.0)
    torch.manual_seed(0)
    q = torch.randn(head_dim).expand(1, 1, seq_len, head_dim)  # (B, nh, T, hs): same q everywhere
    k = torch.randn(head_dim).expand(1, 1, seq_len, head_dim)
    q_rot, k_rot = apply_rotary(q, cos, sin)[0, 0], apply_rotary(k, cos, sin)[0, 0]  # (T, hs)
    scores = q_rot @ k_rot.T  # (T, T): scores[m, n] = <R_m q, R_n k>
    for offset in (-7, 0, 3, 20):
        diagonal = torch.diagonal(scores, offset=offset)  # all (m, n) with n - m = offset
        torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal), atol=1e-4, rtol=0)
    assert not torch.allclose(scores[0, 0], scores[0, 5])  # ...and the difference does matter


def test_rotary_preserves_norms_and_leaves_position_zero_alone():
    cos, sin = rotary_tables(8, 10, base=10000.0)
    x = torch.randn(2, 3, 10, 8)
    rotated = apply_rotary(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotated[:, :, 0], x[:, :, 0])


def test_attention_is_invariant_to_shifting_all_positions():
    # With rotary (and no absolute) positions, a layer sees only relative positions: the same
    # tokens placed at positions d..d+T-1 instead of 0..T-1 give the same output.
    model = tiny_model(seq_len=64).eval()
    x = torch.randn(2, 20, model.config.n_embd)  # (B, T, C)
    cos, sin = model.rope_cos, model.rope_sin  # (S, hs/2)
    at_zero = model.blocks[0](x, cos[:20], sin[:20])
    for d in (1, 13, 44):
        shifted = model.blocks[0](x, cos[d : d + 20], sin[d : d + 20])
        torch.testing.assert_close(shifted, at_zero, atol=1e-5, rtol=1e-4)


# ---- the forward pass -----------------------------------------------------------------------


def test_future_tokens_never_change_earlier_logits():
    model = tiny_model().eval()
    idx = torch.randint(0, 256, (3, 40))
    logits, _ = model(idx)
    for t in (1, 17, 39):
        changed = idx.clone()
        changed[:, t:] = torch.randint(0, 256, changed[:, t:].shape)
        changed_logits, _ = model(changed)
        torch.testing.assert_close(changed_logits[:, :t], logits[:, :t], atol=1e-5, rtol=1e-5)


def test_loss_is_mean_cross_entropy_ignoring_minus_one():
    model = tiny_model()
    idx = torch.randint(0, 256, (2, 12))
    targets = torch.randint(0, 256, (2, 12))
    targets[0, :5] = -1
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 12, 256)
    keep = targets != -1
    expected = -torch.log_softmax(logits[keep], dim=-1).gather(1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, expected)
    assert model(idx)[1] is None
    assert not logits.requires_grad and model(idx)[0].requires_grad  # trained through the loss


def test_rejects_sequences_longer_than_seq_len():
    model = tiny_model(seq_len=8)
    model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


# ---- KV cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[20], [1] * 20, [7, 5, 1, 1, 6], [12, 8]])
def test_cached_decoding_gives_the_full_forward_logits(chunks):
    model = tiny_model(seed=3, n_layer=2).eval()
    idx = torch.randint(0, 256, (2, sum(chunks)))
    full, _ = model(idx)  # (2, 20, V)
    cache, pieces, start = KVCache(model.config), [], 0
    for size in chunks:  # a prompt read at once, then tokens one (or a few) at a time
        logits, _ = model(idx[:, start : start + size], cache=cache)
        pieces.append(logits)
        start += size
    assert cache.length == idx.size(1)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)


def test_cache_counts_toward_seq_len():
    model = tiny_model(seq_len=8).eval()
    cache = KVCache(model.config)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"sequence of 9 tokens exceeds seq_len=8 \(8 cached\)"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_tiny_model_overfits_one_batch():
    model = tiny_model()
    optimizer = model.configure_optimizer(1e-2, 0.1, (0.9, 0.99), "cpu")
    idx = torch.randint(0, 256, (2, 17))
    _, first = model(idx[:, :-1], idx[:, 1:])
    for _ in range(20):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first.item()


# ---- parameters -----------------------------------------------------------------------------


def test_embeddings_are_tied(tmp_path):
    model = tiny_model().eval()
    assert model.lm_head.weight is model.wte.weight
    idx = torch.randint(0, 256, (1, 8))
    logits, loss = model(idx, idx)
    loss.backward()  # the one table collects gradients from both ends
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0
    save_model(model, tmp_path / "lm.safetensors")  # stores the shared table once
    assert len(load_file(tmp_path / "lm.safetensors")) == len(list(model.parameters()))
    loaded = tiny_model(seed=1)
    load_model(loaded, tmp_path / "lm.safetensors")
    assert loaded.lm_head.weight is loaded.wte.weight
    torch.testing.assert_close(loaded(idx)[0], logits)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_num_parameters_matches_closed_form(name):
    # V·H (tied embedding) + L·(12·H² + 2·H) (qkv, out, MLP at D_ff = 4H; two RMSNorm gains) + H.
    config = PRESETS[name]
    V, L, H = config.vocab_size, config.n_layer, config.n_embd
    with torch.device("meta"):  # shapes only: the 1.3B model costs no memory
        model = LM(config)
    assert model.num_parameters() == V * H + L * (12 * H * H + 2 * H) + H
    assert model.num_parameters(exclude_embeddings=True) == L * (12 * H * H + 2 * H) + H


@pytest.mark.parametrize(
    ("name", "paper_count", "significant_digits"),
    [
        ("router-4.4m", 4.4e6, 2),  # Table 1: "4.4M"
        ("router-110m", 110e6, 2),  # "110M"
        ("expert-335m", 335e6, 3),  # "335M"
        ("expert-1.3b", 1.3e9, 2),  # "1.3B"
    ],
)
def test_paper_presets_have_the_sizes_in_their_names(name, paper_count, significant_digits):
    with torch.device("meta"):
        count = LM(PRESETS[name]).num_parameters()
    assert float(f"{count:.{significant_digits}g}") == paper_count


def test_paper_presets_follow_table_1():
    for name in ("router-4.4m", "router-110m", "expert-335m", "expert-1.3b"):
        config = PRESETS[name]
        assert (config.vocab_size, config.seq_len, config.ffw_expansion) == (32000, 1024, 4)
    shapes = {n: (c.n_embd, c.n_layer, c.n_head) for n, c in PRESETS.items()}
    assert shapes["router-4.4m"] == (96, 12, 12)
    assert shapes["router-110m"] == (768, 12, 12)
    assert shapes["expert-335m"] == (1024, 24, 16)
    assert shapes["expert-1.3b"] == (2048, 24, 16)


def test_fp32_attention_runs_attention_in_fp32_under_bf16_autocast(monkeypatch):
    """`use_fp32_attention` changes the rounding, not the function: under bf16 autocast
    scaled_dot_product_attention receives fp32, and loss and gradients match a fp32 run's to bf16's
    rounding, as without it."""
    idx = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(1))
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        seen.append({q.dtype, k.dtype, v.dtype})
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    results = {}
    for name, autocast, fp32 in [
        ("fp32", False, False),
        ("bf16", True, False),
        ("bf16, fp32 attention", True, True),
    ]:
        model = tiny_model(n_layer=2)
        model.use_fp32_attention(fp32)
        assert all(block.attn.fp32 == fp32 for block in model.blocks)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        expected = torch.bfloat16 if autocast and not fp32 else torch.float32
        assert seen == [{expected}] * 2  # one call per block, all three inputs in one dtype
        results[name] = (loss.detach(), [p.grad for p in model.parameters()])
    reference_loss, reference_grads = results["fp32"]
    for name in ("bf16", "bf16, fp32 attention"):
        loss, grads = results[name]
        torch.testing.assert_close(loss, reference_loss, rtol=1e-2, atol=1e-2)
        for a, b in zip(grads, reference_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=5e-2, atol=2e-3)


# ---- the chunked loss -----------------------------------------------------------------------


def loss_and_grads(model: LM, idx, targets, scale: float = 1.0, bf16: bool = False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, loss = model(idx, targets)
    (loss * scale).backward()  # as train_step does with micro-batches
    return logits, loss.detach(), [p.grad for p in model.parameters()]


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq_len=st.integers(1, 24),
    rows=st.integers(1, 80),
    ignored=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**16),
)
def test_chunked_loss_equals_cross_entropy_of_the_whole_logits(batch, seq_len, rows, ignored, seed):
    """Whatever the chunk (smaller than, dividing or beyond the batch's positions) and however many
    targets are -1: the same loss and the same gradients as F.cross_entropy over all logits."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (batch, seq_len), generator=g)
    targets = torch.randint(0, 256, (batch, seq_len), generator=g)
    targets[torch.rand(batch, seq_len, generator=g) < ignored] = -1
    targets.view(-1)[0] = 7  # at least one counted position: else both are 0 / 0
    whole = tiny_model(seed=seed)
    chunked = tiny_model(seed=seed)
    chunked.use_chunked_loss(rows)
    _, loss, grads = loss_and_grads(whole, idx, targets, scale=0.5)
    logits, chunked_loss, chunked_grads = loss_and_grads(chunked, idx, targets, scale=0.5)
    assert logits is None  # never held whole
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(chunked_grads, grads, strict=True):  # fp32 sums in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_chunked_loss_under_bf16_autocast_matches_fp32_to_bf16_rounding():
    idx = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(2))
    _, reference_loss, reference_grads = loss_and_grads(tiny_model(), idx[:, :-1], idx[:, 1:])
    for rows in (None, 40):
        model = tiny_model()
        model.use_chunked_loss(rows)
        _, loss, grads = loss_and_grads(model, idx[:, :-1], idx[:, 1:], bf16=True)
        torch.testing.assert_close(loss, reference_loss, rtol=1e-2, atol=1e-2)
        for a, b in zip(grads, reference_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=5e-2, atol=2e-3)
    assert tiny_model()(idx)[0].shape == (4, 33, 256)  # without targets: logits, chunked or not


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile's imports
def test_chunked_loss_compiles_to_the_same_loss_and_gradients():
    idx = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    eager, compiled = tiny_model(), tiny_model()
    eager.use_chunked_loss(5)
    compiled.use_chunked_loss(5)
    _, loss, grads = loss_and_grads(eager, idx[:, :-1], idx[:, 1:])
    _, compiled_loss, compiled_grads = loss_and_grads(
        torch.compile(compiled), idx[:, :-1], idx[:, 1:]
    )
    torch.testing.assert_close(compiled_loss, loss)
    for a, b in zip(compiled_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_optimizer_decays_matrices_only():
    model = tiny_model()
    optimizer = model.configure_optimizer(1e-3, 0.1, (0.9, 0.99), "cpu")
    decayed, undecayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in undecayed["params"])
    grouped = decayed["params"] + undecayed["params"]
    assert len(grouped) == len(list(model.parameters()))  # each tensor once, the tied one too
    assert optimizer.defaults["betas"] == (0.9, 0.99)
    assert optimizer.defaults["fused"]  # one kernel over all tensors, on the CPU as on CUDA


def test_residual_projections_start_smaller():
    torch.manual_seed(0)
    model = LM(ModelConfig.from_preset("demo-expert"))
    expected = 0.02 / (2 * model.config.n_layer) ** 0.5
    assert model.blocks[0].attn.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)


# ---- configuration --------------------------------------------------------------------------


def test_config_errors_name_every_bad_field_at_once():
    with pytest.raises(ValueError) as error:
        ModelConfig(n_layer=0, n_head=2, n_embd=32, vocab_size=-1, dropout=1.5)
    message = str(error.value)
    for field in ("n_layer", "vocab_size", "dropout"):
        assert field in message
    with pytest.raises(ValueError, match="n_embd .* divisible by n_head"):
        ModelConfig(n_layer=1, n_head=3, n_embd=32)
    with pytest.raises(ValueError, match="even"):
        ModelConfig(n_layer=1, n_head=2, n_embd=10)
    with pytest.raises(ValueError, match="n_head"):
        ModelConfig(n_layer=1, n_head=True, n_embd=32)


def test_config_is_keyword_only_and_refuses_unknown_attributes():
    with pytest.raises(TypeError):
        ModelConfig(32000, 1024, 2, 2, 32)
    config = ModelConfig(n_layer=1, n_head=2, n_embd=32)
    with pytest.raises(AttributeError):
        config.n_embed = 64  # a typo cannot silently add a field


def test_from_preset_overrides_and_validates():
    config = ModelConfig.from_preset("router-4.4m", vocab_size=8000, seq_len=128)
    assert (config.vocab_size, config.seq_len, config.n_embd) == (8000, 128, 96)
    assert PRESETS["router-4.4m"].vocab_size == 32000  # the preset itself is untouched
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("router-4m")
    with pytest.raises(ValueError, match="n_head"):
        ModelConfig.from_preset("tiny", n_head=5)
    assert dataclasses.asdict(config)["n_layer"] == 12  # plain values, ready for a checkpoint
