"""Serving a trained mixture: `smalltalk.load(results)` gives a `Mixture`.

mixture.py   the Mixture: routing by prefix, scoring, lm-eval's log-likelihoods, generation
experts.py   the LRU of experts in memory (at most `max_experts`, thread-safe)
decoding.py  scoring and decoding with one model or several weighted ones
results.py   what it answers: Routing, Score, Generation
analysis.py  what each segment holds beside a text's routing (`smalltalk explain`)
texts.py     the texts a serving command reads; format.py: what it prints
"""

from smalltalk.serve.decoding import decode, next_token, sequence_logprobs
from smalltalk.serve.experts import DEFAULT_MAX_EXPERTS
from smalltalk.serve.mixture import MAX_NEW_TOKENS, SCORE_BATCH, Mixture, load
from smalltalk.serve.results import Generation, Routing, Score

__all__ = [
    "DEFAULT_MAX_EXPERTS",
    "MAX_NEW_TOKENS",
    "SCORE_BATCH",
    "Generation",
    "Mixture",
    "Routing",
    "Score",
    "decode",
    "load",
    "next_token",
    "sequence_logprobs",
]
