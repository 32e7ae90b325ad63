"""lm-evaluation-harness on a trained mixture: the `smalltalk` model, an offline task, a runner.

- `SmallTalkLM`, registered with lm-eval as `smalltalk` (`model_args="results=results"`):
  `loglikelihood` (multiple choice), `loglikelihood_rolling` (perplexity) and `generate_until`,
  each request routed by its context as the paper routes a prompt by its prefix (§2.2); with
  `model=dense` the dense baseline answers instead, the paper's comparison at equal inference
  cost (Fig. 3).
- `build_choice_task`: "continuation choice", a multiple-choice task from the test split: a test
  sequence's first M tokens (the routing prefix) are the question, its next tokens the answer, and
  the same span of other test sequences the distractors. It is written as JSON lines beside an
  lm-eval task YAML (`dataset_path: json`), so it runs with no network.
- `run_lm_eval`: lm-eval's `simple_evaluate` over the continuation-choice task, the task
  directories named (and lm-eval's own tasks, when they are cached locally), one row per model,
  task and metric.
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from smalltalk.serve import DEFAULT_MAX_EXPERTS, SCORE_BATCH, load, sequence_logprobs
from smalltalk.tokens import sampling_keys, token_matrix

TASK_NAME = "continuation_choice"
SCORES_SCHEMA = pa.schema(
    [
        ("model", pa.string()),  # mixture (routed) or dense
        ("task", pa.string()),
        ("metric", pa.string()),  # e.g. acc, acc_norm
        ("value", pa.float64()),
        ("stderr", pa.float64()),
        ("examples", pa.int64()),
    ]
)


# ---- the model -------------------------------------------------------------------------------


@register_model("smalltalk")
class SmallTalkLM(TemplateLM):
    """A trained SmallTalk mixture (or its dense baseline) as an lm-eval model.

    Arguments (lm-eval's `model_args`): `results` (the results directory, or an export), `model`
    (`mixture` or `dense`), `experts` (the experts to serve, retiring the others: a list, or in
    a `model_args` string indices joined by `;`, e.g. `experts=0;2`), `max_experts` (experts
    kept in memory), `topk` (1: the routed expert; k: the c-BTM mixture of the top k),
    `prefix_tokens` (routing prefix M-hat; default M), `max_gen_toks`, `verify` (False: read an
    export without checking its files against export.json first).
    Requests are routed first and scored expert by expert, so each expert loads once per call.
    """

    def __init__(
        self,
        results: str,
        model: str = "mixture",
        experts: Sequence[int] | str | None = None,
        max_experts: int = DEFAULT_MAX_EXPERTS,
        topk: int = 1,
        prefix_tokens: int | None = None,
        max_gen_toks: int = 256,
        batch_size: int | str | None = None,
        device: str | None = None,
        verify: bool | str = True,
        **unused: Any,
    ):
        super().__init__()
        if model not in ("mixture", "dense"):
            raise ValueError(f"model must be 'mixture' or 'dense', got {model!r}")
        if isinstance(experts, str):  # from a model_args string, where commas separate arguments
            experts = [int(e) for e in experts.replace(";", ",").split(",") if e.strip()]
        elif isinstance(experts, int):  # model_args "experts=2" arrives as a number
            experts = [experts]
        if isinstance(verify, str):  # from a model_args string
            verify = verify.strip().lower() not in ("false", "0", "no")
        self.mixture = load(
            results,
            experts=experts,
            max_experts=int(max_experts),
            device=device or "auto",
            verify=verify,
        )
        self.dense = model == "dense"
        self.topk = int(topk)
        self.prefix_tokens = int(prefix_tokens) if prefix_tokens else None
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else SCORE_BATCH
        self._device = self.mixture.device

    @property
    def eot_token_id(self) -> int:
        return self.mixture.eos_id  # EOS separates documents in the training stream

    @property
    def max_length(self) -> int:
        return self.mixture.expert_config.seq_len

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        return self.mixture.encode(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.mixture.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(context ids, continuation ids) pairs from `TemplateLM.loglikelihood`; an empty
        context arrives as [EOS], the start of a document."""
        results = self.mixture.loglikelihoods(
            [(context, continuation) for _, context, continuation in requests],
            topk=self.topk,
            dense=self.dense,
            prefix_tokens=self.prefix_tokens,
            batch_size=self.batch_size,
        )
        for (key, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood, every token scored once, the first after EOS (lm-eval's
        convention), routed by the text's own prefix."""
        texts = [request.args[0] for request in requests]
        sequences = [self.mixture.encode(text) for text in texts]
        routings = self.mixture.route_ids(sequences, self.prefix_tokens)
        results: list[float] = [0.0] * len(texts)
        for i in sorted(range(len(texts)), key=lambda i: routings[i].expert):
            ids = [self.eot_token_id, *sequences[i]]
            if self.dense:
                logprobs = sequence_logprobs(self.mixture.dense(), ids)
            else:
                log_weights = self.mixture.log_weights(routings[i], self.topk)
                logprobs = self.mixture.mixture_logprobs(ids, log_weights)
            results[i] = float(logprobs.sum(dtype=logprobs.dtype))
            self.cache_hook.add_partial("loglikelihood_rolling", (texts[i],), results[i])
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (sampled when `do_sample`), cut at the first `until` string."""
        contexts = [request.args[0] for request in requests]
        routings = self.mixture.route(contexts, self.prefix_tokens) if contexts else []
        results: list[str] = [""] * len(contexts)
        for i in sorted(range(len(contexts)), key=lambda i: routings[i].expert):
            kwargs = dict(requests[i].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            generation = self.mixture.generate(
                contexts[i],
                max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                temperature=temperature,
                top_k=kwargs.get("top_k"),
                seed=kwargs.get("seed"),
                topk_experts=self.topk,
                stop=until,
                prefix_tokens=self.prefix_tokens,
                dense=self.dense,
            )
            results[i] = generation.text
            self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return results


# ---- the offline task ------------------------------------------------------------------------


def _draw_questions(
    order: np.ndarray,
    split: Callable[[int], tuple[str, str] | None],
    examples: int,
    choices: int,
    seed: int,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Up to `examples` (row, question) pairs, rows taken in `order`: a row's context and, among
    `choices` options in a seeded order, its own continuation (`gold`) and those of other rows.
    `split(row)` is a row's (context, continuation), or None where the row cannot be used."""
    rng = np.random.default_rng(seed)
    drawn = 0
    for row in order:
        if drawn == examples:
            return
        pair = split(row)
        if pair is None:
            continue
        context, answer = pair
        options = [answer]
        for other in rng.permutation(len(order)):
            if len(options) == choices:
                break
            other_pair = split(other) if other != row else None
            if other_pair is not None and other_pair[1] not in options:
                options.append(other_pair[1])
        if len(options) < choices:
            continue
        gold = int(rng.integers(choices))
        options[0], options[gold] = options[gold], options[0]
        drawn += 1
        yield int(row), {"context": context, "choices": options, "gold": gold}


def build_choice_task(
    *,
    test_files: Sequence[str | os.PathLike],
    tokenizer_model: str | os.PathLike,
    out_dir: str | os.PathLike,
    examples: int,
    choices: int,
    context_tokens: int,
    continuation_tokens: int,
    seed: int,
) -> dict[str, Any]:
    """Write `{out_dir}/continuation_choice.jsonl` (one question per line: context, choices,
    gold, source, seq_id) and the lm-eval task `{out_dir}/continuation_choice.yaml`.

    Questions come from test sequences in a seeded order (`tokens.sampling_keys`): the text of the
    first `context_tokens` tokens, then the text of the next `continuation_tokens` as the true
    choice among `choices`; the others are the same span of other test sequences, drawn with the
    same seed. Spans are decoded together with their context, so each choice carries the spaces
    that join it to a context. Returns a summary."""
    import pyarrow.parquet as pq
    import sentencepiece as spm

    from smalltalk.files import write_text_atomically

    if choices < 2 or context_tokens < 1 or continuation_tokens < 1 or examples < 1:
        raise ValueError(
            "need examples >= 1, choices >= 2, context_tokens >= 1 and continuation_tokens >= 1"
        )
    table = pa.concat_tables(
        [pq.read_table(path, columns=["seq_id", "tokens", "source"]) for path in test_files]
    )
    tokens = token_matrix(table.column("tokens"))  # (n, S+1)
    if len(tokens) and context_tokens + continuation_tokens > tokens.shape[1]:
        raise ValueError(
            f"context ({context_tokens}) and continuation ({continuation_tokens}) tokens exceed "
            f"the test sequences' {tokens.shape[1]} tokens"
        )
    tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    seq_ids = table.column("seq_id").to_numpy()
    sources = table.column("source").to_pylist()
    end = context_tokens + continuation_tokens

    def split(row: int) -> tuple[str, str] | None:
        """(context text, continuation text) of a sequence, if its text splits cleanly there."""
        context = tokenizer.decode(tokens[row, :context_tokens].tolist())
        whole = tokenizer.decode(tokens[row, :end].tolist())
        continuation = whole[len(context) :]
        if not whole.startswith(context) or not continuation.strip():
            return None  # a character cut in two by byte fallback, or a blank span
        return context, continuation

    order = np.argsort(sampling_keys(seq_ids, seed), kind="stable")  # a seeded shuffle
    questions = [
        {"seq_id": int(seq_ids[row]), "source": sources[row], **question}
        for row, question in _draw_questions(order, split, examples, choices, seed)
    ]
    if not questions:
        raise ValueError(f"no question could be built from {len(tokens)} test sequences")

    out_dir = Path(out_dir).resolve()
    data = out_dir / f"{TASK_NAME}.jsonl"
    write_text_atomically("".join(json.dumps(q) + "\n" for q in questions), data)
    header = (
        "# The continuation-choice task (smalltalk harness-task): which span follows the context?\n"
        f"# {len(questions)} questions from the test split, {choices} choices each, "
        f"{context_tokens} context and {continuation_tokens} continuation tokens.\n"
    )
    write_text_atomically(
        header + yaml.safe_dump(choice_task(data), sort_keys=False), out_dir / f"{TASK_NAME}.yaml"
    )
    return {
        "questions": len(questions),
        "choices": choices,
        "sources": {s: sum(q["source"] == s for q in questions) for s in sorted(set(sources))},
    }


def choice_task(data: Path) -> dict[str, Any]:
    """The lm-eval task over the questions in `data`: plain fields, no code of its own."""
    return {
        "task": TASK_NAME,
        # Local JSON lines and a cache beside them: nothing is downloaded.
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(data)},
            "cache_dir": str(data.parent / "cache"),
        },
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",  # field names: lm-eval reads the values as they are
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": "",  # each choice carries its own leading space
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


# ---- running lm-eval -------------------------------------------------------------------------


def run_lm_eval(
    results: str | os.PathLike,
    tasks: Sequence[str],
    *,
    models: Sequence[str] = ("mixture",),
    limit: int | None = None,
    include_paths: Sequence[str | os.PathLike] = (),
    max_experts: int = DEFAULT_MAX_EXPERTS,
    topk: int = 1,
    experts: Sequence[int] | None = None,
    batch_size: int = SCORE_BATCH,
    seed: int = 1234,
    verify: bool = True,
) -> tuple[pa.Table, dict[str, Any]]:
    """Run lm-eval's `simple_evaluate` with each of `models` (`mixture`, `dense`) on `tasks`,
    offline. Tasks are looked up among the workflow's continuation-choice questions
    (`{results}/harness/continuation_choice/`) and in `include_paths`, and among lm-eval's own
    tasks only when not all are found there (their data must then be cached). `experts` serves
    only those experts, and `verify` checks an export's files first (`smalltalk.load`). Returns
    the `SCORES_SCHEMA` table and lm-eval's results per model.

    A task YAML may import Python from its directory (`!function utils.f`), so none is read from
    the results directory, which holds what jobs wrote: the continuation-choice task is written
    afresh to a temporary directory, pointing at the questions' JSON lines (data only)."""
    # Tasks read local files: the datasets library and the Hub client must not reach the network.
    # Both read these when first imported, so set them before lm-eval imports them.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    rows, raw = [], {}
    with _workflow_tasks(results) as own_tasks:
        paths = [own_tasks, *(str(path) for path in include_paths)]
        manager = TaskManager(include_path=paths, include_defaults=False)
        own = sorted(manager.task_index)
        if any(task not in manager.all_tasks for task in tasks):
            manager = TaskManager(include_path=paths)
        # lm-eval would raise a KeyError from deep inside simple_evaluate, after the models load.
        unknown = [task for task in tasks if not _is_task(manager, task)]
        if unknown:
            raise ValueError(_unknown_tasks(unknown, own, sorted(manager.task_index)))
        for name in models:
            lm = SmallTalkLM(
                results=str(results),
                model=name,
                experts=experts,
                max_experts=max_experts,
                topk=topk,
                batch_size=batch_size,
                verify=verify,
            )
            output = simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=manager,
                limit=limit,
                bootstrap_iters=1000,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
            raw[name] = {
                key: output.get(key) for key in ("results", "n-samples", "configs", "versions")
            }
            rows += _metric_rows(name, output)
    return pa.Table.from_pylist(rows, schema=SCORES_SCHEMA), raw


def _is_task(manager, spec: str) -> bool:
    """Whether lm-eval can run `spec`: a task, group or tag it knows, or a task YAML file."""
    return spec in manager.task_index or (
        Path(spec).suffix in (".yaml", ".yml") and Path(spec).is_file()
    )


def _unknown_tasks(unknown: Sequence[str], own: Sequence[str], known: Sequence[str]) -> str:
    """Which tasks are unknown, which the run and --include-path give, and what is close."""
    names = ", ".join(map(repr, unknown))
    ours = (
        f"the tasks of this run and --include-path are {', '.join(own)}"
        if own
        else f"this run has no tasks of its own ('smalltalk harness-task' builds {TASK_NAME})"
    )
    close = sorted({m for task in unknown for m in difflib.get_close_matches(task, known, n=3)})
    near = f"; close to: {', '.join(close)}" if close else ""
    return (
        f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {names}: {ours}; lm-eval's own "
        f"{len(known) - len(own)} tasks, groups and tags are listed by 'lm-eval ls tasks'{near}"
    )


@contextmanager
def _workflow_tasks(results: str | os.PathLike) -> Iterator[str]:
    """A temporary task directory holding the continuation-choice task of `results`, if it has
    questions: the YAML is written here from `choice_task`, never read from the results."""
    with tempfile.TemporaryDirectory(prefix="smalltalk-tasks-") as folder:
        data = Path(results).resolve() / "harness" / TASK_NAME / f"{TASK_NAME}.jsonl"
        if data.is_file():
            task = yaml.safe_dump(choice_task(data), sort_keys=False)
            Path(folder, f"{TASK_NAME}.yaml").write_text(task)
        yield folder


def _metric_rows(model: str, output: dict[str, Any]) -> list[dict[str, Any]]:
    """lm-eval's "metric,filter" keys as rows, each metric beside its "metric_stderr,filter"."""
    rows = []
    for task, values in sorted(output["results"].items()):
        examples = output.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            rows.append(
                {
                    "model": model,
                    "task": task,
                    "metric": metric if filter_name == "none" else f"{metric} ({filter_name})",
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, int | float) else None,
                    "examples": examples,
                }
            )
    return rows
