"""`smalltalk <command>`: one subcommand per workflow stage, each usable without Snakemake.

Flags carry only a job's identity and files; every tunable lives in the config file,
so a rule, a test and a user run the same code path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from smalltalk import __version__

log = logging.getLogger("smalltalk")


def _config(path: Path) -> dict:
    from smalltalk.config import load_config

    return load_config(path)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args.config)
    if args.print:
        import yaml

        sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
    else:
        print(f"{args.config}: valid")
    return 0


def cmd_chunks(args: argparse.Namespace) -> int:
    from smalltalk.config import DataConfig
    from smalltalk.data import plan_chunks

    data = DataConfig.from_config(_config(args.config))
    for chunk in plan_chunks(data.inputs, data.files_per_chunk):
        print(json.dumps({"chunk": chunk.name, "files": list(chunk.files)}))
    return 0


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from smalltalk.config import DataConfig, TokenizerConfig
    from smalltalk.data import plan_chunks
    from smalltalk.tokenizer import train_tokenizer

    config = _config(args.config)
    data = DataConfig.from_config(config)
    files = args.files or [
        f for c in plan_chunks(data.inputs, data.files_per_chunk) for f in c.files
    ]
    path = train_tokenizer(
        files=files,
        data=data,
        tokenizer=TokenizerConfig.from_config(config),
        out_model=args.out,
        threads=args.threads,
    )
    log.info("wrote %s", path)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from smalltalk.config import DataConfig
    from smalltalk.data import Chunk, plan_chunks, tokenize_chunk

    data = DataConfig.from_config(_config(args.config))
    if args.files:
        index = int(args.chunk.lstrip("c"))
        chunk = Chunk(index=index, name=args.chunk, files=tuple(str(f) for f in args.files))
    else:
        plan = {c.name: c for c in plan_chunks(data.inputs, data.files_per_chunk)}
        if args.chunk not in plan:
            raise SystemExit(f"smalltalk tokenize: no chunk '{args.chunk}' in the input plan")
        chunk = plan[args.chunk]
    stats = tokenize_chunk(
        chunk=chunk,
        data=data,
        tokenizer_model=args.tokenizer,
        out_dir=args.out_dir,
        stats_path=args.stats or Path(args.out_dir) / "stats" / f"{chunk.name}.json",
        threads=args.threads,
    )
    for split, split_stats in stats.splits.items():
        log.info(
            "%s %s: %d documents, %d sequences, %d tokens, %d dropped",
            chunk.name,
            split,
            split_stats.documents,
            split_stats.sequences,
            split_stats.tokens,
            split_stats.dropped_tokens,
        )
    if stats.bad_records:
        log.warning("%s: skipped %d bad records", chunk.name, stats.bad_records)
    return 0


def cmd_summarize_tokens(args: argparse.Namespace) -> int:
    from smalltalk.data import summarize_stats

    summarize_stats(args.stats, args.out)
    sys.stdout.write(Path(args.out).read_text())
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    import torch

    from smalltalk import flops
    from smalltalk.model import LM, PRESETS, ModelConfig

    if args.paper:
        print(flops.format_paper_table3())
        return 0
    for name in args.presets or sorted(PRESETS):
        config = ModelConfig.from_preset(name)
        with torch.device("meta"):  # counts parameters without allocating them
            parameters = LM(config).num_parameters()
        per_sequence = flops.inference_flops(config, config.seq_len)
        print(
            f"{name:12} {parameters / 1e6:9.2f}M params  L={config.n_layer:<3} d={config.n_embd:<5}"
            f" V={config.vocab_size:<6} S={config.seq_len:<5}"
            f" {per_sequence / 1e9:10.3f} GFLOPs inference per sequence"
        )
    return 0


def _torch_threads(threads: int) -> None:
    """Use exactly the job's cores: on a busy machine, idle OpenMP threads spinning for work
    make small models many times slower."""
    import torch

    torch.set_num_threads(threads)


def _vocab_size(tokenizer: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()


def cmd_em_sample(args: argparse.Namespace) -> int:
    from smalltalk.em import sample_blocks

    config = _config(args.config)
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


def cmd_assign(args: argparse.Namespace) -> int:
    from smalltalk import em
    from smalltalk.files import write_parquet_atomically

    config = _config(args.config)
    n_experts = config["routing"]["n_experts"]
    if args.round == 0:
        em.assign_random_round(args.block, n_experts, config["seed"], args.out)
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


def cmd_train(args: argparse.Namespace) -> int:
    from smalltalk.config import model_config, train_config
    from smalltalk.em import assigned_seq_ids
    from smalltalk.train import fit

    config = _config(args.config)
    role = args.role
    model = model_config(
        config, "router" if role == "router" else "expert", vocab_size=_vocab_size(args.tokenizer)
    )
    seq_ids, prefix_len, first_round = None, None, True
    if role == "router":
        if args.assignment is None or args.round is None:
            raise ValueError("a router needs --round and --assignment")
        routing = config["routing"]
        seq_ids = assigned_seq_ids(args.assignment, args.index)
        if len(seq_ids) == 0:
            raise ValueError(f"{args.assignment} assigns no sequence to router {args.index}")
        # M tokens give the M-1 predictions the router is scored on (Eq. 9).
        prefix_len = routing["prefix_len"] - 1 if routing["train_on"] == "prefix" else None
        steps = routing["steps_per_round"]
        first_round = args.round <= 1
        seed_offset = 1000 * args.round + args.index
    else:
        steps = args.steps or config["training"]["expert"].get("steps")
        if steps is None:
            raise ValueError("training.expert.steps is not set")
        seed_offset = 100_000 + (args.index or 0)
    training = train_config(
        config,
        role,
        steps=steps,
        seed_offset=seed_offset,
        first_round=first_round,
        threads=args.threads,
    )
    if role == "dense":
        # Equal training FLOPs (§3.1): as many tokens as all E experts together.
        n_experts = config["routing"]["n_experts"]
        if config["training"]["dense_scale"] == "batch":
            training = dataclasses.replace(training, batch_size=training.batch_size * n_experts)
        else:
            training = dataclasses.replace(training, steps=training.steps * n_experts)
    fit(
        model,
        training,
        args.data,
        args.out_dir,
        role=role,
        init_from=args.init,
        seq_ids=seq_ids,
        prefix_len=prefix_len,
        weights_path=args.weights,
        val_files=args.val or None,
        val_every=config["eval"]["every"],
        val_sequences=config["eval"]["val_sequences"],
    )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from smalltalk.config import model_config
    from smalltalk.em import load_model, score_file

    config = _config(args.config)
    _torch_threads(args.threads)
    if len(args.tokens) != len(args.out):
        raise ValueError("give one --out per --tokens")
    model = load_model(
        model_config(config, "router", vocab_size=_vocab_size(args.tokenizer)), args.weights
    )
    for tokens, out in zip(args.tokens, args.out, strict=True):
        score_file(model, tokens, config["routing"]["prefix_len"], out)
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from smalltalk.config import model_config
    from smalltalk.shard import shard_chunk

    config = _config(args.config)
    _torch_threads(args.threads)
    loads = shard_chunk(
        tokens_path=args.tokens,
        router_config=model_config(config, "router", vocab_size=_vocab_size(args.tokenizer)),
        router_weights=args.routers,
        prefix_len=config["routing"]["prefix_len"],
        shard_paths=args.shards,
        scores_path=args.scores,
    )
    log.info("%s: sequences per expert %s", args.tokens, loads.tolist())
    return 0


def cmd_check_shards(args: argparse.Namespace) -> int:
    from smalltalk.shard import check_shards

    config = _config(args.config)
    report = check_shards(
        train_files=args.train,
        shard_files=args.shards,
        n_experts=config["routing"]["n_experts"],
        out=args.out,
    )
    print(json.dumps(report, indent=2))
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    import duckdb

    from smalltalk.shard import communication_ledger

    config = _config(args.config)
    table = communication_ledger(
        assignment_paths=args.assignments,
        shard_score_paths=args.shard_scores,
        n_experts=config["routing"]["n_experts"],
        out=args.out,
    )
    duckdb.from_arrow(table).show(max_width=200)
    return 0


def cmd_route_validation(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from smalltalk.config import model_config
    from smalltalk.em import gather_rows
    from smalltalk.evaluate import route_sequences, split_by_expert

    config = _config(args.config)
    _torch_threads(args.threads)
    # The pool: the first eval.val_sequences validation rows; the dense model is validated on all
    # of it, each expert on the part routed to it, so the mixture's curve is comparable.
    pool_ids = []
    for path in args.val:
        ids = pq.read_table(path, columns=["seq_id"]).column("seq_id").to_pylist()
        pool_ids += ids[: config["eval"]["val_sequences"] - len(pool_ids)]
    gather_rows(args.val, dict.fromkeys(pool_ids, 0), [args.pool])
    route_sequences(
        tokens_path=args.pool,
        router_config=model_config(config, "router", vocab_size=_vocab_size(args.tokenizer)),
        router_weights=args.routers,
        prefix_len=config["routing"]["prefix_len"],
        out=args.routing,
    )
    split_by_expert([args.pool], args.routing, args.experts)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from smalltalk.config import eval_prefix_lens, model_config
    from smalltalk.evaluate import evaluate_chunk

    config = _config(args.config)
    _torch_threads(args.threads)
    vocab_size = _vocab_size(args.tokenizer)
    evaluation = config["eval"]
    evaluate_chunk(
        tokens_path=args.tokens,
        router_config=model_config(config, "router", vocab_size=vocab_size),
        router_weights=args.routers,
        expert_config=model_config(config, "expert", vocab_size=vocab_size),
        expert_weights=args.experts,
        dense_weights=args.dense,
        prefix_lens=eval_prefix_lens(config),
        train_prefix_len=config["routing"]["prefix_len"],
        topk=min(evaluation["topk"], config["routing"]["n_experts"]),
        temperature=evaluation["temperature"],
        batch_size=evaluation["batch_size"],
        out=args.out,
    )
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    import duckdb

    from smalltalk.evaluate import aggregate

    tables = aggregate(args.eval, args.out_dir)
    duckdb.from_arrow(tables["overall"]).show(max_width=200)
    return 0


def cmd_ledger_flops(args: argparse.Namespace) -> int:
    import duckdb

    from smalltalk.config import model_config
    from smalltalk.ledger import flops_ledger, paper_table3_table

    config = _config(args.config)
    vocab_size = _vocab_size(args.tokenizer)
    table = flops_ledger(
        router_config=model_config(config, "router", vocab_size=vocab_size),
        expert_config=model_config(config, "expert", vocab_size=vocab_size),
        router_summaries=args.router_summaries,
        em_score_files=args.em_scores,
        shard_score_files=args.shard_scores,
        expert_summaries=args.expert_summaries,
        dense_summary=args.dense_summary,
        n_experts=config["routing"]["n_experts"],
        prefix_len=config["routing"]["prefix_len"],
        out=args.out,
    )
    paper_table3_table(args.paper_out)
    duckdb.from_arrow(table).show(max_width=200)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from smalltalk import plots  # matplotlib only here: other commands do without it

    figure = args.figure
    if figure == "perplexity_vs_flops":
        plots.perplexity_vs_flops(args.experts, args.dense, args.out)
    elif figure == "expert_load":
        plots.expert_load(args.check, args.load, args.out, prefix_len=args.prefix_len)
    elif figure == "segment_perplexity":
        plots.segment_perplexity(args.per_segment, args.prefix_len, args.out)
    elif figure == "prefix_sensitivity":
        plots.prefix_sensitivity(args.overall, args.out, train_prefix_len=args.prefix_len)
    elif figure == "em_convergence":
        plots.em_convergence(args.diagnostics, args.out)
    elif figure == "segment_source":
        plots.segment_source_heatmap(args.segment_source, args.out, prefix_len=args.prefix_len)
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    from smalltalk import plots

    tables = {}
    for item in args.table:
        title, _, path = item.partition("=")
        if not path:
            raise ValueError(f"--table expects TITLE=PATH, got {item!r}")
        tables[title] = path
    plots.tables_html(tables, args.out)
    return 0


def cmd_concat(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from smalltalk.files import write_parquet_atomically

    tables = [pq.read_table(path) for path in args.inputs]
    write_parquet_atomically(pa.concat_tables(tables, promote_options="default"), args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smalltalk",
        description="SmallTalk LM: train and use an asynchronous mixture of language models. "
        "Each command is one stage of the Snakemake workflow and runs on its own.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    def add_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config", type=Path, required=True, help="workflow config YAML (e.g. config.yaml)"
        )

    def add_threads(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")

    sub = add("check-config", cmd_check_config, "validate a config file and report every problem")
    add_config(sub)
    sub.add_argument("--print", action="store_true", help="print the config with defaults")

    sub = add("chunks", cmd_chunks, "list the input chunks (JSON lines: chunk, files)")
    add_config(sub)

    sub = add("train-tokenizer", cmd_train_tokenizer, "train the SentencePiece tokenizer")
    add_config(sub)
    sub.add_argument("--out", type=Path, required=True, help="the .model file to write")
    sub.add_argument(
        "files", nargs="*", help="input files to sample (default: every file of the inputs)"
    )
    add_threads(sub)

    sub = add(
        "tokenize",
        cmd_tokenize,
        "tokenize one chunk into tokens/{split}/{chunk}.parquet and a stats file",
    )
    add_config(sub)
    sub.add_argument("--chunk", required=True, help="chunk name, e.g. c00003")
    sub.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model")
    sub.add_argument("--out-dir", type=Path, required=True, help="the tokens/ directory")
    sub.add_argument("--stats", type=Path, help="stats JSON (default: OUT_DIR/stats/CHUNK.json)")
    sub.add_argument(
        "files", nargs="*", type=Path, help="the chunk's files (default: from the input plan)"
    )
    add_threads(sub)

    sub = add("flops", cmd_flops, "FLOPs of the model presets, or the paper's Table 3")
    sub.add_argument(
        "--paper", action="store_true", help="recompute the paper's Table 3 from Tables 1-2"
    )
    sub.add_argument("presets", nargs="*", help="preset names (default: all)")

    sub = add("em-sample", cmd_em_sample, "draw the EM blocks and the probe set (Algorithm 1)")
    add_config(sub)
    sub.add_argument("--train", nargs="+", required=True, help="train token files to sample")
    sub.add_argument("--val", nargs="+", required=True, help="validation token files (probe)")
    sub.add_argument("--blocks", nargs="+", required=True, help="block files, rounds 0..T")
    sub.add_argument("--probe", required=True, help="the probe file")

    sub = add("assign", cmd_assign, "an EM round's assignment (random in round 0) and diagnostics")
    add_config(sub)
    sub.add_argument("--round", type=int, required=True, help="EM round r")
    sub.add_argument("--block", required=True, help="the round's block of sequences")
    sub.add_argument("--scores", nargs="*", default=[], help="the E routers' scores (r >= 1)")
    sub.add_argument("--probe", help="the probe set")
    sub.add_argument("--probe-scores", nargs="*", default=[], help="probe scores of round r")
    sub.add_argument(
        "--previous-probe-scores", nargs="*", default=[], help="probe scores of round r-1"
    )
    sub.add_argument("--out", required=True, help="the assignment to write")
    sub.add_argument("--diagnostics", required=True, help="the diagnostics row to write")
    sub.add_argument("--contingency", required=True, help="segment x source counts to write")

    sub = add("train", cmd_train, "train one router, expert or the dense baseline")
    add_config(sub)
    sub.add_argument("--role", choices=["router", "expert", "dense"], required=True)
    sub.add_argument("--index", type=int, default=0, help="router or expert index e")
    sub.add_argument("--round", type=int, help="EM round r (routers)")
    sub.add_argument("--assignment", help="the previous round's assignment (routers)")
    sub.add_argument("--init", help="weights to start from (a router's previous round)")
    sub.add_argument("--steps", type=int, help="optimizer steps (default: from the config)")
    sub.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model (V)")
    sub.add_argument("--out-dir", required=True, help="metrics, checkpoints and summary")
    sub.add_argument("--weights", help="final weights (default: OUT_DIR/model.safetensors)")
    sub.add_argument("--val", nargs="*", default=[], help="validation token files (curves)")
    sub.add_argument("data", nargs="+", help="token Parquet files or directories")
    add_threads(sub)

    sub = add("score", cmd_score, "score sequence prefixes with one router (float16 NLL)")
    add_config(sub)
    sub.add_argument("--weights", required=True, help="router weights")
    sub.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model (V)")
    sub.add_argument("--tokens", action="append", required=True, help="token file (repeatable)")
    sub.add_argument("--out", action="append", required=True, help="scores file, one per --tokens")
    add_threads(sub)

    sub = add("shard", cmd_shard, "route one train chunk with all routers into expert shards")
    add_config(sub)
    sub.add_argument("--tokens", required=True, help="the chunk's train token file")
    sub.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model (V)")
    sub.add_argument("--routers", nargs="+", required=True, help="final router weights, e order")
    sub.add_argument("--shards", nargs="+", required=True, help="shard files, e order")
    sub.add_argument("--scores", required=True, help="the chunk's scores and assignment")
    add_threads(sub)

    sub = add("check-shards", cmd_check_shards, "prove each train sequence is in one shard")
    add_config(sub)
    sub.add_argument("--train", nargs="+", required=True, help="train token files")
    sub.add_argument("--shards", nargs="+", required=True, help="shard files")
    sub.add_argument("--out", required=True, help="the check report (JSON)")

    sub = add("ledger", cmd_ledger, "bytes of scores exchanged, next to the paper's App. A.4")
    add_config(sub)
    sub.add_argument("--assignments", nargs="+", required=True, help="EM assignments, r order")
    sub.add_argument("--shard-scores", nargs="+", required=True, help="per-chunk shard scores")
    sub.add_argument("--out", required=True, help="the ledger (Parquet)")

    sub = add(
        "route-validation",
        cmd_route_validation,
        "route a validation pool with the final routers and split it per expert",
    )
    add_config(sub)
    sub.add_argument("--val", nargs="+", required=True, help="validation token files")
    sub.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model (V)")
    sub.add_argument("--routers", nargs="+", required=True, help="final router weights, e order")
    sub.add_argument("--routing", required=True, help="seq_id -> expert (Parquet) to write")
    sub.add_argument("--pool", required=True, help="the validation pool to write")
    sub.add_argument("--experts", nargs="+", required=True, help="per-expert files, e order")
    add_threads(sub)

    sub = add("evaluate", cmd_evaluate, "route and score one test chunk (per-sequence rows)")
    add_config(sub)
    sub.add_argument("--tokens", required=True, help="the chunk's test token file")
    sub.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model (V)")
    sub.add_argument("--routers", nargs="+", required=True, help="final router weights, e order")
    sub.add_argument("--experts", nargs="+", required=True, help="expert weights, e order")
    sub.add_argument("--dense", required=True, help="dense baseline weights")
    sub.add_argument("--out", required=True, help="per-sequence rows (Parquet)")
    add_threads(sub)

    sub = add("aggregate", cmd_aggregate, "perplexity tables from the per-sequence rows")
    sub.add_argument("--out-dir", required=True, help="where the summary tables go")
    sub.add_argument("eval", nargs="+", help="per-sequence evaluation files")

    sub = add("ledger-flops", cmd_ledger_flops, "the run's FLOPs (Eq. 10-16) and the paper's")
    add_config(sub)
    sub.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model (V)")
    sub.add_argument("--router-summaries", nargs="+", required=True, help="router summary.json")
    sub.add_argument("--em-scores", nargs="+", required=True, help="EM score files")
    sub.add_argument("--shard-scores", nargs="+", required=True, help="per-chunk shard scores")
    sub.add_argument("--expert-summaries", nargs="+", required=True, help="expert summary.json")
    sub.add_argument("--dense-summary", required=True, help="dense summary.json")
    sub.add_argument("--out", required=True, help="the run's FLOPs ledger (Parquet)")
    sub.add_argument("--paper-out", required=True, help="the paper's Table 3 (Parquet)")

    sub = add("plot", cmd_plot, "draw one report figure (PNG)")
    sub.add_argument(
        "figure",
        choices=[
            "perplexity_vs_flops",
            "expert_load",
            "segment_perplexity",
            "prefix_sensitivity",
            "em_convergence",
            "segment_source",
        ],
    )
    sub.add_argument("--out", required=True, help="the PNG to write")
    sub.add_argument("--experts", nargs="+", help="experts' metrics.parquet (perplexity_vs_flops)")
    sub.add_argument("--dense", help="the dense model's metrics.parquet (perplexity_vs_flops)")
    sub.add_argument("--check", help="segmentation/check.json (expert_load)")
    sub.add_argument("--load", help="eval/summary/load.parquet (expert_load)")
    sub.add_argument("--per-segment", help="eval/summary/per_segment.parquet")
    sub.add_argument("--overall", help="eval/summary/overall.parquet (prefix_sensitivity)")
    sub.add_argument("--diagnostics", help="routers/diagnostics.parquet (em_convergence)")
    sub.add_argument("--segment-source", help="eval/summary/segment_source.parquet")
    sub.add_argument("--prefix-len", type=int, help="the routing prefix M to show")

    sub = add("tables", cmd_tables, "render Parquet tables as one HTML fragment")
    sub.add_argument("--out", required=True, help="the HTML file to write")
    sub.add_argument("--table", action="append", required=True, help="TITLE=PATH (repeatable)")

    sub = add("concat", cmd_concat, "concatenate Parquet tables (per-round diagnostics)")
    sub.add_argument("--out", required=True, help="the Parquet file to write")
    sub.add_argument("inputs", nargs="+", help="Parquet files")

    sub = add("summarize-tokens", cmd_summarize_tokens, "total the per-chunk stats per split")
    sub.add_argument("--out", type=Path, required=True, help="the TSV to write")
    sub.add_argument("stats", nargs="+", type=Path, help="per-chunk stats JSON files")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from smalltalk.config import ConfigError
    from smalltalk.data import BadRecordError

    try:
        return args.handler(args)
    except (ConfigError, BadRecordError, FileNotFoundError, ValueError) as error:
        log.debug("details", exc_info=True)
        print(f"smalltalk {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
