"""Scoring and decoding with one model, or several weighted ones: no routing, no files."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from smalltalk.model import LM, KVCache
from smalltalk.scoring import inference_autocast, token_logprobs


@torch.inference_mode()
def sequence_logprobs(model: LM, ids: Sequence[int]) -> torch.Tensor:
    """log p(ids[j] | the tokens before it) for j = 1..n-1: (n-1,) float32 on the CPU.

    Texts longer than the context (seq_len + 1 tokens) are read in windows of seq_len + 1 tokens,
    each token scored once and each window as long as it can be (lm-eval's rolling
    log-likelihood). Within one window the numbers are `scoring.token_logprobs`'.
    """
    tokens = np.asarray(ids, dtype=np.int64)
    seq_len = model.config.seq_len
    parts, scored = [], 1  # scored: the next token to score
    while scored < len(tokens):
        end = min(len(tokens), scored + seq_len)  # this window scores tokens scored..end-1
        begin = max(0, end - seq_len - 1)  # ... reading tokens begin..end-2
        logprobs = token_logprobs(model, tokens[None, begin:end], batch_size=1)[0]  # (end-begin-1,)
        parts.append(logprobs[scored - begin - 1 :].cpu())
        scored = end
    return torch.cat(parts) if parts else torch.zeros(0)


@torch.inference_mode()
def continuation_logprobs(
    model: LM, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> list[torch.Tensor]:
    """Per request, the model's log-probabilities (len(continuation), V) at the continuation's
    positions, reading at most seq_len tokens (the context cut on the left). Requests are padded
    on the right into one batch: causal attention keeps padding out of every scored position."""
    device = next(model.parameters()).device
    seq_len = model.config.seq_len
    inputs = [(list(c) + list(x))[-(seq_len + 1) : -1] for c, x in requests]  # what is read
    width = max(len(row) for row in inputs)
    idx = torch.zeros((len(inputs), width), dtype=torch.long)
    for row, tokens in enumerate(inputs):
        idx[row, : len(tokens)] = torch.tensor(tokens)
    with inference_autocast(device):
        logits, _ = model(idx.to(device))  # (b, width, V)
    logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
    return [
        logprobs[row, len(tokens) - len(x) : len(tokens)]  # (len(x), V)
        for row, (tokens, (_, x)) in enumerate(zip(inputs, requests, strict=True))
    ]


def next_token(
    scores: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> int:
    """Greedy (temperature 0) or sampled from softmax(scores / temperature) over the top k, where
    scores are next-token log-probabilities up to a constant."""
    if temperature == 0:
        return int(scores.argmax())
    logits = scores.float().cpu() / temperature  # (V,)
    if top_k is not None and top_k < logits.numel():
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, -torch.inf)
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


@torch.inference_mode()
def decode(
    models: Sequence[LM],
    log_weights: Sequence[float],
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    choose: Callable[[torch.Tensor], int],
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` tokens continuing `prompt` (at least one token), each drawn by
    `choose` from next-token scores: log sum_e w_e p_e(x) of the weighted models, up to a constant
    (a single model's logits, which is all greedy decoding and sampling need).

    With `use_cache`, each model keeps a `KVCache` and reads only the newest token per step;
    without it, every step reads the whole window again. Both see the same window: the last
    seq_len tokens at first, and when it is full it slides to the last seq_len / 2 tokens (read
    in one pass), so the two modes give the same tokens up to float rounding.
    """
    if not prompt:
        raise ValueError("decode needs at least one prompt token")
    device = next(models[0].parameters()).device
    seq_len = min(model.config.seq_len for model in models)
    keep = max(1, seq_len // 2)
    ids = list(prompt)
    start = max(0, len(ids) - seq_len)  # ids[start:] is the window the models read
    caches = [KVCache(model.config) for model in models] if use_cache else None
    for _ in range(max_new_tokens):
        if len(ids) - start > seq_len:  # full: slide, and rebuild the caches from the window
            start = len(ids) - keep
            caches = [KVCache(model.config) for model in models] if use_cache else None
        window = ids[start:]
        scores = None  # (V,)
        for i, model in enumerate(models):
            unread = window[caches[i].length :] if caches else window
            idx = torch.tensor([unread], dtype=torch.long, device=device)  # (1, T)
            with inference_autocast(device):
                logits, _ = model(idx, cache=caches[i] if caches else None)  # (1, T, V)
            if len(models) == 1:
                scores = logits[0, -1].float()
            else:  # the mixture, one expert at a time: log sum_e w_e p_e(x)
                weighted = F.log_softmax(logits[0, -1].float(), dim=-1) + log_weights[i]
                scores = weighted if scores is None else torch.logaddexp(scores, weighted)
        token = choose(scores)
        ids.append(token)
        yield token
