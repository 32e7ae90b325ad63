"""The one language model of SmallTalk: routers, experts and the dense baseline at different sizes.

A pre-norm, decoder-only Transformer with rotary positions (paper §3.1, App. A.1): RMSNorm, causal
self-attention through `F.scaled_dot_product_attention`, a GELU MLP with FFW expansion 4, tied
input/output embeddings and GPT-2's scaled residual initialisation. Read top to bottom: norm, rotary
helpers, the KV cache for decoding, attention, MLP, block, the chunked loss, `LM`, then its FLOP
count. The paper's sizes (Table 1) are `config.PRESETS`.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from smalltalk.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain and no bias (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


# ---- rotary position embedding (RoPE, Su et al. 2024; paper App. A.1) -------------------------


def rotary_tables(head_dim: int, seq_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles t · base^(-2i / head_dim) for t < seq_len, i < head_dim / 2."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + hs/2]) of x (B, nh, T, hs) by its position's angle, in fp32;
    the result in `dtype` (default: x's, bf16 under autocast).

    The dot product of a rotated query at position m and a rotated key at position n then depends on
    m - n only, which is what makes the encoding relative.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, nh, T, hs)
    return rotated.to(dtype or x.dtype)


# ---- the KV cache (incremental decoding) ----------------------------------------------------


class KVCache:
    """Keys and values of the positions an LM has already read, per block.

    `LM.forward(idx, cache=cache)` reads idx as positions `cache.length`, `cache.length + 1`, ...
    (rotary angles offset by the cache), attends to every cached position and appends its own keys
    and values, so decoding one more token costs one position's forward instead of the whole
    prefix's. Buffers take the keys' dtype and device on first use (bf16 under CUDA autocast) and
    hold at most `config.seq_len` positions, the longest context the rotary tables cover.
    """

    def __init__(self, config: ModelConfig):
        self.seq_len = config.seq_len
        self.length = 0  # positions cached: the position of the next token read
        self.keys: list[torch.Tensor | None] = [None] * config.n_layer  # (B, nh, S, hs) each
        self.values: list[torch.Tensor | None] = [None] * config.n_layer

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) of block `layer`'s new positions; return the keys and values of
        every position so far, (B, nh, length + T, hs) each. `LM.forward` advances `length`."""
        if self.keys[layer] is None:
            B, nh, _, hs = k.shape
            self.keys[layer] = k.new_empty(B, nh, self.seq_len, hs)
            self.values[layer] = v.new_empty(B, nh, self.seq_len, hs)
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


# ---- the Transformer block ------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.fp32 = False  # attention in fp32 under bf16 autocast; see LM.use_fp32_attention

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, n_embd
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dtype = torch.float32 if self.fp32 else v.dtype  # v: bf16 under autocast
        q, k, v = apply_rotary(q, cos, sin, dtype), apply_rotary(k, cos, sin, dtype), v.to(dtype)
        mask, causal = None, True
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs): cached positions first
            if past:  # query t (position past + t) sees keys 0..past + t: a shifted triangle
                causal = False
                if T > 1:
                    mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        dropout = self.dropout if self.training else 0.0
        # Autocast would cast fp32 q, k, v back to bf16 for this op; c_proj casts y to bf16.
        with torch.autocast(x.device.type, enabled=False) if self.fp32 else nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.d_ff, bias=False)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(config.d_ff, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> ..


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), cos, sin, cache, layer)
        return x + self.mlp(self.norm_2(x))


# ---- the loss --------------------------------------------------------------------------------


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits `hidden @ weight.T` against `targets` (-1: ignored), and its
    gradient, `rows` positions at a time: the (N, V) logits are never held whole.

    The forward pass computes the gradient as well, chunk by chunk, while a chunk's logits are still
    in the cache: softmax minus one-hot, one (rows, V) block made in fp32 and cast once to `dtype`
    for both gradient matmuls. The backward pass only scales the two gradients by the incoming
    one. Matmuls run in `dtype` (bf16 under autocast), the softmax and the gradients' sums in
    fp32, as autocast would.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows: int, dtype: torch.dtype):
        # hidden (N, C) and weight (V, C) fp32, targets (N,); each position weighs 1 / (valid ones)
        valid = targets != -1
        scale = (valid / valid.sum()).unsqueeze(1)  # (N, 1)
        targets = targets.clamp_min(0).unsqueeze(1)  # (N, 1): ignored rows weigh 0
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        target_logprob = torch.empty_like(scale)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.size(0), rows):
                chunk = slice(start, start + rows)
                h = hidden[chunk]
                logprobs = torch.log_softmax((h.to(dtype) @ w.T).float(), dim=-1)  # (rows, V)
                target_logprob[chunk] = logprobs.gather(1, targets[chunk])
                # d loss / d logits = (softmax - one-hot) * scale; the scale is applied to the
                # (rows, C) sides of the matmuls, not to the (rows, V) block
                grad = (
                    logprobs.exp_()
                    .scatter_add_(1, targets[chunk], torch.full_like(target_logprob[chunk], -1.0))
                    .to(dtype)
                )
                grad_hidden[chunk] = (grad @ w).float() * scale[chunk]
                grad_weight += (grad.T @ (h * scale[chunk]).to(dtype)).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return -(target_logprob * scale).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


# ---- the language model ---------------------------------------------------------------------


class LM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Tied input/output embeddings: the paper's 4.4M router only counts 4.4M parameters if its
        # 32000 x 96 table is stored once (untied it would be 7.5M), see PRESETS below. The
        # state dict names it twice; safetensors' save_model/load_model store it once.
        self.lm_head.weight = self.wte.weight
        self.loss_rows: int | None = None  # see use_chunked_loss
        # Rotary tables are derived, not learned: kept out of the state dict (persistent=False).
        cos, sin = rotary_tables(config.head_dim, config.seq_len, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (S, hs/2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (S, hs/2)

        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two residual branches, so the output projections
        # start at std 0.02 / sqrt(2 L) to keep the residual stream's variance from growing with L.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters stored (the tied embedding once), without the token embedding if asked."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if exclude_embeddings else n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for the next token at every position of idx (B, T), and, given targets (B, T),
        the mean cross-entropy over positions whose target is not -1 (Eq. 1 divided by its count).
        With targets the logits come detached, gradients flowing through the loss only, or, once
        `use_chunked_loss` is set (training on the CPU), not at all: None.

        With a `cache`, idx continues the positions it holds: only the new tokens are computed,
        attending to the cached ones, and their keys and values are added to it (decoding).
        """
        B, T = idx.size()
        start = 0 if cache is None else cache.length
        if self.config.seq_len < start + T:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds seq_len={self.config.seq_len}"
                + (f" ({start} cached)" if start else "")
            )
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, hs/2)
        x = self.drop(self.wte(idx))  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer)  # (B, T, C)
        if cache is not None:
            cache.length += T
        x = self.norm_f(x)
        if targets is not None and self.loss_rows:
            dtype = (
                torch.get_autocast_dtype(x.device.type)
                if torch.is_autocast_enabled(x.device.type)
                else torch.float32
            )
            loss = ChunkedLinearCrossEntropy.apply(
                x.reshape(B * T, -1).float(),
                self.lm_head.weight,
                targets.reshape(B * T),
                self.loss_rows,
                dtype,
            )
            return None, loss
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.view(B * T, -1).float(), targets.reshape(B * T), ignore_index=-1
        )  # (B*T, V) against (B*T,), in fp32 even under bf16 autocast
        # Logits that required grad would make a compiled backward take a zero (B, T, V) gradient
        # for them, filled and read every step: 4 % of a `demo-expert` step on the CPU.
        return logits.detach(), loss

    def use_chunked_loss(self, rows: int | None) -> None:
        """Compute the training loss and its gradient `rows` positions at a time
        (`ChunkedLinearCrossEntropy`); forward then returns no logits with targets. None: the
        whole (B, T, V) logits and `F.cross_entropy`."""
        self.loss_rows = rows

    def use_fp32_attention(self, enabled: bool) -> None:
        """Compute attention (rotary, scores, softmax, weighted values) in fp32 even under bf16
        autocast. Same function, other rounding: `runtime.fp32_attention` says where it pays."""
        for block in self.blocks:
            block.attn.fp32 = enabled

    def configure_optimizer(
        self,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        device_type: str,
    ) -> torch.optim.AdamW:
        """AdamW (§3.1: β = (0.9, 0.99), decay 0.1) decaying matrices and embeddings only: norm
        gains (1-D) are not decayed, as in nanoGPT. The fused kernel, one pass over every tensor,
        is used on CUDA and on the CPU (where it has one since PyTorch 2.4)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cuda", "cpu"))


def counted_flops(config: ModelConfig, batch: int, seq_len: int, training: bool = False) -> int:
    """FLOPs of one forward (and, if `training`, backward) pass of `LM(config)` as counted by
    `FlopCounterMode`, on the meta device: no memory, no arithmetic, any size.

    The meta device also makes scaled_dot_product_attention fall back to explicit matmuls, which
    the counter sees; the fused CPU kernel would be missed. The counter counts matmuls only (2 per
    multiply-add), so it equals `flops.matmul_flops`, times 3 with the backward pass.
    """
    with torch.device("meta"):
        model = LM(config)
        idx = torch.zeros(batch, seq_len, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx if training else None)
        if training:
            loss.backward()
    return counter.get_total_flops()
