"""A trained mixture, served: route a text by its prefix, then score or continue it with experts.

`load(results)` reads the run's resolved config (`{results}/config.yaml`, written by the workflow)
and takes every path from it (`smalltalk.layout`, which resolves an export the same way): the
tokenizer, the final routers, the E experts and the dense baseline. As in the paper (§2.2,
"Deriving a practical model"), the routers score the first M tokens of a text and the expert
whose router gives them the lowest mean NLL answers (Eq. 4, 8; no capacity at inference). A
text shorter than M routes on the tokens it has; a single token is read after EOS, which precedes
every document in the training stream.

Routers are small and always loaded; experts are loaded on first use into an LRU of
`max_experts` models (`smalltalk.serve.experts`).

Optionally the top k experts by router score are mixed per token, with weights softmax(-router NLL
/ `eval.temperature`) as in c-BTM (`smalltalk.scoring.ensemble_log_weights`).

`load(results, experts=[0, 2])` retires the other experts: only the kept experts' routers are
asked, a text goes to the kept expert whose router gives its prefix the lowest NLL, top-k mixes
only kept experts, and a retired expert is never loaded. Expert indices stay those of the run.

An export is checked against its manifest before anything is read from it: the files the mixture
reads must have the sha256 that export.json records, and no weights file may lie there unlisted
(`smalltalk.verify`). `verify=False` skips the hashing, for a large export already checked once.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smalltalk import checkpoint
from smalltalk.config import model_config
from smalltalk.layout import mixture_files, served_experts
from smalltalk.model import LM
from smalltalk.routers import RoutingBatch, load_router
from smalltalk.routing import route
from smalltalk.scoring import ensemble_log_weights
from smalltalk.serve.decoding import (
    continuation_logprobs,
    decode,
    next_token,
    sequence_logprobs,
)
from smalltalk.serve.experts import DEFAULT_MAX_EXPERTS, ExpertCache
from smalltalk.serve.results import Generation, Routing, Score
from smalltalk.unicode import check_texts, check_unicode
from smalltalk.verify import check_mixture, mixture_paths

MAX_NEW_TOKENS = 1 << 16  # the longest generation asked for at once, as long as the longest S
SCORE_BATCH = 16  # requests per forward pass in `Mixture.loglikelihoods`
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator takes (it wraps negative ones)


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
        verify: bool = True,
    ):

        self._experts = ExpertCache(self._load_expert, max_experts)
        self.files = mixture_files(results)
        self.results = self.files.root
        self.config: dict[str, Any] = self.files.config
        self.n_experts: int = self.files.n_experts  # E + k where the mixture grew
        # The experts served, ascending: all E + k, or those kept (`experts=`). The others are
        # retired: their routers are not asked and they are never loaded.
        self.experts: tuple[int, ...] = served_experts(
            experts, self.files.available_experts, self.n_experts
        )
        if verify:  # before any file is read: changed weights would serve without a word
            exported_dense = bool((self.files.manifest or {}).get("dense"))
            check_mixture(self.files, mixture_paths(self.files, self.experts, dense=exported_dense))
        self.prefix_len: int = self.config["routing"]["prefix_len"]
        self.method: str = self.files.method
        self.temperature: float = self.config["eval"]["temperature"]
        self.max_experts = max_experts
        self.device = torch.device(checkpoint.resolve_device(device))
        self.tokenizer = _read_tokenizer(self.files.tokenizer)
        self.eos_id: int = self.tokenizer.eos_id()
        vocab_size = self.tokenizer.get_piece_size()
        self.router_config = model_config(self.config, "router", vocab_size=vocab_size)
        self.expert_config = model_config(self.config, "expert", vocab_size=vocab_size)
        self.expert_paths = {e: self.files.expert(e) for e in self.experts}
        self.dense_path = self.files.dense
        # Experts load on first use, but each file's header is checked against the config now
        # (the routers' are, as they load): a config that is not that of the weights is refused
        # at `load`, naming the file, not halfway through serving.
        for path in [*self.expert_paths.values(), self.dense_path]:
            if path.is_file():
                checkpoint.check_architecture(self.expert_config, path)
        self.router = load_router(
            method=self.method,
            paths=self.files.routers(self.experts),
            router_config=self.router_config,
            tokenizer_model=self.files.tokenizer,
            device=str(self.device),
            keep_loaded=True,
        )
        # The router LMs of the served experts give one column each; a fitted baseline gives all
        # E, of which the served experts' are kept.
        self._router_columns = (
            slice(None) if self.method == "smalltalk" else np.array(self.experts, dtype=np.int64)
        )
        self._dense: LM | None = None
        self._dense_lock = threading.Lock()

    # -- text

    def encode(self, text: str) -> list[int]:
        """Token ids, as the workflow tokenized every document. A text that is not valid Unicode
        (a lone surrogate) is a ValueError, as it was a bad record in the corpus."""
        check_unicode(text)
        return self.tokenizer.encode(text)

    def _encode_all(self, texts: str | Sequence[str]) -> list[list[int]]:
        """`encode` for a text or a list of them; a bad one is named by its place in the list."""
        if isinstance(texts, str):
            return [self.encode(texts)]
        check_texts(texts)
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # -- models: experts in an LRU of at most max_experts, the dense baseline once

    @property
    def loaded_experts(self) -> list[int]:
        """Experts in memory, least recently used first."""
        return self._experts.loaded

    @property
    def expert_loads(self) -> list[int]:
        """Every expert read from disk, in order."""
        return self._experts.loads

    def expert(self, e: int) -> LM:
        """Expert e, loaded on first use; at most `max_experts` are ever in memory at once."""
        if not 0 <= e < self.n_experts:
            raise ValueError(f"no expert {e}: this mixture has experts 0..{self.n_experts - 1}")
        if e not in self.expert_paths:
            served = ", ".join(map(str, self.experts))
            raise ValueError(f"expert {e} is not served: this mixture serves experts {served}")
        return self._experts.get(e)

    def dense(self) -> LM:
        """The dense baseline (same architecture, all the data): loaded once, outside the LRU."""
        with self._dense_lock:
            if self._dense is None:
                if self.files.exported and not self.dense_path.is_file():
                    raise FileNotFoundError(
                        f"{self.dense_path}: this export holds no dense baseline (export it "
                        "with --dense)"
                    )
                self._dense = self._load(self.dense_path)
            return self._dense

    def _load_expert(self, e: int) -> LM:
        return self._load(self.expert_paths[e])

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
        routings = self.route_ids(self._encode_all(texts), prefix_tokens)
        return routings[0] if isinstance(texts, str) else routings

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
        sequences = self._encode_all(texts)
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
                scored = continuation_logprobs(model, [requests[i] for i in batch])
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
        _check_sampling(max_new_tokens, temperature, top_k, seed)
        check_unicode(prompt, "prompt")
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
        steps = decode(
            models,
            weights,
            ids or [self.eos_id],  # an empty prompt starts a document
            max_new_tokens=max_new_tokens,
            choose=lambda scores: next_token(scores, temperature, top_k, generator),
            use_cache=use_cache,
        )
        tokens, text, stopped = self._until_stop(ids, steps, stop, stop_at_eos)
        return Generation(
            text=text,
            tokens=tuple(tokens),
            routing=routing,
            experts=tuple(experts),
            stopped=stopped,
        )

    def _until_stop(
        self, prompt: list[int], steps: Iterator[int], stop: Sequence[str], stop_at_eos: bool
    ) -> tuple[list[int], str, str]:
        """Take tokens from `steps` until EOS (when `stop_at_eos`) or a stop string, which is cut
        off: the tokens taken, their text and why decoding ended ("length", "eos" or "stop")."""
        tokens: list[int] = []
        for token in steps:
            if stop_at_eos and token == self.eos_id:
                return tokens, self._continuation_text(prompt, tokens), "eos"
            tokens.append(token)
            if stop:
                text = self._continuation_text(prompt, tokens)
                cut = min((text.find(s) for s in stop if s and s in text), default=-1)
                if cut >= 0:
                    return tokens, text[:cut], "stop"
        return tokens, self._continuation_text(prompt, tokens), "length"

    def _continuation_text(self, prompt: list[int], new: list[int]) -> str:
        """The text `new` adds after `prompt`: decoded together, so spaces at the seam survive."""
        return self.decode(prompt + new)[len(self.decode(prompt)) :]


def load(
    results: str | os.PathLike,
    *,
    experts: Sequence[int] | None = None,
    max_experts: int = DEFAULT_MAX_EXPERTS,
    device: str = "auto",
    verify: bool = True,
) -> Mixture:
    """The trained mixture in `results` (the workflow's results directory, e.g. `results`, or an
    export of it), serving all its experts or only those in `experts` (the others retired). An
    export's files are first checked against export.json's sha256, unless `verify` is False."""
    return Mixture(results, experts=experts, max_experts=max_experts, device=device, verify=verify)


def _read_tokenizer(path: Path):
    """The run's SentencePiece model, or an error naming the file."""
    import sentencepiece as spm

    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer not found")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as error:
        raise ValueError(f"{path}: not a SentencePiece model ({error})") from None


def _check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, seed: int | None
) -> None:
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens must lie in [1, {MAX_NEW_TOKENS}], got {max_new_tokens}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must lie in [0, 2**64 - 1], got {seed}")


def _text_id(tokens: np.ndarray) -> int:
    """A stable 63-bit id of a token sequence: what id-keyed routers (`random`) hash."""
    digest = hashlib.blake2b(np.ascontiguousarray(tokens, dtype=np.int64).tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1
