"""Use a trained mixture: route a text by its prefix, then score or continue it with one expert.

`load(results)` reads the run's resolved config (`{results}/config.yaml`, written by the workflow)
and takes every path from it (`smalltalk.layout`, which resolves an export the same way): the
tokenizer, the final routers, the E experts and the dense baseline. As in the paper (§2.2,
"Deriving a practical model"), the routers score the first M tokens of a text and the expert
whose router gives them the lowest mean NLL answers (Eq. 4, 8; no capacity at inference). A
text shorter than M routes on the tokens it has; a single token is read after EOS, which precedes
every document in the training stream.

Routers are small and always loaded. Experts are loaded on first use into an LRU of `max_experts`
models, so a 32-expert mixture serves from the memory of a few experts; a reviewer's objection to
the paper (reloading experts costs latency) is what `benchmarks/bench_serve.py` measures.

Optionally the top k experts by router score are mixed per token, with weights softmax(-router NLL
/ `eval.temperature`) as in c-BTM (`smalltalk.scoring.ensemble_log_weights`).

`load(results, experts=[0, 2])` retires the other experts: only the kept experts' routers are
asked, a text goes to the kept expert whose router gives its prefix the lowest NLL, top-k mixes
only kept experts, and a retired expert is never loaded. Expert indices stay those of the run.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from smalltalk import checkpoint
from smalltalk.config import model_config
from smalltalk.layout import mixture_files, served_experts
from smalltalk.model import LM, KVCache
from smalltalk.routers import RoutingBatch, load_router
from smalltalk.routing import route
from smalltalk.scoring import ensemble_log_weights, inference_autocast, token_logprobs
from smalltalk.tokens import token_matrix

DEFAULT_MAX_EXPERTS = 2
MAX_NEW_TOKENS = 1 << 16  # the longest generation asked for at once, as long as the longest S
SCORE_BATCH = 16  # requests per forward pass in `Mixture.loglikelihoods`


# ---- results -------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Segment:
    """What one expert was trained on: its shard's size, source mix and most typical tokens."""

    expert: int
    sequences: int
    share: float
    """Of all train sequences."""
    sources: dict[str, float] = field(default_factory=dict)
    """Share of the segment's sequences per source label, largest first."""
    tokens: tuple[str, ...] = ()
    """Pieces with the highest TF-IDF weight of this segment against the others."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- scoring and decoding with one model -----------------------------------------------------


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


# ---- the mixture -----------------------------------------------------------------------------


class Mixture:
    """A trained SmallTalk mixture: E routers (always loaded) and E experts (loaded on demand).

    Build it with `load(results)`. `route`, `score` and `generate` take a text or a list of them
    and answer in kind; `loglikelihoods` scores continuations of contexts (lm-eval's requests).
    """

    def __init__(
        self,
        results: str | os.PathLike,
        *,
        experts: Sequence[int] | None = None,
        max_experts: int = DEFAULT_MAX_EXPERTS,
        device: str = "auto",
    ):
        import sentencepiece as spm

        if max_experts < 1:
            raise ValueError(f"max_experts must be at least 1, got {max_experts}")
        self.files = mixture_files(results)
        self.results = self.files.root
        self.config: dict[str, Any] = self.files.config
        routing = self.config["routing"]
        self.n_experts: int = self.files.n_experts  # E + k where the mixture grew
        # The experts served, ascending: all E + k, or those kept (`experts=`). The others are
        # retired: their routers are not asked and they are never loaded.
        self.experts: tuple[int, ...] = served_experts(
            experts, self.files.available_experts, self.n_experts
        )
        self.prefix_len: int = routing["prefix_len"]
        self.method: str = self.files.method
        self.temperature: float = self.config["eval"]["temperature"]
        self.max_experts = max_experts
        self.device = torch.device(checkpoint.resolve_device(device))

        tokenizer_path = self.files.tokenizer
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"{tokenizer_path}: tokenizer not found")
        try:
            self.tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{tokenizer_path}: not a SentencePiece model ({error})") from None
        self.eos_id: int = self.tokenizer.eos_id()
        vocab_size = self.tokenizer.get_piece_size()
        self.router_config = model_config(self.config, "router", vocab_size=vocab_size)
        self.expert_config = model_config(self.config, "expert", vocab_size=vocab_size)
        self.expert_paths = {e: self.files.expert(e) for e in self.experts}
        self.dense_path = self.files.dense
        self.router = load_router(
            method=self.method,
            paths=self.files.routers(self.experts),
            router_config=self.router_config,
            tokenizer_model=tokenizer_path,
            device=str(self.device),
            keep_loaded=True,
        )
        # The router LMs of the served experts give one column each; a fitted baseline gives all
        # E, of which the served experts' are kept.
        self._router_columns = (
            slice(None) if self.method == "smalltalk" else np.array(self.experts, dtype=np.int64)
        )
        self._experts: OrderedDict[int, LM] = OrderedDict()  # least recently used first
        # Threads serving one mixture share the LRU: checking for room, evicting and loading
        # happen under one lock, or two loads at once could both find room for one.
        self._lock = threading.RLock()
        self._dense: LM | None = None
        self.expert_loads: list[int] = []  # every expert read from disk, in order

    # -- text

    def encode(self, text: str) -> list[int]:
        """Token ids, as the workflow tokenized every document."""
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # -- experts: an LRU of at most max_experts

    @property
    def loaded_experts(self) -> list[int]:
        """Experts in memory, least recently used first."""
        with self._lock:
            return list(self._experts)

    def expert(self, e: int) -> LM:
        """Expert e, loaded on first use. Loading one more than `max_experts` first drops the least
        recently used, so at most `max_experts` are ever in memory at once."""
        if not 0 <= e < self.n_experts:
            raise ValueError(f"no expert {e}: this mixture has experts 0..{self.n_experts - 1}")
        if e not in self.expert_paths:
            served = ", ".join(map(str, self.experts))
            raise ValueError(f"expert {e} is not served: this mixture serves experts {served}")
        with self._lock:
            if e in self._experts:
                self._experts.move_to_end(e)
                return self._experts[e]
            while len(self._experts) >= self.max_experts:
                self._experts.popitem(last=False)
            self._experts[e] = self._load(self.expert_paths[e])
            self.expert_loads.append(e)
            return self._experts[e]

    def dense(self) -> LM:
        """The dense baseline (same architecture, all the data): loaded once, outside the LRU."""
        with self._lock:
            if self._dense is None:
                if self.files.exported and not self.dense_path.is_file():
                    raise FileNotFoundError(
                        f"{self.dense_path}: this export holds no dense baseline (export it "
                        "with --dense)"
                    )
                self._dense = self._load(self.dense_path)
            return self._dense

    def _load(self, path: Path) -> LM:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: weights not found; has the workflow trained it?")
        return checkpoint.load_model(self.expert_config, path, str(self.device))

    # -- routing

    def route(
        self, texts: str | Sequence[str], prefix_tokens: int | None = None
    ) -> Routing | list[Routing]:
        """Route each text by its first `prefix_tokens` tokens (default M, `routing.prefix_len`):
        the expert whose router gives them the lowest mean NLL (Eq. 4, 8)."""
        single = isinstance(texts, str)
        routings = self.route_ids(
            [self.encode(t) for t in ([texts] if single else texts)], prefix_tokens
        )
        return routings[0] if single else routings

    def route_ids(
        self, sequences: Sequence[Sequence[int]], prefix_tokens: int | None = None
    ) -> list[Routing]:
        """`route` for token ids. Sequences of equal prefix length are scored together."""

        limit = self.prefix_len if prefix_tokens is None else prefix_tokens
        longest = self.router_config.seq_len + 1  # a router LM reads M - 1 tokens (Eq. 9)
        if not 2 <= limit <= longest:
            raise ValueError(f"prefix_tokens must lie in [2, {longest}], got {limit}")
        # A lone token has no context within the text: EOS, which ends every document in the
        # training stream, gives it one.
        prefixes = [
            list(ids[:limit]) if len(ids) != 1 else [self.eos_id, *ids] for ids in sequences
        ]
        lengths = np.array([len(prefix) for prefix in prefixes])
        nll = np.full((len(prefixes), len(self.experts)), np.nan, dtype=np.float32)
        for length in np.unique(lengths[lengths >= 2]):
            rows = np.flatnonzero(lengths == length)
            tokens = np.array([prefixes[i] for i in rows], dtype=np.int64)  # (r, length)
            batch = RoutingBatch(
                seq_ids=np.array([_text_id(row) for row in tokens], dtype=np.int64),
                tokens=tokens,
                sources=np.full(len(rows), "unknown", dtype=object),
            )
            nll[rows] = self.router.costs(batch, [int(length)])[:, 0, self._router_columns]
        # Eq. 4 over the routers asked. An empty text gives them nothing: all tie, and ties go
        # to the lowest index.
        chosen = route(np.nan_to_num(nll, nan=0.0))  # (n,) positions in self.experts
        return [
            Routing(
                expert=self.experts[i],
                router_nll=tuple(map(float, row)),
                prefix_tokens=int(length),
                routers=self.experts,
            )
            for i, row, length in zip(chosen, nll, lengths, strict=True)
        ]

    def log_weights(self, routing: Routing, topk: int) -> np.ndarray:
        """(E,) log mixing weights: the routed expert alone, or the c-BTM top-k ensemble of the
        routers asked; -inf for every other expert (and for those not served)."""

        most = min(len(self.experts), self.max_experts)
        if not 1 <= topk <= most:
            raise ValueError(
                f"topk must lie in [1, {most}] (at most the experts served and max_experts), "
                f"got {topk}"
            )
        weights = np.full(self.n_experts, -np.inf)
        if topk == 1 or not np.isfinite(routing.router_nll).all():
            weights[routing.expert] = 0.0
        else:
            nll = np.asarray(routing.router_nll)
            weights[list(routing.routers)] = ensemble_log_weights(nll, topk, self.temperature)
        return weights

    # -- scoring

    def score(
        self,
        texts: str | Sequence[str],
        prefix_tokens: int | None = None,
        topk: int = 1,
        *,
        dense: bool = False,
    ) -> Score | list[Score]:
        """Each text's NLL (Eq. 1) under the expert its prefix routes it to, or under the top-k
        mixture log sum_e w_e p_e(x_t), or (`dense`) under the dense baseline, for comparison.
        Texts are taken expert by expert, so each expert is loaded once."""
        single = isinstance(texts, str)
        sequences = [self.encode(t) for t in ([texts] if single else texts)]
        routings = self.route_ids(sequences, prefix_tokens)
        scores: list[Score | None] = [None] * len(sequences)
        for i in sorted(range(len(sequences)), key=lambda i: routings[i].expert):
            if dense:
                logprobs, experts = sequence_logprobs(self.dense(), sequences[i]), ()
            else:
                log_weights = self.log_weights(routings[i], topk)
                logprobs = self.mixture_logprobs(sequences[i], log_weights)
                experts = tuple(int(e) for e in np.flatnonzero(np.isfinite(log_weights)))
            scores[i] = Score(
                nll=0.0 - float(logprobs.sum(dtype=torch.float64)),
                tokens=len(logprobs),
                routing=routings[i],
                experts=experts,
            )
        return scores[0] if single else scores

    def mixture_logprobs(self, ids: Sequence[int], log_weights: np.ndarray) -> torch.Tensor:
        """log sum_e w_e p_e(ids[j] | ids[:j]) for j = 1..n-1 over the experts with weight > 0."""
        rows = [
            sequence_logprobs(self.expert(int(e)), ids).double() + float(log_weights[e])
            for e in np.flatnonzero(np.isfinite(log_weights))
        ]
        return torch.logsumexp(torch.stack(rows), dim=0)  # (n-1,)

    def loglikelihoods(
        self,
        requests: Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        topk: int = 1,
        dense: bool = False,
        prefix_tokens: int | None = None,
        batch_size: int = SCORE_BATCH,
    ) -> list[tuple[float, bool]]:
        """log p(continuation | context) and whether greedy decoding would produce it, for token
        ids (context, continuation), routed by the context (by context and continuation when the
        context holds fewer than two tokens). The model reads the last seq_len tokens before each
        continuation token; a continuation must fit in seq_len. `dense` scores with the dense
        baseline instead, routing nothing (the paper's comparison at equal inference cost)."""
        seq_len = self.expert_config.seq_len
        for context, continuation in requests:
            if not context or not 1 <= len(continuation) <= seq_len:
                raise ValueError(
                    f"need a context and a continuation of 1..{seq_len} tokens, got "
                    f"{len(context)} and {len(continuation)} tokens"
                )
        if dense:
            log_weights = np.zeros((len(requests), 1))

            def model_of(_: int) -> LM:
                return self.dense()

        else:
            routings = self.route_ids(
                [list(c) if len(c) >= 2 else [*c, *x] for c, x in requests], prefix_tokens
            )
            log_weights = np.stack([self.log_weights(r, topk) for r in routings])  # (n, E)
            model_of = self.expert
        # log-probabilities of each continuation's tokens: (len(continuation), V) per request
        mixed: list[torch.Tensor | None] = [None] * len(requests)
        for e in np.flatnonzero(np.isfinite(log_weights).any(axis=0)):
            model = model_of(int(e))
            rows = np.flatnonzero(np.isfinite(log_weights[:, e]))
            for batch in np.array_split(rows, -(-len(rows) // batch_size)):
                scored = _continuation_logprobs(model, [requests[i] for i in batch])
                for i, logprobs in zip(batch, scored, strict=True):
                    weighted = logprobs + float(log_weights[i, e])
                    mixed[i] = weighted if mixed[i] is None else torch.logaddexp(mixed[i], weighted)
        results = []
        for (_, continuation), logprobs in zip(requests, mixed, strict=True):
            target = torch.tensor(continuation, dtype=torch.long)[:, None]  # (n, 1)
            total = float(logprobs.gather(1, target).sum(dtype=torch.float64))
            results.append((total, bool((logprobs.argmax(dim=1) == target[:, 0]).all())))
        return results

    # -- generation

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        *,
        topk_experts: int = 1,
        stop: Sequence[str] = (),
        stop_at_eos: bool = True,
        prefix_tokens: int | None = None,
        dense: bool = False,
        use_cache: bool = True,
    ) -> Generation:
        """Continue `prompt` with the expert its prefix routes it to (or the top-k mixture, or
        with `dense` the dense baseline).

        temperature 0 decodes greedily; otherwise tokens are sampled from the `top_k` most likely
        (all when None), reproducibly for a given `seed`. Decoding ends after `max_new_tokens`
        (1 to MAX_NEW_TOKENS), at EOS (the end of a document, when `stop_at_eos`), or at the first
        of the `stop` strings, which is cut off. `use_cache=False` recomputes every step: the same
        tokens, slower.
        """
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(
                f"max_new_tokens must lie in [1, {MAX_NEW_TOKENS}], got {max_new_tokens}"
            )
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        ids = self.encode(prompt)
        routing = self.route_ids([ids], prefix_tokens)[0]
        if dense:
            experts, models, weights = [], [self.dense()], [0.0]
        else:
            log_weights = self.log_weights(routing, topk_experts)
            experts = [int(e) for e in np.flatnonzero(np.isfinite(log_weights))]
            models = [self.expert(e) for e in experts]
            weights = [float(log_weights[e]) for e in experts]
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        tokens: list[int] = []
        stopped, text = "length", ""
        steps = decode(
            models,
            weights,
            ids or [self.eos_id],  # an empty prompt starts a document
            max_new_tokens=max_new_tokens,
            choose=lambda scores: next_token(scores, temperature, top_k, generator),
            use_cache=use_cache,
        )
        for token in steps:
            if stop_at_eos and token == self.eos_id:
                stopped = "eos"
                break
            tokens.append(token)
            if stop:
                text = self._continuation_text(ids, tokens)
                cut = min((text.find(s) for s in stop if s and s in text), default=-1)
                if cut >= 0:
                    stopped, text = "stop", text[:cut]
                    break
        if stopped != "stop":
            text = self._continuation_text(ids, tokens)
        return Generation(
            text=text,
            tokens=tuple(tokens),
            routing=routing,
            experts=tuple(experts),
            stopped=stopped,
        )

    def _continuation_text(self, prompt: list[int], new: list[int]) -> str:
        """The text `new` adds after `prompt`: decoded together, so spaces at the seam survive."""
        return self.decode(prompt + new)[len(self.decode(prompt)) :]

    # -- what the segments hold

    def segments(self, top_tokens: int = 10, sample: int = 5000) -> list[Segment]:
        """Each segment's size and source mix (over all its shards) and its most characteristic
        tokens (TF-IDF over a sample of its sequences, `segment_profiles`)."""
        if not hasattr(self, "_segments"):
            if self.files.exported:
                raise FileNotFoundError(
                    f"{self.results}: an export holds no training shards, so it cannot tell "
                    "what each segment holds; ask the results directory it was exported from"
                )
            # EM's segments only: a grown expert's segment is its whole corpus, not a shard.
            profiles = segment_profiles(
                self.files.shards,
                self.config["routing"]["n_experts"],
                self.tokenizer,
                top_tokens,
                sample,
            )
            self._segments = [segment for segment in profiles if segment.expert in self.experts]
        return self._segments

    def explain(self, text: str, prefix_tokens: int | None = None) -> dict[str, Any]:
        """The routing of `text` (every router's prefix NLL) beside what each segment holds."""
        routing = self.route_ids([self.encode(text)], prefix_tokens)[0]
        return {
            "routing": routing.as_dict(),
            "segments": [
                {
                    **segment.as_dict(),
                    "router_nll": routing.router_nll[routing.routers.index(segment.expert)],
                }
                for segment in self.segments()
            ],
        }


def load(
    results: str | os.PathLike,
    *,
    experts: Sequence[int] | None = None,
    max_experts: int = DEFAULT_MAX_EXPERTS,
    device: str = "auto",
) -> Mixture:
    """The trained mixture in `results` (the workflow's results directory, e.g. `results`, or an
    export of it), serving all its experts or only those in `experts` (the others retired)."""
    return Mixture(results, experts=experts, max_experts=max_experts, device=device)


def _text_id(tokens: np.ndarray) -> int:
    """A stable 63-bit id of a token sequence: what id-keyed routers (`random`) hash."""
    digest = hashlib.blake2b(np.ascontiguousarray(tokens, dtype=np.int64).tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


@torch.inference_mode()
def _continuation_logprobs(
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


def segment_profiles(
    shards: Path, n_experts: int, tokenizer, top_tokens: int = 10, sample: int = 5000
) -> list[Segment]:
    """`Mixture.segments` from `shards/expert={e}/*.parquet`: sizes and sources by DuckDB over
    every shard, tokens from the first `sample` sequences of each segment.

    Each sequence is a document of token counts; TF-IDF (scikit-learn's TfidfTransformer,
    sublinear tf, l2 rows) discounts the tokens every sequence has, and a segment's most
    characteristic tokens are those whose mean weight in its sequences most exceeds their mean
    weight in the other segments'.
    """
    import duckdb
    import pyarrow.parquet as pq
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfTransformer

    files = sorted(shards.glob("expert=*/*.parquet"))
    if not files:
        raise FileNotFoundError(f"{shards}: no shards; has the workflow sharded the train split?")
    con = duckdb.connect(config={"threads": 1})
    counts = con.execute(
        "SELECT expert, source, count(*) AS n FROM read_parquet(?, hive_partitioning = true) "
        "GROUP BY ALL ORDER BY expert, n DESC, source",
        [[str(f) for f in files]],
    ).fetchall()
    con.close()
    sizes = np.zeros(n_experts, dtype=np.int64)
    sources: list[dict[str, int]] = [{} for _ in range(n_experts)]
    for expert, source, n in counts:
        sizes[int(expert)] += n
        sources[int(expert)][source] = n

    parts, labels = [], []
    for e in range(n_experts):
        taken = 0
        for path in sorted(shards.glob(f"expert={e}/*.parquet")):
            if taken >= sample:
                break
            tokens = token_matrix(pq.read_table(path, columns=["tokens"]).column("tokens"))
            parts.append(tokens[: sample - taken].astype(np.int64))  # (n, S+1)
            labels.append(np.full(len(parts[-1]), e))
            taken += len(parts[-1])
    tokens, labels = np.concatenate(parts), np.concatenate(labels)
    vocab_size = tokenizer.get_piece_size()
    rows = np.repeat(np.arange(len(tokens)), tokens.shape[1])
    per_sequence = sparse.csr_matrix(
        (np.ones(tokens.size, np.float32), (rows, tokens.ravel())),
        shape=(len(tokens), vocab_size),
    )  # (n, V) token counts, duplicates summed
    weights = TfidfTransformer(sublinear_tf=True).fit_transform(per_sequence)
    means = np.stack(
        [np.asarray(weights[labels == e].mean(axis=0)).ravel() for e in range(n_experts)]
    )  # (E, V); a segment without sequences keeps zeros
    readable = np.array(
        [
            not (tokenizer.is_control(i) or tokenizer.is_unknown(i) or tokenizer.is_byte(i))
            and len(tokenizer.id_to_piece(i).strip("▁")) > 1
            for i in range(vocab_size)
        ]
    )  # single characters, bytes and specials say little
    total = max(int(sizes.sum()), 1)
    segments = []
    for e in range(n_experts):
        others = np.delete(means, e, axis=0).mean(axis=0) if n_experts > 1 else 0.0
        contrast = np.where(readable & (means[e] > 0), means[e] - others, -np.inf)
        order = np.argsort(-contrast, kind="stable")[:top_tokens]
        segments.append(
            Segment(
                expert=e,
                sequences=int(sizes[e]),
                share=float(sizes[e] / total),
                sources={s: n / max(int(sizes[e]), 1) for s, n in sources[e].items()},
                tokens=tuple(tokenizer.id_to_piece(int(i)) for i in order if contrast[i] > -np.inf),
            )
        )
    return segments
