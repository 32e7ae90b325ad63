"""Evaluation (rules/evaluate.smk, experts.smk, harness.smk): route and score the validation and
test splits in parts, merge them into per-sequence rows, aggregate, count FLOPs, and build the
offline task for lm-evaluation-harness."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smalltalk.cli.inputs import load_config, load_routers, set_torch_threads, vocab_size
from smalltalk.cli.printing import show_table
from smalltalk.cli.registry import (
    CONFIG,
    ROUTERS,
    THREADS,
    TOKENIZER,
    arg,
    command,
    expert_list,
    named_path,
)

TOKEN_FILES = arg("--tokens", nargs="+", required=True, help="token files, read in order")
ROUTING_COST_FILES = (  # what the routers spent: their training summaries and scoring passes
    arg("--router-summaries", nargs="*", default=[], help="router summary.json"),
    arg("--em-scores", nargs="*", default=[], help="EM score files"),
    arg("--shard-scores", nargs="+", required=True, help="per-chunk shard scores"),
)


@command(
    "route-validation",
    "route a validation pool with the final routers and split it per expert",
    CONFIG,
    arg("--val", nargs="+", required=True, help="validation token files"),
    TOKENIZER,
    ROUTERS,
    arg("--routing", required=True, help="seq_id -> expert (Parquet) to write"),
    arg("--pool", required=True, help="the validation pool to write"),
    arg("--experts", nargs="+", required=True, help="per-expert files, e order"),
    THREADS,
)
def route_validation(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from smalltalk.evaluate import route_sequences, split_by_expert
    from smalltalk.tokens import gather_rows

    config = load_config(args.config)
    set_torch_threads(args.threads)
    # The pool: the first eval.val_sequences validation rows; the dense model is validated on all
    # of it, each expert on the part routed to it, so the mixture's curve is comparable.
    pool_ids = []
    for path in args.val:
        ids = pq.read_table(path, columns=["seq_id"]).column("seq_id").to_pylist()
        pool_ids += ids[: config["eval"]["val_sequences"] - len(pool_ids)]
    gather_rows(args.val, dict.fromkeys(pool_ids, 0), [args.pool])
    route_sequences(
        tokens_path=args.pool,
        router=load_routers(config, args),
        prefix_len=config["routing"]["prefix_len"],
        out=args.routing,
    )
    split_by_expert([args.pool], args.routing, args.experts)
    return 0


@command(
    "evaluate",
    "route and score one test chunk (per-sequence rows)",
    CONFIG,
    arg("--tokens", required=True, help="the chunk's test token file"),
    TOKENIZER,
    ROUTERS,
    arg("--experts", nargs="+", required=True, help="expert weights, e order"),
    arg("--dense", required=True, help="dense baseline weights"),
    arg("--out", required=True, help="per-sequence rows (Parquet)"),
    THREADS,
)
def evaluate(args: argparse.Namespace) -> int:
    from smalltalk.config import eval_prefix_lens, model_config
    from smalltalk.evaluate import evaluate_chunk

    config = load_config(args.config)
    set_torch_threads(args.threads)
    vocab = vocab_size(args.tokenizer)
    evaluation = config["eval"]
    evaluate_chunk(
        tokens_path=args.tokens,
        router=load_routers(config, args),
        expert_config=model_config(config, "expert", vocab_size=vocab),
        expert_weights=args.experts,
        dense_weights=args.dense,
        prefix_lens=eval_prefix_lens(config),
        train_prefix_len=config["routing"]["prefix_len"],
        topk=evaluation["topk"],
        temperature=evaluation["temperature"],
        batch_size=evaluation["batch_size"],
        out=args.out,
    )
    return 0


@command(
    "route-part",
    "one router's prefix costs of token files, every M̂",
    CONFIG,
    TOKEN_FILES,
    TOKENIZER,
    ROUTERS,
    arg("--out", required=True, help="the costs (Parquet)"),
    THREADS,
)
def route_part(args: argparse.Namespace) -> int:
    import smalltalk.evaluate
    from smalltalk.config import eval_prefix_lens

    config = load_config(args.config)
    set_torch_threads(args.threads)
    smalltalk.evaluate.route_part(
        tokens_paths=args.tokens,
        router=load_routers(config, args),
        prefix_lens=eval_prefix_lens(config),
        out=args.out,
    )
    return 0


@command(
    "score-part",
    "one model's NLLs of every sequence of token files",
    CONFIG,
    TOKEN_FILES,
    TOKENIZER,
    arg("--weights", required=True, help="an expert's or the dense model's weights"),
    arg(
        "--architecture",
        choices=["expert", "dense_large"],
        default="expert",
        help="models.expert (experts, the dense baselines) or models.dense_large",
    ),
    arg("--out", required=True, help="the scores (Parquet)"),
    THREADS,
)
def score_part(args: argparse.Namespace) -> int:
    import smalltalk.evaluate
    from smalltalk.config import model_config

    config = load_config(args.config)
    set_torch_threads(args.threads)
    smalltalk.evaluate.score_part(
        tokens_paths=args.tokens,
        model_config=model_config(config, args.architecture, vocab_size=vocab_size(args.tokenizer)),
        weights=args.weights,
        train_prefix_len=config["routing"]["prefix_len"],
        batch_size=config["eval"]["batch_size"],
        out=args.out,
    )
    return 0


@command(
    "merge-part",
    "per-sequence rows from routes and scores",
    CONFIG,
    arg("--tokens", nargs="+", required=True, help="the token files (ids, sources)"),
    arg("--routes", nargs="+", required=True, help="route-part files, expert order"),
    arg("--expert-scores", nargs="+", required=True, help="score-part files, e order"),
    arg("--dense-scores", required=True, help="the dense model's score-part file"),
    arg(
        "--baseline-scores",
        nargs="*",
        default=[],
        type=named_path,
        help="NAME=score-part file of each further dense baseline (a column nll_NAME each)",
    ),
    arg(
        "--experts",
        type=expert_list,
        default=None,
        help="keep these experts only, e.g. 0,1,2 (the mixture before it grew); default: all",
    ),
    arg("--out", required=True, help="per-sequence rows (Parquet)"),
)
def merge_part(args: argparse.Namespace) -> int:
    import smalltalk.evaluate

    evaluation = load_config(args.config)["eval"]
    smalltalk.evaluate.merge_part(
        tokens_paths=args.tokens,
        routes=args.routes,
        expert_scores=args.expert_scores,
        dense_scores=args.dense_scores,
        topk=evaluation["topk"],
        temperature=evaluation["temperature"],
        experts=args.experts,
        out=args.out,
        baseline_scores=dict(args.baseline_scores),
    )
    return 0


@command(
    "grow-summary",
    "the mixture after growing against before",
    CONFIG,
    arg("--after", nargs="+", required=True, help="merge-part rows, all experts"),
    arg("--before", nargs="+", required=True, help="the rows of the first E only"),
    arg("--out", required=True, help="the table (Parquet)"),
    arg("--markdown", help="the table as Markdown too"),
)
def grow_summary(args: argparse.Namespace) -> int:
    import smalltalk.grow

    config = load_config(args.config)
    table = smalltalk.grow.grow_summary(
        after=args.after,
        before=args.before,
        n_experts=config["routing"]["n_experts"],
        names=[entry["name"] for entry in config["grow"]],
        prefix_len=config["routing"]["prefix_len"],
        out=args.out,
    )
    if args.markdown:
        smalltalk.grow.markdown(table, args.markdown)
    show_table(table)
    return 0


@command(
    "aggregate",
    "perplexity tables from the per-sequence rows",
    arg("--out-dir", required=True, help="where the summary tables go"),
    arg("eval", nargs="+", help="per-sequence evaluation files"),
)
def aggregate(args: argparse.Namespace) -> int:
    import smalltalk.aggregate

    tables = smalltalk.aggregate.aggregate(args.eval, args.out_dir)
    show_table(tables["overall"])
    return 0


@command(
    "ledger-flops",
    "the run's FLOPs (Eq. 10-16) and the paper's",
    CONFIG,
    TOKENIZER,
    *ROUTING_COST_FILES,
    arg("--expert-summaries", nargs="+", required=True, help="expert summary.json"),
    arg("--dense-summary", required=True, help="dense summary.json"),
    arg(
        "--baseline-summaries",
        nargs="*",
        default=[],
        type=named_path,
        help="NAME=summary.json of each dense baseline on the mixture's budget",
    ),
    arg("--out", required=True, help="the run's FLOPs ledger (Parquet)"),
    arg("--paper-out", required=True, help="the paper's Table 3 (Parquet)"),
)
def ledger_flops(args: argparse.Namespace) -> int:
    from smalltalk.config import model_config
    from smalltalk.ledger import flops_ledger, paper_table3_table
    from smalltalk.plan import baseline_models

    config = load_config(args.config)
    vocab = vocab_size(args.tokenizer)
    baselines = dict(args.baseline_summaries)
    models = baseline_models(config, vocab_size=vocab)
    table = flops_ledger(
        router_config=model_config(config, "router", vocab_size=vocab),
        expert_config=model_config(config, "expert", vocab_size=vocab),
        router_summaries=args.router_summaries,
        em_score_files=args.em_scores,
        shard_score_files=args.shard_scores,
        expert_summaries=args.expert_summaries,
        dense_summary=args.dense_summary,
        n_experts=config["routing"]["n_experts"],
        prefix_len=config["routing"]["prefix_len"],
        out=args.out,
        routing_method=config["routing"]["method"],
        baseline_summaries=baselines,
        baseline_configs={name: models[name][0] for name in baselines if name != "dense_compute"},
    )
    paper_table3_table(args.paper_out)
    show_table(table)
    return 0


@command(
    "baseline-budget",
    "the mixture's whole training FLOPs, and the steps of each dense baseline given them",
    CONFIG,
    TOKENIZER,
    *ROUTING_COST_FILES,
    arg("--out", required=True, help="the budget (JSON)"),
)
def baseline_budget(args: argparse.Namespace) -> int:
    import smalltalk.ledger
    from smalltalk.config import model_config
    from smalltalk.plan import baseline_models, planned_training_flops

    config = load_config(args.config)
    vocab = vocab_size(args.tokenizer)
    experts, dense = planned_training_flops(config, vocab_size=vocab)
    routing = smalltalk.ledger.routing_flops(
        router_config=model_config(config, "router", vocab_size=vocab),
        router_summaries=args.router_summaries,
        em_score_files=args.em_scores,
        shard_score_files=args.shard_scores,
        n_experts=config["routing"]["n_experts"],
        prefix_len=config["routing"]["prefix_len"],
        routing_method=config["routing"]["method"],
    )
    budget = smalltalk.ledger.baseline_budget(
        expert_config=model_config(config, "expert", vocab_size=vocab),
        planned_experts=experts,
        planned_dense=dense,
        routing_costs=routing,
        baselines=baseline_models(config, vocab_size=vocab),
        out=args.out,
    )
    print(json.dumps(budget, indent=2))
    return 0


@command(
    "harness-task",
    "build the offline continuation-choice task for lm-eval from the test split",
    CONFIG,
    arg("--tokenizer", type=Path, required=True, help="SentencePiece .model"),
    arg("--out-dir", required=True, help="where the task's JSON lines and YAML go"),
    arg("tokens", nargs="+", help="test token files"),
)
def harness_task(args: argparse.Namespace) -> int:
    from smalltalk.harness import build_choice_task

    config = load_config(args.config)
    harness = config["harness"]
    summary = build_choice_task(
        test_files=args.tokens,
        tokenizer_model=args.tokenizer,
        out_dir=args.out_dir,
        examples=harness["examples"],
        choices=harness["choices"],
        context_tokens=config["routing"]["prefix_len"],  # the question is the routing prefix
        continuation_tokens=harness["continuation_tokens"],
        seed=config["seed"],
    )
    print(json.dumps(summary, indent=2))
    return 0
