"""`smalltalk <command>`: one subcommand per workflow stage, each usable without Snakemake.

Flags carry only a job's identity and files; every tunable lives in the config file,
so a rule, a test and a user run the same code path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

from smalltalk import __version__

log = logging.getLogger("smalltalk")

ROUTERS_HELP = "the final router weights in e order, or the baseline router's .npz"


def _config(path: Path) -> dict:
    from smalltalk.config import load_config

    return load_config(path)


def _router(config: dict, args: argparse.Namespace, keep_loaded: bool = False):
    """The run's routing method (`routing.method`) from `--routers` and `--tokenizer`."""
    from smalltalk.config import model_config
    from smalltalk.routers import load_router

    method = config["routing"]["method"]
    return load_router(
        method=method,
        paths=args.routers,
        router_config=model_config(config, "router", vocab_size=_vocab_size(args.tokenizer))
        if method == "smalltalk"
        else None,
        tokenizer_model=args.tokenizer,
        keep_loaded=keep_loaded,
    )


def cmd_check_config(args: argparse.Namespace) -> int:
    from smalltalk.config import load_config

    config = load_config(*args.config)
    if args.print:
        import yaml

        sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
    else:
        print(f"{' + '.join(map(str, args.config))}: valid")
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
    from smalltalk.data import (
        Chunk,
        parse_chunk_name,
        plan_chunks,
        plan_grown_chunks,
        tokenize_chunk,
    )

    config = _config(args.config)
    data = DataConfig.from_config(config)
    grown, index = parse_chunk_name(args.chunk)
    if grown is not None:  # a grown corpus: its documents are named after its own patterns
        if grown >= len(config["grow"]):
            raise SystemExit(f"smalltalk tokenize: no grow entry {grown} for chunk {args.chunk}")
        data = dataclasses.replace(data, inputs=tuple(config["grow"][grown]["inputs"]))
    if args.files:
        chunk = Chunk(index=index, name=args.chunk, files=tuple(str(f) for f in args.files))
    else:
        planned = (
            plan_chunks(data.inputs, data.files_per_chunk)
            if grown is None
            else plan_grown_chunks(grown, data.inputs, data.files_per_chunk)
        )
        plan = {c.name: c for c in planned}
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
    from smalltalk.config import PRESETS, ModelConfig
    from smalltalk.model import LM

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


def cmd_em_final(args: argparse.Namespace) -> int:
    from smalltalk.em import finish_em

    routing = _config(args.config)["routing"]
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


def cmd_train(args: argparse.Namespace) -> int:
    from smalltalk.plan import plan_job
    from smalltalk.train import fit

    config = _config(args.config)
    plan = plan_job(
        config,
        args.role,
        args.index,
        vocab_size=_vocab_size(args.tokenizer),
        em_round=args.round,
        assignment=args.assignment,
        em_summary=args.em_summary,
        data=args.data,
        steps=args.steps,
        threads=args.threads,
    )
    role = args.role
    fit(
        plan.model,
        plan.training,
        args.data,
        args.out_dir,
        role=role,
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


def cmd_score(args: argparse.Namespace) -> int:
    from smalltalk.checkpoint import load_model
    from smalltalk.config import model_config
    from smalltalk.em import score_file

    if args.weights is None:  # texts under a trained mixture
        return cmd_score_texts(args)
    needed = {
        "--config": args.config,
        "--tokenizer": args.tokenizer,
        "--tokens": args.tokens,
        "--out": args.out,
    }
    if missing := [flag for flag, value in needed.items() if not value]:
        raise ValueError(f"scoring with --weights also needs {', '.join(missing)}")
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


def cmd_fit_router(args: argparse.Namespace) -> int:
    from smalltalk.routers import fit_baseline

    config = _config(args.config)
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


def cmd_shard(args: argparse.Namespace) -> int:
    from smalltalk.shard import shard_chunk

    config = _config(args.config)
    _torch_threads(args.threads)
    loads = shard_chunk(
        tokens_path=args.tokens,
        router=_router(config, args, keep_loaded=True),
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

    from smalltalk.ledger import communication_ledger

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

    from smalltalk.evaluate import route_sequences, split_by_expert
    from smalltalk.tokens import gather_rows

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
        router=_router(config, args),
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
        router=_router(config, args),
        expert_config=model_config(config, "expert", vocab_size=vocab_size),
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


def cmd_route_part(args: argparse.Namespace) -> int:
    from smalltalk.config import eval_prefix_lens
    from smalltalk.evaluate import route_part

    config = _config(args.config)
    _torch_threads(args.threads)
    route_part(
        tokens_paths=args.tokens,
        router=_router(config, args),
        prefix_lens=eval_prefix_lens(config),
        out=args.out,
    )
    return 0


def cmd_score_part(args: argparse.Namespace) -> int:
    from smalltalk.config import model_config
    from smalltalk.evaluate import score_part

    config = _config(args.config)
    _torch_threads(args.threads)
    score_part(
        tokens_paths=args.tokens,
        model_config=model_config(config, "expert", vocab_size=_vocab_size(args.tokenizer)),
        weights=args.weights,
        train_prefix_len=config["routing"]["prefix_len"],
        batch_size=config["eval"]["batch_size"],
        out=args.out,
    )
    return 0


def cmd_merge_part(args: argparse.Namespace) -> int:
    from smalltalk.evaluate import merge_part

    evaluation = _config(args.config)["eval"]
    merge_part(
        tokens_paths=args.tokens,
        routes=args.routes,
        expert_scores=args.expert_scores,
        dense_scores=args.dense_scores,
        topk=evaluation["topk"],
        temperature=evaluation["temperature"],
        experts=args.experts,
        out=args.out,
    )
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from smalltalk.config import model_config
    from smalltalk.grow import capture_chunk
    from smalltalk.routers import LMRouters

    config = _config(args.config)
    _torch_threads(args.threads)
    router = LMRouters(
        model_config(config, "router", vocab_size=_vocab_size(args.tokenizer)),
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


def cmd_grow_summary(args: argparse.Namespace) -> int:
    import duckdb

    from smalltalk.grow import grow_summary, markdown

    config = _config(args.config)
    table = grow_summary(
        after=args.after,
        before=args.before,
        n_experts=config["routing"]["n_experts"],
        names=[entry["name"] for entry in config["grow"]],
        prefix_len=config["routing"]["prefix_len"],
        out=args.out,
    )
    if args.markdown:
        markdown(table, args.markdown)
    duckdb.from_arrow(table).show(max_width=200)
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
        routing_method=config["routing"]["method"],
    )
    paper_table3_table(args.paper_out)
    duckdb.from_arrow(table).show(max_width=200)
    return 0


def _named_runs(specs: list[str], command: str) -> dict[str, str]:
    """--run NAME=RESULTS_DIR arguments as {name: folder}."""
    runs = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"smalltalk {command}: --run wants NAME=RESULTS_DIR, got {spec!r}")
        runs[name] = folder
    return runs


def cmd_compare(args: argparse.Namespace) -> int:
    import duckdb

    from smalltalk import compare
    from smalltalk.files import write_parquet_atomically
    from smalltalk.report.tables import tables_html

    runs = _named_runs(args.run, "compare")
    table = compare.compare_runs(runs, args.out, split=args.split, experts=args.experts)
    html_tables = {f"Routing methods at equal training FLOPs ({args.split} split)": args.out}
    if args.seeds:
        write_parquet_atomically(compare.seed_summary(table), args.seeds)
        html_tables["Mixture/dense perplexity ratio over seeds (runs RECIPE@SEED)"] = args.seeds
    if args.markdown:
        compare.markdown(table, args.markdown)
    if args.figure:
        compare.comparison_figure(args.out, runs, args.figure)
    if args.html:
        tables_html(html_tables, args.html)
    duckdb.from_arrow(table).show(max_width=250, max_rows=200)
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    from smalltalk.robustness import write_results

    write_results(_named_runs(args.run, "robustness"), args.json, args.markdown, args.command)
    print(Path(args.markdown).read_text())
    return 0


# `smalltalk plot FIGURE`: the flags each figure reads, as {its drawing function's parameter:
# the flag}; every figure also takes --out.
PLOT_FLAGS = {
    "perplexity_vs_flops": {"expert_metrics": "experts", "dense_metrics": "dense"},
    "expert_load": {"train_check_json": "check", "eval_load": "load", "prefix_len": "prefix_len"},
    "segment_perplexity": {"per_segment": "per_segment", "prefix_len": "prefix_len"},
    "prefix_sensitivity": {"overall": "overall", "train_prefix_len": "prefix_len"},
    "em_convergence": {"diagnostics": "diagnostics", "em": "em"},
    "segment_source": {
        "contingency_or_segment_source": "segment_source",
        "prefix_len": "prefix_len",
    },
}


def add_plot_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("figure", choices=list(PLOT_FLAGS))
    sub.add_argument("--out", required=True, help="the PNG to write")
    sub.add_argument("--experts", nargs="+", help="experts' metrics.parquet (perplexity_vs_flops)")
    sub.add_argument("--dense", help="the dense model's metrics.parquet (perplexity_vs_flops)")
    sub.add_argument("--check", help="segmentation/check.json (expert_load)")
    sub.add_argument("--load", help="eval/summary/load.parquet (expert_load)")
    sub.add_argument("--per-segment", help="eval/summary/per_segment.parquet")
    sub.add_argument("--overall", help="eval/summary/overall.parquet (prefix_sensitivity)")
    sub.add_argument("--diagnostics", help="routers/diagnostics.parquet (em_convergence)")
    sub.add_argument("--em", help="routers/final/em.json: where and why EM ended (em_convergence)")
    sub.add_argument("--segment-source", help="eval/summary/segment_source.parquet")
    sub.add_argument("--prefix-len", type=int, help="the routing prefix M to show")


def cmd_plot(args: argparse.Namespace) -> int:
    from smalltalk.report import FIGURES  # matplotlib only here: other commands do without it

    flags = PLOT_FLAGS[args.figure]
    FIGURES[args.figure](
        out=args.out, **{parameter: getattr(args, flag) for parameter, flag in flags.items()}
    )
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    from smalltalk.report.tables import tables_html

    tables = {}
    for item in args.table:
        title, _, path = item.partition("=")
        if not path:
            raise ValueError(f"--table expects TITLE=PATH, got {item!r}")
        tables[title] = path
    tables_html(tables, args.out)
    return 0


def cmd_concat(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from smalltalk.files import write_parquet_atomically

    tables = [pq.read_table(path) for path in args.inputs]
    write_parquet_atomically(pa.concat_tables(tables, promote_options="default"), args.out)
    return 0


# ---- using a trained mixture: route, score, generate, explain, lm-eval ----------------------


def _texts(args: argparse.Namespace) -> list[str]:
    from smalltalk.serve.texts import read_texts

    return read_texts(args.texts, args.file)


def _mixture(args: argparse.Namespace):
    from smalltalk.serve import load

    _torch_threads(args.threads)
    return load(
        args.results,
        experts=args.experts,
        **({} if args.max_experts is None else {"max_experts": args.max_experts}),
    )


def cmd_route(args: argparse.Namespace) -> int:
    from smalltalk.serve.format import json_line, routing_line

    mixture, texts = _mixture(args), _texts(args)
    for text, routing in zip(texts, mixture.route(texts, args.prefix_tokens), strict=True):
        if args.json:
            print(json_line({"text": text, **routing.as_dict()}))
        else:
            print(routing_line(text, routing))
    return 0


def cmd_score_texts(args: argparse.Namespace) -> int:
    from smalltalk.serve.format import json_line, score_line

    mixture, texts = _mixture(args), _texts(args)
    scores = mixture.score(texts, args.prefix_tokens, args.topk, dense=args.dense)
    for text, score in zip(texts, scores, strict=True):
        if args.json:
            print(json_line({"text": text, **score.as_dict()}))
        else:
            print(score_line(text, score))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from smalltalk.serve.format import json_line

    mixture = _mixture(args)
    for prompt in _texts(args):
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
            experts = ",".join(map(str, generation.experts)) or "dense"
            log.info(
                "expert %s, %d tokens (%s)", experts, len(generation.tokens), generation.stopped
            )
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from smalltalk.serve.analysis import explain
    from smalltalk.serve.format import explanation_lines, json_line

    mixture = _mixture(args)
    for text in _texts(args):
        explanation = explain(mixture, text, args.prefix_tokens)
        if args.json:
            print(json_line({"text": text, **explanation}))
        else:
            print(explanation_lines(text, explanation, mixture.prefix_len))
    return 0


def cmd_harness_task(args: argparse.Namespace) -> int:
    from smalltalk.harness import build_choice_task

    config = _config(args.config)
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


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from smalltalk.files import write_parquet_atomically, write_text_atomically
    from smalltalk.harness import run_lm_eval
    from smalltalk.serve.format import json_line, lm_eval_line

    _torch_threads(args.threads)
    table, raw = run_lm_eval(
        args.results,
        args.tasks,
        models=args.models,
        limit=args.limit,
        include_paths=args.include_path,
        topk=args.topk,
        experts=args.experts,
        **({} if args.max_experts is None else {"max_experts": args.max_experts}),
    )
    if args.out:
        write_parquet_atomically(table, args.out)
    if args.raw:
        write_text_atomically(json.dumps(raw, indent=2, default=str) + "\n", args.raw)
    for row in table.to_pylist():
        print(json_line(row) if args.json else lm_eval_line(row))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from smalltalk.export import export_mixture

    manifest = export_mixture(
        args.results, args.out, experts=args.experts, dense=args.dense, force=args.force
    )
    experts = ",".join(map(str, manifest["experts"]))
    dense = " and the dense baseline" if manifest["dense"] else ""
    log.info(
        "exported experts %s%s to %s (%d files)", experts, dense, args.out, len(manifest["files"])
    )
    return 0


def _int_at_least(low: int):
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _expert_list(text: str) -> list[int]:
    """An argparse type: expert indices separated by commas, e.g. 0,2 (checked on loading)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a list of expert indices: {text!r} (write them as 0,2)"
        ) from None


EXPERTS_HELP = "serve only these experts, e.g. 0,2, retiring the others (default: all)"


def _temperature(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


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
        sub.add_argument(
            "--threads", type=_int_at_least(1), default=1, help="CPU threads (default: 1)"
        )

    def add_serving(sub: argparse.ArgumentParser, texts: str = "texts") -> None:
        sub.add_argument("texts", nargs="*", help=f"{texts} (default: --file, else stdin)")
        sub.add_argument(
            "--file", help=f"{texts}, one per line or JSON lines with a 'text' field (-: stdin)"
        )
        sub.add_argument(
            "--results", default="results", help="the trained results directory, or an export"
        )
        sub.add_argument("--experts", type=_expert_list, help=EXPERTS_HELP)
        sub.add_argument(
            "--max-experts",
            type=_int_at_least(1),
            help="experts kept in memory, the least recently used dropped first (default: 2)",
        )
        sub.add_argument(
            "--prefix-tokens", type=int, help="route on this many tokens, M-hat (default: M)"
        )
        sub.add_argument("--json", action="store_true", help="one JSON object per line")
        add_threads(sub)

    def add_topk(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--topk",
            type=_int_at_least(1),
            default=1,
            help="mix the top k experts by router score (c-BTM)",
        )
        sub.add_argument(
            "--dense", action="store_true", help="the dense baseline instead, for comparison"
        )

    sub = add("check-config", cmd_check_config, "validate a config file and report every problem")
    sub.add_argument(
        "--config",
        type=Path,
        nargs="+",
        required=True,
        help="workflow config YAML, then overlays merged on top in order (as --configfile)",
    )
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
    sub.add_argument(
        "--tokenizer", help="SentencePiece model (round 0 with routing.init tfidf_kmeans)"
    )
    sub.add_argument("--scores", nargs="*", default=[], help="the E routers' scores (r >= 1)")
    sub.add_argument("--probe", help="the probe set")
    sub.add_argument("--probe-scores", nargs="*", default=[], help="probe scores of round r")
    sub.add_argument(
        "--previous-probe-scores", nargs="*", default=[], help="probe scores of round r-1"
    )
    sub.add_argument("--out", required=True, help="the assignment to write")
    sub.add_argument("--diagnostics", required=True, help="the diagnostics row to write")
    sub.add_argument("--contingency", required=True, help="segment x source counts to write")

    sub = add(
        "em-final",
        cmd_em_final,
        "check that EM ends after the last round given (routing.stop), copy its routers to "
        "their fixed place and record why it ended",
    )
    add_config(sub)
    sub.add_argument(
        "--diagnostics", nargs="+", required=True, help="diagnostics of rounds 1..r, in order"
    )
    sub.add_argument("--routers", nargs="+", required=True, help="the E routers of round r")
    sub.add_argument("--out-routers", nargs="+", required=True, help="where to copy them")
    sub.add_argument("--summary", required=True, help="the JSON to write: final round, reason")

    sub = add("train", cmd_train, "train one router, expert or the dense baseline")
    add_config(sub)
    sub.add_argument("--role", choices=["router", "expert", "dense"], required=True)
    sub.add_argument("--index", type=int, default=0, help="router or expert index e")
    sub.add_argument("--round", type=int, help="EM round r (routers)")
    sub.add_argument("--assignment", help="the previous round's assignment (routers)")
    sub.add_argument(
        "--em-summary",
        help="a grown router (index >= E): EM's em.json, which tells how long EM routers trained",
    )
    sub.add_argument("--init", help="weights to start from (a router's previous round)")
    sub.add_argument("--steps", type=int, help="optimizer steps (default: from the config)")
    sub.add_argument(
        "--branch-from",
        help="a checkpoint directory to go on from (weights, optimizer, step): BTM's branch point",
    )
    sub.add_argument(
        "--stop-at", type=int, help="end after this step, leaving a checkpoint to branch from"
    )
    sub.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model (V)")
    sub.add_argument("--out-dir", required=True, help="metrics, checkpoints and summary")
    sub.add_argument("--weights", help="final weights (default: OUT_DIR/model.safetensors)")
    sub.add_argument("--val", nargs="*", default=[], help="validation token files (curves)")
    sub.add_argument("data", nargs="+", help="token Parquet files or directories")
    add_threads(sub)

    sub = add(
        "score",
        cmd_score,
        "score texts under their routed expert (--results); as an EM stage, score token files' "
        "prefixes with one router (--weights, float16 NLL)",
    )
    sub.add_argument("--config", type=Path, help="workflow config YAML (with --weights)")
    sub.add_argument("--weights", help="router weights: the EM stage")
    sub.add_argument("--tokenizer", type=Path, help="SentencePiece .model (V) (with --weights)")
    sub.add_argument("--tokens", action="append", help="token file (repeatable, with --weights)")
    sub.add_argument("--out", action="append", help="scores file, one per --tokens")
    add_serving(sub)
    add_topk(sub)

    sub = add("fit-router", cmd_fit_router, "fit a baseline router (routing.method) on a sample")
    add_config(sub)
    sub.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    sub.add_argument("--out", required=True, help="the fitted router (.npz)")
    sub.add_argument("sample", nargs="+", help="token files to fit on (the EM blocks)")

    sub = add("shard", cmd_shard, "route one train chunk with all routers into expert shards")
    add_config(sub)
    sub.add_argument("--tokens", required=True, help="the chunk's train token file")
    sub.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model (V)")
    sub.add_argument("--routers", nargs="+", required=True, help=ROUTERS_HELP)
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
    sub.add_argument("--routers", nargs="+", required=True, help=ROUTERS_HELP)
    sub.add_argument("--routing", required=True, help="seq_id -> expert (Parquet) to write")
    sub.add_argument("--pool", required=True, help="the validation pool to write")
    sub.add_argument("--experts", nargs="+", required=True, help="per-expert files, e order")
    add_threads(sub)

    sub = add("evaluate", cmd_evaluate, "route and score one test chunk (per-sequence rows)")
    add_config(sub)
    sub.add_argument("--tokens", required=True, help="the chunk's test token file")
    sub.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model (V)")
    sub.add_argument("--routers", nargs="+", required=True, help=ROUTERS_HELP)
    sub.add_argument("--experts", nargs="+", required=True, help="expert weights, e order")
    sub.add_argument("--dense", required=True, help="dense baseline weights")
    sub.add_argument("--out", required=True, help="per-sequence rows (Parquet)")
    add_threads(sub)

    sub = add("route-part", cmd_route_part, "one router's prefix costs of token files, every M̂")
    add_config(sub)
    sub.add_argument("--tokens", nargs="+", required=True, help="token files, read in order")
    sub.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model (V)")
    sub.add_argument("--routers", nargs="+", required=True, help=ROUTERS_HELP)
    sub.add_argument("--out", required=True, help="the costs (Parquet)")
    add_threads(sub)

    sub = add("score-part", cmd_score_part, "one model's NLLs of every sequence of token files")
    add_config(sub)
    sub.add_argument("--tokens", nargs="+", required=True, help="token files, read in order")
    sub.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model (V)")
    sub.add_argument("--weights", required=True, help="an expert's or the dense model's weights")
    sub.add_argument("--out", required=True, help="the scores (Parquet)")
    add_threads(sub)

    sub = add("merge-part", cmd_merge_part, "per-sequence rows from routes and scores")
    add_config(sub)
    sub.add_argument("--tokens", nargs="+", required=True, help="the token files (ids, sources)")
    sub.add_argument("--routes", nargs="+", required=True, help="route-part files, expert order")
    sub.add_argument("--expert-scores", nargs="+", required=True, help="score-part files, e order")
    sub.add_argument("--dense-scores", required=True, help="the dense model's score-part file")
    sub.add_argument(
        "--experts",
        type=_expert_list,
        default=None,
        help="keep these experts only, e.g. 0,1,2 (the mixture before it grew); default: all",
    )
    sub.add_argument("--out", required=True, help="per-sequence rows (Parquet)")

    sub = add("capture", cmd_capture, "train sequences of the run a grown router would take")
    add_config(sub)
    sub.add_argument("--tokens", required=True, help="a train chunk of the run's corpus")
    sub.add_argument("--shard-scores", required=True, help="its scores by the run's routers")
    sub.add_argument("--router", required=True, help="the grown router's weights")
    sub.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model (V)")
    sub.add_argument("--out", required=True, help="the rows it takes (token Parquet)")
    add_threads(sub)

    sub = add("grow-summary", cmd_grow_summary, "the mixture after growing against before")
    add_config(sub)
    sub.add_argument("--after", nargs="+", required=True, help="merge-part rows, all experts")
    sub.add_argument("--before", nargs="+", required=True, help="the rows of the first E only")
    sub.add_argument("--out", required=True, help="the table (Parquet)")
    sub.add_argument("--markdown", help="the table as Markdown too")

    sub = add("aggregate", cmd_aggregate, "perplexity tables from the per-sequence rows")
    sub.add_argument("--out-dir", required=True, help="where the summary tables go")
    sub.add_argument("eval", nargs="+", help="per-sequence evaluation files")

    sub = add("ledger-flops", cmd_ledger_flops, "the run's FLOPs (Eq. 10-16) and the paper's")
    add_config(sub)
    sub.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model (V)")
    sub.add_argument("--router-summaries", nargs="*", default=[], help="router summary.json")
    sub.add_argument("--em-scores", nargs="*", default=[], help="EM score files")
    sub.add_argument("--shard-scores", nargs="+", required=True, help="per-chunk shard scores")
    sub.add_argument("--expert-summaries", nargs="+", required=True, help="expert summary.json")
    sub.add_argument("--dense-summary", required=True, help="dense summary.json")
    sub.add_argument("--out", required=True, help="the run's FLOPs ledger (Parquet)")
    sub.add_argument("--paper-out", required=True, help="the paper's Table 3 (Parquet)")

    sub = add("compare", cmd_compare, "compare finished runs at equal training FLOPs")
    sub.add_argument(
        "--run",
        action="append",
        required=True,
        help="NAME=RESULTS_DIR of a finished run; seeds of one recipe are named RECIPE@SEED",
    )
    sub.add_argument("--out", required=True, help="the comparison table (.parquet)")
    sub.add_argument(
        "--split",
        choices=["test", "val"],
        default="test",
        help="test (results) or val (choosing settings; needs RESULTS_DIR/eval/val/summary/)",
    )
    sub.add_argument(
        "--experts",
        type=_expert_list,
        help="the runs served with these experts only, e.g. 0,2 (needs RESULTS_DIR/eval/SPLIT/"
        "subsets/0-2/summary/: snakemake builds it from the run's evaluation, no model re-run)",
    )
    sub.add_argument("--seeds", help="mean and spread of each RECIPE's ratios over seeds")
    sub.add_argument("--markdown", help="the rows at M-hat = M as a Markdown table")
    sub.add_argument("--figure", help="the comparison figure (.png)")
    sub.add_argument("--html", help="the table as an HTML fragment for the report")

    sub = add("robustness", cmd_robustness, "tabulate the robustness benchmark's runs")
    sub.add_argument("--run", action="append", required=True, help="CORPUS/RECIPE@SEED=RESULTS_DIR")
    sub.add_argument("--json", required=True, help="results.json: one object per run")
    sub.add_argument("--markdown", required=True, help="results.md: the runs and seed spreads")
    sub.add_argument("--command", required=True, help="the command that reproduces them")

    sub = add("plot", cmd_plot, "draw one report figure (PNG)")
    add_plot_arguments(sub)

    sub = add("tables", cmd_tables, "render Parquet tables as one HTML fragment")
    sub.add_argument("--out", required=True, help="the HTML file to write")
    sub.add_argument("--table", action="append", required=True, help="TITLE=PATH (repeatable)")

    sub = add("concat", cmd_concat, "concatenate Parquet tables (per-round diagnostics)")
    sub.add_argument("--out", required=True, help="the Parquet file to write")
    sub.add_argument("inputs", nargs="+", help="Parquet files")

    sub = add("summarize-tokens", cmd_summarize_tokens, "total the per-chunk stats per split")
    sub.add_argument("--out", type=Path, required=True, help="the TSV to write")
    sub.add_argument("stats", nargs="+", type=Path, help="per-chunk stats JSON files")

    sub = add("route", cmd_route, "route texts: the chosen expert and every router's prefix NLL")
    add_serving(sub)

    sub = add("generate", cmd_generate, "continue prompts with their routed expert (KV cache)")
    add_serving(sub, texts="prompts")
    add_topk(sub)
    sub.add_argument(
        "--max-new-tokens",
        type=_int_at_least(1),
        default=64,
        help="at most (default: 64; up to 65536)",
    )
    sub.add_argument(
        "--temperature", type=_temperature, default=1.0, help="0: greedy (default: 1.0)"
    )
    sub.add_argument(
        "--top-k", type=_int_at_least(1), help="sample from the k likeliest tokens only"
    )
    sub.add_argument("--seed", type=int, help="sampling seed (reproducible output)")
    sub.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")

    sub = add(
        "explain",
        cmd_explain,
        "each router's prefix NLL for a text, beside each segment's sources and typical tokens",
    )
    add_serving(sub)

    sub = add(
        "harness-task",
        cmd_harness_task,
        "build the offline continuation-choice task for lm-eval from the test split",
    )
    add_config(sub)
    sub.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model")
    sub.add_argument("--out-dir", required=True, help="where the task's JSON lines and YAML go")
    sub.add_argument("tokens", nargs="+", help="test token files")

    sub = add(
        "export",
        cmd_export,
        "write a trained mixture as one self-contained folder: tokenizer, routers, experts in "
        "the Hugging Face layout, config, evaluation tables and a model card",
    )
    sub.add_argument(
        "--results", default="results", help="the trained results directory, or an export"
    )
    sub.add_argument("--out", required=True, help="the folder to write (built beside it)")
    sub.add_argument("--experts", type=_expert_list, help="export only these experts, e.g. 0,2")
    sub.add_argument("--dense", action="store_true", help="include the dense baseline's weights")
    sub.add_argument(
        "--force", action="store_true", help="replace --out if it exists and is not empty"
    )

    sub = add("lm-eval", cmd_lm_eval, "run lm-evaluation-harness tasks on the mixture, offline")
    sub.add_argument(
        "--results", default="results", help="the trained results directory, or an export"
    )
    sub.add_argument("--experts", type=_expert_list, help=EXPERTS_HELP)
    sub.add_argument(
        "--tasks", nargs="+", default=["continuation_choice"], help="lm-eval task names"
    )
    sub.add_argument(
        "--models",
        nargs="+",
        choices=["mixture", "dense"],
        default=["mixture"],
        help="the routed mixture and/or the dense baseline (default: mixture)",
    )
    sub.add_argument("--limit", type=_int_at_least(1), help="at most this many examples per task")
    sub.add_argument(
        "--include-path",
        action="append",
        default=[],
        help="more task directories (their YAML may run Python from there: name only trusted ones)",
    )
    sub.add_argument(
        "--max-experts", type=_int_at_least(1), help="experts kept in memory (default: 2)"
    )
    sub.add_argument(
        "--topk", type=_int_at_least(1), default=1, help="mix the top k experts (c-BTM)"
    )
    sub.add_argument("--out", help="the scores table to write (Parquet)")
    sub.add_argument("--raw", help="lm-eval's results to write (JSON)")
    sub.add_argument("--json", action="store_true", help="print one JSON object per score")
    add_threads(sub)
    return parser


def _message(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"  # as ls and cp say it, with no [Errno 28]
    return str(error)


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
    except (ConfigError, BadRecordError, OSError, ValueError) as error:
        log.debug("details", exc_info=True)
        print(f"smalltalk {args.command}: error: {_message(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
