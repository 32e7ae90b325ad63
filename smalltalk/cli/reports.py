"""Reports (rules/report.smk, benchmarks): figures, HTML tables, FLOPs of the presets,
comparisons of finished runs and the robustness table. matplotlib is imported by these only."""

from __future__ import annotations

import argparse
from pathlib import Path

from smalltalk.cli.inputs import named_runs
from smalltalk.cli.printing import show_table
from smalltalk.cli.registry import arg, command, expert_list


@command(
    "flops",
    "FLOPs of the model presets, or the paper's Table 3",
    arg("--paper", action="store_true", help="recompute the paper's Table 3 from Tables 1-2"),
    arg("presets", nargs="*", help="preset names (default: all)"),
)
def flops(args: argparse.Namespace) -> int:
    import torch

    import smalltalk.flops
    from smalltalk.config import PRESETS, ModelConfig
    from smalltalk.model import LM

    if args.paper:
        print(smalltalk.flops.format_paper_table3())
        return 0
    for name in args.presets or sorted(PRESETS):
        config = ModelConfig.from_preset(name)
        with torch.device("meta"):  # counts parameters without allocating them
            parameters = LM(config).num_parameters()
        per_sequence = smalltalk.flops.inference_flops(config, config.seq_len)
        print(
            f"{name:12} {parameters / 1e6:9.2f}M params  L={config.n_layer:<3} d={config.n_embd:<5}"
            f" V={config.vocab_size:<6} S={config.seq_len:<5}"
            f" {per_sequence / 1e9:10.3f} GFLOPs inference per sequence"
        )
    return 0


@command(
    "compare",
    "compare finished runs at equal training FLOPs",
    arg(
        "--run",
        action="append",
        required=True,
        help="NAME=RESULTS_DIR of a finished run; seeds of one recipe are named RECIPE@SEED",
    ),
    arg("--out", required=True, help="the comparison table (.parquet)"),
    arg(
        "--split",
        choices=["test", "val"],
        default="test",
        help="test (results) or val (choosing settings; needs RESULTS_DIR/eval/val/summary/)",
    ),
    arg(
        "--experts",
        type=expert_list,
        help="the runs served with these experts only, e.g. 0,2 (needs RESULTS_DIR/eval/SPLIT/"
        "subsets/0-2/summary/: snakemake builds it from the run's evaluation, no model re-run)",
    ),
    arg("--seeds", help="mean and spread of each RECIPE's ratios over seeds"),
    arg("--markdown", help="the rows at M-hat = M as a Markdown table"),
    arg(
        "--stamp",
        action="store_true",
        help="head the Markdown with the command, commit, processor, precision and date",
    ),
    arg("--figure", help="the comparison figure (.png)"),
    arg("--html", help="the table as an HTML fragment for the report"),
)
def compare(args: argparse.Namespace) -> int:
    import smalltalk.compare
    from smalltalk.files import write_parquet_atomically
    from smalltalk.report.tables import tables_html

    runs = named_runs(args.run, "compare")
    table = smalltalk.compare.compare_runs(runs, args.out, split=args.split, experts=args.experts)
    html_tables = {f"Routing methods at equal training FLOPs ({args.split} split)": args.out}
    if args.seeds:
        write_parquet_atomically(smalltalk.compare.seed_summary(table), args.seeds)
        html_tables["Mixture/dense perplexity ratio over seeds (runs RECIPE@SEED)"] = args.seeds
    if args.markdown:
        head = None
        if args.stamp:
            import shlex

            from smalltalk.provenance import stamp

            command = shlex.join(["smalltalk", *args.argv])
            head = f"Made by `{command}`.\n{stamp(runs.values())}\n"
        smalltalk.compare.markdown(table, args.markdown, head=head)
    if args.figure:
        smalltalk.compare.comparison_figure(args.out, runs, args.figure)
    if args.html:
        tables_html(html_tables, args.html)
    show_table(table, max_width=250, max_rows=200)
    return 0


@command(
    "robustness",
    "tabulate the robustness benchmark's runs",
    arg("--run", action="append", required=True, help="CORPUS/RECIPE@SEED=RESULTS_DIR"),
    arg("--json", required=True, help="results.json: one object per run"),
    arg("--markdown", required=True, help="results.md: the runs and seed spreads"),
    arg("--command", required=True, help="the command that reproduces them"),
)
def robustness(args: argparse.Namespace) -> int:
    from smalltalk.robustness import write_results

    write_results(named_runs(args.run, "robustness"), args.json, args.markdown, args.command)
    print(Path(args.markdown).read_text())
    return 0


# The flags each figure reads, as {its drawing function's parameter: the flag}; every figure
# (`smalltalk.report.FIGURES`) also writes --out.
PLOT_FLAGS = {
    "perplexity_vs_flops": {
        "expert_metrics": "experts",
        "dense_metrics": "dense",
        "baseline_metrics": "baselines",
        "ledger": "ledger",
        "overall": "overall",
    },
    "expert_load": {"train_check_json": "check", "eval_load": "load", "prefix_len": "prefix_len"},
    "segment_perplexity": {"per_segment": "per_segment", "prefix_len": "prefix_len"},
    "prefix_sensitivity": {"overall": "overall", "train_prefix_len": "prefix_len"},
    "em_convergence": {"diagnostics": "diagnostics", "em": "em"},
    "segment_source": {
        "contingency_or_segment_source": "segment_source",
        "prefix_len": "prefix_len",
    },
}


@command(
    "plot",
    "draw one report figure (PNG)",
    arg("figure", choices=list(PLOT_FLAGS)),
    arg("--out", required=True, help="the PNG to write"),
    arg("--experts", nargs="+", help="experts' metrics.parquet (perplexity_vs_flops)"),
    arg("--dense", help="the dense model's metrics.parquet (perplexity_vs_flops)"),
    arg(
        "--baselines",
        nargs="*",
        default=[],
        help="NAME=metrics.parquet of each dense baseline on the mixture's budget",
    ),
    arg("--ledger", help="ledger/flops.parquet: what the routers spent (perplexity_vs_flops)"),
    arg("--check", help="segmentation/check.json (expert_load)"),
    arg("--load", help="eval/summary/load.parquet (expert_load)"),
    arg("--per-segment", help="eval/summary/per_segment.parquet"),
    arg("--overall", help="eval/summary/overall.parquet (prefix_sensitivity)"),
    arg("--diagnostics", help="routers/diagnostics.parquet (em_convergence)"),
    arg("--em", help="routers/final/em.json: where and why EM ended (em_convergence)"),
    arg("--segment-source", help="eval/summary/segment_source.parquet"),
    arg("--prefix-len", type=int, help="the routing prefix M to show"),
)
def plot(args: argparse.Namespace) -> int:
    from smalltalk.report import FIGURES  # matplotlib only here: other commands do without it

    flags = PLOT_FLAGS[args.figure]
    FIGURES[args.figure](
        out=args.out, **{parameter: getattr(args, flag) for parameter, flag in flags.items()}
    )
    return 0


@command(
    "tables",
    "render Parquet tables as one HTML fragment",
    arg("--out", required=True, help="the HTML file to write"),
    arg("--table", action="append", required=True, help="TITLE=PATH (repeatable)"),
)
def tables(args: argparse.Namespace) -> int:
    from smalltalk.report.tables import tables_html

    titled = {}
    for item in args.table:
        title, _, path = item.partition("=")
        if not path:
            raise ValueError(f"--table expects TITLE=PATH, got {item!r}")
        titled[title] = path
    tables_html(titled, args.out)
    return 0


@command(
    "concat",
    "concatenate Parquet tables (per-round diagnostics)",
    arg("--out", required=True, help="the Parquet file to write"),
    arg("inputs", nargs="+", help="Parquet files"),
)
def concat(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from smalltalk.files import write_parquet_atomically

    parts = [pq.read_table(path) for path in args.inputs]
    write_parquet_atomically(pa.concat_tables(parts, promote_options="default"), args.out)
    return 0
