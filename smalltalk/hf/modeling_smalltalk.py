"""A SmallTalk LM for transformers: `smalltalk.model.LM`, block for block, as a PreTrainedModel.

A pre-norm, decoder-only Transformer (paper §3.1, App. A.1): RMSNorm with a learned gain,
causal self-attention through `F.scaled_dot_product_attention` with rotary positions (each pair
(x[i], x[i + hs/2]) rotated in fp32), a bias-free GELU MLP of width `ffw_expansion` x H, and
tied input/output embeddings. Parameters carry the names of smalltalk's state dict, so the
exported `model.safetensors` loads as it is, and the logits equal smalltalk's.

Written by `smalltalk export` beside an exported model; it needs torch and transformers only.
Decoding keeps transformers' cache (`past_key_values`). Rows of a batch must be of one length:
there is no padding mask, as smalltalk's model has none.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_smalltalk import SmallTalkConfig

# transformers 5 renamed the cache `cache`, in forward's arguments and in its outputs; 4 calls
# it `past_key_values`.
CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rotary_tables(
    head_dim: int, start: int, length: int, base: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles t · base^(-2i / head_dim) for start <= t < start + length."""
    exponents = -torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    inv_freq = base**exponents  # (hs/2,)
    positions = torch.arange(start, start + length, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + hs/2]) of x (B, nh, T, hs) by its position's angle."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, nh, T, hs)
    return rotated.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: SmallTalkConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None, past: int = 0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        mask, causal = None, True
        if cache is not None:
            k, v = cache.update(k, v, self.layer)  # (B, nh, past + T, hs)
            if past:  # query t (position past + t) sees keys 0..past + t: a shifted triangle
                causal = False
                if T > 1:
                    mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: SmallTalkConfig):
        super().__init__()
        width = config.ffw_expansion * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, width, bias=False)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(width, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: SmallTalkConfig, layer: int):
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.attn = CausalSelfAttention(config, layer)
        self.norm_2 = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, past: int = 0):
        x = x + self.attn(self.norm_1(x), cos, sin, cache, past)
        return x + self.mlp(self.norm_2(x))


class SmallTalkPreTrainedModel(PreTrainedModel):
    config_class = SmallTalkConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        """smalltalk's initialisation: N(0, 0.02), output projections at 0.02 / sqrt(2 L)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        if isinstance(module, (CausalSelfAttention, MLP)):
            std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.c_proj.weight, mean=0.0, std=std)


class SmallTalkForCausalLM(SmallTalkPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "wte.weight"}

    def __init__(self, config: SmallTalkConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.norm_f = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()  # ties lm_head to wte

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, past_key_values=None, use_cache=None, **kwargs
    ):
        """The tokens the cache has not read yet (all of them without a cache), for `generate`."""
        cache = cache if cache is not None else past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        return {"input_ids": input_ids[:, past:], "cache": cache, "use_cache": use_cache}

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        past_key_values=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Next-token logits at every position of input_ids (B, T), continuing the positions
        the cache holds (`cache`, or `past_key_values` as transformers 4 names it); with labels
        (B, T), the mean cross-entropy of predicting each label from the positions before it
        (-100: ignored), as transformers' causal LMs do."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("SmallTalk models take no padding: rows must be of one length")
        past_key_values = cache if cache is not None else past_key_values
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        B, T = input_ids.size()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if self.config.seq_len < past + T:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds seq_len={self.config.seq_len}"
                + (f" ({past} cached)" if past else "")
            )
        head_dim = self.config.n_embd // self.config.n_head
        cos, sin = rotary_tables(head_dim, past, T, self.config.rope_base, input_ids.device)
        x = self.drop(self.wte(input_ids))  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin, past_key_values, past)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: past_key_values})
