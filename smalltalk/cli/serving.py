"""Using a trained mixture: route, score, generate and explain texts, run lm-evaluation-harness,
export the mixture as one self-contained folder, check an export against its manifest."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from smalltalk.cli.inputs import load_mixture, read_texts, set_torch_threads
from smalltalk.cli.registry import (
    EXPERTS,
    NO_VERIFY,
    RESULTS,
    SERVING,
    THREADS,
    TOPK,
    arg,
    command,
    expert_list,
    int_at_least,
    seed,
    serving_flags,
    temperature,
)

log = logging.getLogger("smalltalk")


@command(
    "score",
    "score texts: each one's NLL and perplexity under its routed expert(s)",
    SERVING,
    TOPK,
)
def score(args: argparse.Namespace) -> int:
    from smalltalk.serve.format import json_line, score_line

    mixture, texts = load_mixture(args), read_texts(args)
    scores = mixture.score(texts, args.prefix_tokens, args.topk, dense=args.dense)
    for text, result in zip(texts, scores, strict=True):
        record = {"text": text, **result.as_dict()}
        print(json_line(record) if args.json else score_line(text, result))
    return 0


@command(
    "route",
    "route texts: the chosen expert and every router's prefix NLL",
    SERVING,
)
def route(args: argparse.Namespace) -> int:
    from smalltalk.serve.format import json_line, routing_line

    mixture, texts = load_mixture(args), read_texts(args)
    for text, routing in zip(texts, mixture.route(texts, args.prefix_tokens), strict=True):
        record = {"text": text, **routing.as_dict()}
        print(json_line(record) if args.json else routing_line(text, routing))
    return 0


@command(
    "generate",
    "continue prompts with their routed expert (KV cache)",
    serving_flags(texts="prompts"),
    TOPK,
    arg(
        "--max-new-tokens",
        type=int_at_least(1),
        default=64,
        help="at most (default: 64; up to 65536)",
    ),
    arg("--temperature", type=temperature, default=1.0, help="0: greedy (default: 1.0)"),
    arg("--top-k", type=int_at_least(1), help="sample from the k likeliest tokens only"),
    arg("--seed", type=seed, help="sampling seed, 0 to 2**64 - 1 (reproducible output)"),
    arg("--stop", action="append", default=[], help="stop at this string (repeatable)"),
)
def generate(args: argparse.Namespace) -> int:
    from smalltalk.serve.format import json_line

    mixture = load_mixture(args)
    for prompt in read_texts(args):
        generation = mixture.generate(
            prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            topk_experts=args.topk,
            stop=args.stop,
            prefix_tokens=args.prefix_tokens,
            dense=args.dense,
        )
        if args.json:
            print(json_line({"prompt": prompt, **generation.as_dict()}))
        else:
            print(prompt + generation.text)
            log.info(
                "expert %s, %d tokens (%s)",
                ",".join(map(str, generation.experts)) or "dense",
                len(generation.tokens),
                generation.stopped,
            )
    return 0


@command(
    "explain",
    "each router's prefix NLL for a text, beside each segment's sources and typical tokens",
    SERVING,
)
def explain(args: argparse.Namespace) -> int:
    from smalltalk.serve.analysis import explain as explain_text
    from smalltalk.serve.format import explanation_lines, json_line

    mixture = load_mixture(args)
    for text in read_texts(args):
        explanation = explain_text(mixture, text, args.prefix_tokens)
        if args.json:
            print(json_line({"text": text, **explanation}))
        else:
            print(explanation_lines(text, explanation, mixture.prefix_len))
    return 0


@command(
    "export",
    "write a trained mixture as one self-contained folder: tokenizer, routers, experts in "
    "the Hugging Face layout, config, evaluation tables and a model card",
    RESULTS,
    arg("--out", required=True, help="the folder to write (built beside it)"),
    arg("--experts", type=expert_list, help="export only these experts, e.g. 0,2"),
    arg("--dense", action="store_true", help="include the dense baseline's weights"),
    arg("--force", action="store_true", help="replace --out if it exists and is not empty"),
    NO_VERIFY,
)
def export(args: argparse.Namespace) -> int:
    from smalltalk.export import export_mixture

    manifest = export_mixture(
        args.results,
        args.out,
        experts=args.experts,
        dense=args.dense,
        force=args.force,
        verify=not args.no_verify,
    )
    experts = ",".join(map(str, manifest["experts"]))
    dense = " and the dense baseline" if manifest["dense"] else ""
    log.info(
        "exported experts %s%s to %s (%d files)", experts, dense, args.out, len(manifest["files"])
    )
    return 0


@command(
    "lm-eval",
    "run lm-evaluation-harness tasks on the mixture, offline",
    RESULTS,
    EXPERTS,
    NO_VERIFY,
    arg("--tasks", nargs="+", default=["continuation_choice"], help="lm-eval task names"),
    arg(
        "--models",
        nargs="+",
        choices=["mixture", "dense"],
        default=["mixture"],
        help="the routed mixture and/or the dense baseline (default: mixture)",
    ),
    arg("--limit", type=int_at_least(1), help="at most this many examples per task"),
    arg(
        "--include-path",
        action="append",
        default=[],
        help="more task directories (their YAML may run Python from there: name only trusted ones)",
    ),
    arg("--max-experts", type=int_at_least(1), help="experts kept in memory (default: 2)"),
    arg("--topk", type=int_at_least(1), default=1, help="mix the top k experts (c-BTM)"),
    arg("--out", help="the scores table to write (Parquet)"),
    arg("--raw", help="lm-eval's results to write (JSON)"),
    arg("--json", action="store_true", help="print one JSON object per score"),
    THREADS,
)
def lm_eval(args: argparse.Namespace) -> int:
    from smalltalk.files import write_parquet_atomically, write_text_atomically
    from smalltalk.harness import run_lm_eval
    from smalltalk.serve.format import json_line, lm_eval_line

    set_torch_threads(args.threads)
    table, raw = run_lm_eval(
        args.results,
        args.tasks,
        models=args.models,
        limit=args.limit,
        include_paths=args.include_path,
        topk=args.topk,
        experts=args.experts,
        verify=not args.no_verify,
        **({} if args.max_experts is None else {"max_experts": args.max_experts}),
    )
    if args.out:
        write_parquet_atomically(table, args.out)
    if args.raw:
        write_text_atomically(json.dumps(raw, indent=2, default=str) + "\n", args.raw)
    for row in table.to_pylist():
        print(json_line(row) if args.json else lm_eval_line(row))
    return 0


@command(
    "verify",
    "check an export's files against the sha256 that its export.json records, one line each",
    arg("export", type=Path, help="the export's folder (`smalltalk export --out`)"),
)
def verify(args: argparse.Namespace) -> int:
    from smalltalk.layout import EXPORT_MANIFEST, read_manifest
    from smalltalk.verify import check_export

    root = args.export.resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    manifest = read_manifest(root)
    if manifest is None:
        raise ValueError(
            f"{root}: no {EXPORT_MANIFEST}, so not an export (a results directory records no "
            "sha256 to check)"
        )
    checks = check_export(root, manifest)
    for check in checks:
        print(check.line())
    failed = sum(check.problem is not None for check in checks)
    if failed:
        raise ValueError(f"{root}: {failed} of {len(checks)} files fail the check")
    log.info("%s: all %d files have the sha256 export.json records", root, len(checks))
    return 0
