"""sequence_nll: the routers' prefix scores and the evaluation's per-sequence NLLs."""

import pytest
import torch

from smalltalk.config import ModelConfig
from smalltalk.model import LM
from smalltalk.scoring import predicted_positions, sequence_nll


@pytest.fixture(scope="module")
def model() -> LM:
    torch.manual_seed(0)
    return LM(ModelConfig.from_preset("tiny", vocab_size=50, seq_len=32))


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 50, (7, 33))  # packed rows of S + 1 tokens


def naive_nll(model: LM, tokens: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """One forward per predicted token, from exactly its own prefix."""
    out = torch.zeros(tokens.size(0))
    with torch.no_grad():
        for n in range(tokens.size(0)):
            for j in range(max(start, 1), end):
                logits, _ = model(tokens[n : n + 1, :j])  # (1, j, V)
                out[n] -= torch.log_softmax(logits[0, -1], dim=-1)[tokens[n, j]]
    return out


@pytest.mark.parametrize(("start", "end"), [(0, 8), (0, 33), (8, 33), (5, 6), (1, 2), (31, 33)])
def test_equals_token_by_token_loop(model, tokens, start, end):
    scores = sequence_nll(model, tokens, start=start, end=end, batch_size=3)
    assert scores.shape == (7,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, naive_nll(model, tokens, start, end), atol=1e-4, rtol=1e-5)


def test_routing_prefix_is_eq_9(model, tokens):
    # Eq. 9: the M - 1 predictions of x_2..x_M from their prefixes, i.e. the training loss of the
    # prefix (mean over M - 1 tokens) times M - 1.
    M = 8
    _, loss = model(tokens[:1, : M - 1], tokens[:1, 1:M])
    torch.testing.assert_close(sequence_nll(model, tokens[:1], end=M), (M - 1) * loss[None])
    assert len(predicted_positions(33, end=M)) == M - 1


def test_mean_divides_by_the_number_of_predicted_tokens(model, tokens):
    total = sequence_nll(model, tokens, start=8)
    mean = sequence_nll(model, tokens, start=8, reduction="mean")
    assert predicted_positions(33, start=8) == range(8, 33)
    torch.testing.assert_close(mean, total / 25)


def test_batching_dtype_and_mode_do_not_matter(model, tokens):
    reference = sequence_nll(model, tokens, batch_size=len(tokens))
    torch.testing.assert_close(sequence_nll(model, tokens, batch_size=1), reference)
    torch.testing.assert_close(sequence_nll(model, tokens.to(torch.uint16)), reference)
    model.train()
    torch.testing.assert_close(sequence_nll(model, tokens), reference)
    assert model.training  # the caller's mode is restored
    model.eval()
    assert sequence_nll(model, tokens[:0]).shape == (0,)


def test_rejects_ranges_with_nothing_to_predict(model, tokens):
    for start, end in [(0, 1), (8, 8), (9, 8), (0, 34), (-1, 8)]:
        with pytest.raises(ValueError):
            sequence_nll(model, tokens, start=start, end=end)
    with pytest.raises(ValueError, match="seq_len"):
        sequence_nll(model, torch.zeros(1, 40, dtype=torch.long))  # 39 inputs > seq_len = 32
    with pytest.raises(ValueError, match="reduction"):
        sequence_nll(model, tokens, reduction="max")
