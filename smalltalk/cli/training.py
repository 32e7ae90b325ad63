"""Routers, shards and training (rules/routers.smk, shard.smk, experts.smk): the EM rounds of
Algorithm 1, baseline routers, training any role, sharding the train split by router, growing."""

from __future__ import annotations

import argparse
import json
import logging

from smalltalk.cli.inputs import load_config, load_routers, set_torch_threads, vocab_size
from smalltalk.cli.printing import show_table
from smalltalk.cli.registry import CONFIG, ROUTERS, THREADS, TOKENIZER, arg, command

log = logging.getLogger("smalltalk")


@command(
    "em-sample",
    "draw the EM blocks and the probe set (Algorithm 1)",
    CONFIG,
    arg("--train", nargs="+", required=True, help="train token files to sample"),
    arg("--val", nargs="+", required=True, help="validation token files (probe)"),
    arg("--blocks", nargs="+", required=True, help="block files, rounds 0..T"),
    arg("--probe", required=True, help="the probe file"),
)
def em_sample(args: argparse.Namespace) -> int:
    from smalltalk.em import sample_blocks

    config = load_config(args.config)
    routing = config["routing"]
    sample_blocks(
        train_files=args.train,
        block_paths=args.blocks,
        block_size=routing["sequences_per_round"],
        probe_files=args.val,
        probe_path=args.probe,
        probe_size=routing["probe_sequences"],
        seed=config["seed"],
    )
    return 0


@command(
    "assign",
    "an EM round's assignment (random in round 0) and diagnostics",
    CONFIG,
    arg("--round", type=int, required=True, help="EM round r"),
    arg("--block", required=True, help="the round's block of sequences"),
    arg("--tokenizer", help="SentencePiece model (round 0 with routing.init tfidf_kmeans)"),
    arg("--scores", nargs="*", default=[], help="the E routers' scores (r >= 1)"),
    arg("--probe", help="the probe set"),
    arg("--probe-scores", nargs="*", default=[], help="probe scores of round r"),
    arg("--previous-probe-scores", nargs="*", default=[], help="probe scores of round r-1"),
    arg("--out", required=True, help="the assignment to write"),
    arg("--diagnostics", required=True, help="the diagnostics row to write"),
    arg("--contingency", required=True, help="segment x source counts to write"),
)
def assign(args: argparse.Namespace) -> int:
    from smalltalk import em
    from smalltalk.files import write_parquet_atomically

    config = load_config(args.config)
    n_experts = config["routing"]["n_experts"]
    if args.round == 0:
        routing = config["routing"]
        em.assign_first_round(
            args.block,
            n_experts,
            config["seed"],
            args.out,
            init=routing["init"],
            tokenizer_model=args.tokenizer,
            prefix_len=routing["prefix_len"],
            tfidf=routing["tfidf"],
        )
        nll = None
    else:
        if len(args.scores) != n_experts:
            raise ValueError(f"expected {n_experts} score files, got {len(args.scores)}")
        _, nll, _ = em.assign_round(args.scores, args.out)
    diagnostics, contingency = em.round_diagnostics(
        round_index=args.round,
        block_path=args.block,
        assignment_path=args.out,
        n_experts=n_experts,
        nll=nll,
        probe_path=args.probe,
        probe_scores=args.probe_scores,
        previous_probe_scores=args.previous_probe_scores,
    )
    write_parquet_atomically(contingency, args.contingency)
    write_parquet_atomically(diagnostics, args.diagnostics)
    row = diagnostics.to_pylist()[0]
    log.info(
        "round %d: %d sequences, NMI with sources %.3f, probe changed %.3f",
        args.round,
        row["sequences"],
        row["nmi_source"],
        row["probe_changed"],
    )
    return 0


@command(
    "em-final",
    "check that EM ends after the last round given (routing.stop), copy its routers to "
    "their fixed place and record why it ended",
    CONFIG,
    arg("--diagnostics", nargs="+", required=True, help="diagnostics of rounds 1..r, in order"),
    arg("--routers", nargs="+", required=True, help="the E routers of round r"),
    arg("--out-routers", nargs="+", required=True, help="where to copy them"),
    arg("--summary", required=True, help="the JSON to write: final round, reason"),
)
def em_final(args: argparse.Namespace) -> int:
    from smalltalk.em import finish_em

    routing = load_config(args.config)["routing"]
    summary = finish_em(
        diagnostics_paths=args.diagnostics,
        router_paths=args.routers,
        out_routers=args.out_routers,
        summary_path=args.summary,
        max_rounds=routing["rounds"],
        stop=routing["stop"],
    )
    log.info("EM ended after round %d: %s", summary["final_round"], summary["reason"])
    return 0


@command(
    "train",
    "train one router, expert or the dense baseline",
    CONFIG,
    arg("--role", choices=["router", "expert", "dense"], required=True),
    arg("--index", type=int, default=0, help="router or expert index e"),
    arg("--round", type=int, help="EM round r (routers)"),
    arg("--assignment", help="the previous round's assignment (routers)"),
    arg(
        "--em-summary",
        help="a grown router (index >= E): EM's em.json, which tells how long EM routers trained",
    ),
    arg("--init", help="weights to start from (a router's previous round)"),
    arg("--steps", type=int, help="optimizer steps (default: from the config)"),
    arg(
        "--branch-from",
        help="a checkpoint directory to go on from (weights, optimizer, step): BTM's branch point",
    ),
    arg("--stop-at", type=int, help="end after this step, leaving a checkpoint to branch from"),
    arg(
        "--baseline",
        choices=["dense_compute", "dense_large"],
        help="a dense baseline on the mixture's whole training budget (role dense)",
    ),
    arg("--budget", help="the baselines' budget (baseline-budget's JSON)"),
    TOKENIZER,
    arg("--out-dir", required=True, help="metrics, checkpoints and summary"),
    arg("--weights", help="final weights (default: OUT_DIR/model.safetensors)"),
    arg("--val", nargs="*", default=[], help="validation token files (curves)"),
    arg("data", nargs="+", help="token Parquet files or directories"),
    THREADS,
)
def train(args: argparse.Namespace) -> int:
    from smalltalk.plan import plan_job
    from smalltalk.train import fit

    config = load_config(args.config)
    plan = plan_job(
        config,
        args.role,
        args.index,
        vocab_size=vocab_size(args.tokenizer),
        em_round=args.round,
        assignment=args.assignment,
        em_summary=args.em_summary,
        data=args.data,
        steps=args.steps,
        threads=args.threads,
        baseline=args.baseline,
        budget=args.budget,
    )
    fit(
        plan.model,
        plan.training,
        args.data,
        args.out_dir,
        role=args.role,
        init_from=args.init,
        seq_ids=plan.seq_ids,
        prefix_len=plan.prefix_len,
        weights_path=args.weights,
        val_files=args.val or None,
        val_every=config["eval"]["every"],
        val_sequences=config["eval"]["val_sequences"],
        branch_from=args.branch_from,
        stop_at=args.stop_at,
    )
    return 0


@command(
    "score-router",
    "score token files' prefixes with one router: an EM stage (float16 NLL per sequence)",
    CONFIG,
    arg("--weights", required=True, help="the router's weights (.safetensors)"),
    TOKENIZER,
    arg("--tokens", action="append", required=True, help="token file (repeatable)"),
    arg("--out", action="append", required=True, help="scores file, one per --tokens"),
    THREADS,
)
def score_router(args: argparse.Namespace) -> int:
    from smalltalk.checkpoint import load_model
    from smalltalk.config import model_config
    from smalltalk.em import score_file

    if len(args.tokens) != len(args.out):
        raise ValueError("give one --out per --tokens")
    config = load_config(args.config)
    set_torch_threads(args.threads)
    model = load_model(
        model_config(config, "router", vocab_size=vocab_size(args.tokenizer)), args.weights
    )
    for tokens, out in zip(args.tokens, args.out, strict=True):
        score_file(model, tokens, config["routing"]["prefix_len"], out)
    return 0


@command(
    "fit-router",
    "fit a baseline router (routing.method) on a sample",
    CONFIG,
    arg("--tokenizer", required=True, help="SentencePiece .model"),
    arg("--out", required=True, help="the fitted router (.npz)"),
    arg("sample", nargs="+", help="token files to fit on (the EM blocks)"),
)
def fit_router(args: argparse.Namespace) -> int:
    from smalltalk.routers import fit_baseline

    config = load_config(args.config)
    routing = config["routing"]
    summary = fit_baseline(
        method=routing["method"],
        sample_paths=args.sample,
        n_experts=routing["n_experts"],
        prefix_len=routing["prefix_len"],
        seed=config["seed"],
        tokenizer_model=args.tokenizer,
        out=args.out,
        **routing["tfidf"],
    )
    print(json.dumps(summary, indent=2))
    return 0


@command(
    "shard",
    "route one train chunk with all routers into expert shards",
    CONFIG,
    arg("--tokens", required=True, help="the chunk's train token file"),
    TOKENIZER,
    ROUTERS,
    arg("--shards", nargs="+", required=True, help="shard files, e order"),
    arg("--scores", required=True, help="the chunk's scores and assignment"),
    THREADS,
)
def shard(args: argparse.Namespace) -> int:
    from smalltalk.shard import shard_chunk

    config = load_config(args.config)
    set_torch_threads(args.threads)
    loads = shard_chunk(
        tokens_path=args.tokens,
        router=load_routers(config, args, keep_loaded=True),
        prefix_len=config["routing"]["prefix_len"],
        shard_paths=args.shards,
        scores_path=args.scores,
    )
    log.info("%s: sequences per expert %s", args.tokens, loads.tolist())
    return 0


@command(
    "check-shards",
    "prove each train sequence is in one shard",
    CONFIG,
    arg("--train", nargs="+", required=True, help="train token files"),
    arg("--shards", nargs="+", required=True, help="shard files"),
    arg("--out", required=True, help="the check report (JSON)"),
)
def check_shards(args: argparse.Namespace) -> int:
    import smalltalk.shard

    config = load_config(args.config)
    report = smalltalk.shard.check_shards(
        train_files=args.train,
        shard_files=args.shards,
        n_experts=config["routing"]["n_experts"],
        out=args.out,
    )
    print(json.dumps(report, indent=2))
    return 0


@command(
    "ledger",
    "bytes of scores exchanged, next to the paper's App. A.4",
    CONFIG,
    arg("--assignments", nargs="+", required=True, help="EM assignments, r order"),
    arg("--shard-scores", nargs="+", required=True, help="per-chunk shard scores"),
    arg("--out", required=True, help="the ledger (Parquet)"),
)
def ledger(args: argparse.Namespace) -> int:
    from smalltalk.ledger import communication_ledger

    config = load_config(args.config)
    table = communication_ledger(
        assignment_paths=args.assignments,
        shard_score_paths=args.shard_scores,
        n_experts=config["routing"]["n_experts"],
        out=args.out,
    )
    show_table(table)
    return 0


@command(
    "capture",
    "train sequences of the run a grown router would take",
    CONFIG,
    arg("--tokens", required=True, help="a train chunk of the run's corpus"),
    arg("--shard-scores", required=True, help="its scores by the run's routers"),
    arg("--router", required=True, help="the grown router's weights"),
    TOKENIZER,
    arg("--out", required=True, help="the rows it takes (token Parquet)"),
    THREADS,
)
def capture(args: argparse.Namespace) -> int:
    from smalltalk.config import model_config
    from smalltalk.grow import capture_chunk
    from smalltalk.routers import LMRouters

    config = load_config(args.config)
    set_torch_threads(args.threads)
    router = LMRouters(
        model_config(config, "router", vocab_size=vocab_size(args.tokenizer)),
        [args.router],
        keep_loaded=True,
    )
    taken = capture_chunk(
        tokens_path=args.tokens,
        shard_scores_path=args.shard_scores,
        router=router,
        prefix_len=config["routing"]["prefix_len"],
        out=args.out,
    )
    log.info("%s: the grown router takes %d sequences", args.tokens, taken)
    return 0
