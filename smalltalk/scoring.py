"""Per-sequence negative log-likelihoods: the routers' scores and the evaluation's numbers.

One function serves both. A router scores a sequence by the NLL of its first M tokens (Eq. 9, the
expectation step of §2.2 and routing at inference, Eq. 8); evaluation scores the tokens after the
routing prefix, or the whole sequence (Eq. 1).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from smalltalk.model import LM

PREFIX_BATCH = 256  # prefixes per forward pass in `prefix_nll` (they are short)


def predicted_positions(length: int, start: int = 0, end: int | None = None) -> range:
    """Indices j of the tokens whose NLL `sequence_nll` sums for sequences of `length` tokens.

    Token j is predicted from tokens 0..j-1, so token 0, having no context, is never scored:
    the range is [max(start, 1), end), with end = length when None.
    """
    end = length if end is None else end
    if not 0 <= start < end <= length:
        raise ValueError(f"need 0 <= start < end <= length, got {start=}, {end=}, {length=}")
    if end < 2:
        raise ValueError(f"end={end} leaves no token with a context to predict it from")
    return range(max(start, 1), end)


def inference_autocast(device: torch.device):
    """bf16 autocast on CUDA, float32 elsewhere: how every scoring pass runs its model."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def sequence_nll(
    model: LM,
    tokens: torch.Tensor,
    start: int = 0,
    end: int | None = None,
    batch_size: int = 32,
    reduction: Literal["sum", "mean"] = "sum",
) -> torch.Tensor:
    """Negative log-likelihood (nats) of each row of tokens (N, L), over the tokens at indices
    j in [max(start, 1), end) (0-based; `end` defaults to L), each predicted from tokens 0..j-1:

        nll[n] = -sum_j log p(tokens[n, j] | tokens[n, :j])     ("sum"; "mean" divides by the count)

    - routing with a prefix of M tokens: start=0, end=M, i.e. Eq. 9's sum over s = 1..M-1 of
      log p(x_{s+1} | x_{1:s}) in the paper's 1-based notation: M - 1 predictions;
    - evaluation after the routing prefix: start=M; of the whole sequence: start=0 (L - 1 tokens).

    Only tokens[:, :end - 1] go through the model, so a router reads M - 1 tokens, and end - 1 must
    not exceed the model's seq_len. Every row predicts the same tokens, so their count is
    `len(predicted_positions(L, start, end))`. Rows are scored `batch_size` at a time, with bf16
    autocast on CUDA and in float32 elsewhere; the log-softmax is always taken in float32. The
    result is a float32 tensor (N,) on the CPU, in the order of the rows.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (N, L), got shape {tuple(tokens.shape)}")
    positions = predicted_positions(tokens.size(1), start, end)
    first, end = positions.start, positions.stop
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = []
    try:
        for i in range(0, tokens.size(0), batch_size):
            batch = tokens[i : i + batch_size, :end].to(device, torch.long, non_blocking=True)
            with inference_autocast(device):
                logits, _ = model(batch[:, :-1])  # (b, end-1, V): logits[:, t] predicts token t+1
            logits = logits[:, first - 1 :].float()  # (b, end-first, V): tokens first..end-1
            targets = batch[:, first:]  # (b, end-first)
            nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # same shape
            scores.append(nll.sum(dim=1))  # (b,), left on the device: no sync inside the loop
    finally:
        model.train(was_training)
    if not scores:
        return torch.zeros(0)
    total = torch.cat(scores).cpu()  # (N,); the one device-to-host copy
    return total / len(positions) if reduction == "mean" else total


def prefix_nll(model: LM, tokens: np.ndarray, prefix_len: int) -> np.ndarray:
    """Mean NLL per predicted token of each row's first M tokens (Eq. 9): (n,) float32."""
    if len(tokens) == 0:
        return np.empty(0, dtype=np.float32)
    prefix = torch.from_numpy(tokens[:, :prefix_len].astype(np.int64))
    nll = sequence_nll(model, prefix, end=prefix_len, batch_size=PREFIX_BATCH, reduction="mean")
    return nll.numpy()


@torch.inference_mode()
def token_logprobs(model: LM, tokens: np.ndarray, batch_size: int) -> torch.Tensor:
    """log p(x_j | x_0..x_{j-1}) for j = 1..L-1 of each row of tokens (n, L): (n, L-1) float32,
    left on the model's device. Same numbers as `scoring.sequence_nll` sums (batches of
    `batch_size`, bf16 autocast on CUDA only, log-softmax in float32)."""
    device = next(model.parameters()).device
    n, length = tokens.shape
    logprobs = torch.empty((n, length - 1), dtype=torch.float32, device=device)
    for i in range(0, n, batch_size):
        batch = torch.from_numpy(tokens[i : i + batch_size].astype(np.int64))
        batch = batch.to(device, non_blocking=True)  # (b, L)
        with inference_autocast(device):
            logits, _ = model(batch[:, :-1])  # (b, L-1, V): logits[:, t] predicts token t+1
        nll = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")
        logprobs[i : i + len(batch)] = -nll  # (b, L-1)
    return logprobs


def ensemble_log_weights(router_nll: np.ndarray, topk: int, temperature: float) -> np.ndarray:
    """log w_e of the top-k ensemble for router NLLs (..., E): float64, -inf outside the top k.

    As in c-BTM (Gururangan et al. 2023), only the k experts whose routers fit the prefix best
    (lowest mean NLL; ties to the lower index) are mixed, with w = softmax(-router_nll /
    temperature) over them. With temperature 1 / (M̂ - 1) this is the router posterior of Eq. 5
    (uniform prior) restricted to the top k; temperature -> 0 gives argmin routing (Eq. 4).
    """
    order = np.argsort(router_nll, axis=-1, kind="stable")[..., :topk]  # (..., k)
    logits = np.take_along_axis(router_nll, order, axis=-1).astype(np.float64) / -temperature
    top = logits.max(axis=-1, keepdims=True)
    log_norm = top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    log_weights = np.full(router_nll.shape, -np.inf)
    np.put_along_axis(log_weights, order, logits - log_norm, axis=-1)
    return log_weights
