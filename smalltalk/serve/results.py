"""What serving answers: a text's routing, its score, a prompt's continuation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Routing:
    """Where a text goes: its expert and every router's mean NLL of its prefix (Eq. 9)."""

    expert: int
    router_nll: tuple[float, ...]
    """One value per router asked, nats per predicted token; NaN for a text with no token to
    score."""
    prefix_tokens: int
    """Tokens the routers read: min(M, the text's length), EOS included for a one-token text."""
    routers: tuple[int, ...]
    """The experts whose routers gave `router_nll`, in its order: all E, or the experts kept."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Score:
    """A text's negative log-likelihood under its routed expert (or top-k mixture), Eq. 1."""

    nll: float
    """Summed over the predicted tokens, in nats."""
    tokens: int
    """Predicted tokens: all but the first, which has no context."""
    routing: Routing
    experts: tuple[int, ...]
    """The experts that scored it: the routed one, or the top k mixed."""

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll / self.tokens)) if self.tokens else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity": self.perplexity}


@dataclass(frozen=True)
class Generation:
    """A prompt's continuation: its text, its tokens and who wrote it."""

    text: str
    tokens: tuple[int, ...]
    routing: Routing
    experts: tuple[int, ...]
    stopped: str
    """Why decoding ended: "length" (max_new_tokens), "eos" or "stop" (a stop string)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
