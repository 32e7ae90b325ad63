"""The configuration of a SmallTalk LM (an expert or the dense baseline) for transformers.

Written by `smalltalk export` beside an exported model; it needs transformers only. The fields
are `smalltalk.config.ModelConfig`'s, by the same names, and transformers' usual names read them
too (`hidden_size` is `n_embd`, ...).
"""

from transformers import PretrainedConfig


class SmallTalkConfig(PretrainedConfig):
    model_type = "smalltalk"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "seq_len",
    }

    def __init__(
        self,
        vocab_size: int = 32000,
        seq_len: int = 1024,
        n_layer: int = 12,
        n_head: int = 12,
        n_embd: int = 768,
        ffw_expansion: int = 4,
        dropout: float = 0.0,
        rope_base: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size  # V
        self.seq_len = seq_len  # S: the longest context
        self.n_layer = n_layer  # L: Transformer blocks
        self.n_head = n_head  # A: attention heads
        self.n_embd = n_embd  # H: hidden size
        self.ffw_expansion = ffw_expansion  # D_ff / H
        self.dropout = dropout
        self.rope_base = rope_base  # base of the rotary frequencies
        self.rms_norm_eps = rms_norm_eps
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
