"""Report figures and tables (design stage 7): the paper's Figs. 2, 4b and 5, expert load, EM.

One pure function per figure: input files in, one PNG out, nothing else touched; the same inputs
give the same bytes (`style`). Inputs are the workflow's own files: `metrics.parquet` of each
training run, the shard check JSON, the evaluation aggregates (`overall`, `per_segment`, `load`,
`segment_source`), the EM diagnostics and contingency tables, and the ledgers.

    training.py      Fig. 2: perplexity vs training FLOPs (and the curves `compare` reads)
    segmentation.py  EM convergence, each segment's sources, load per expert
    evaluation.py    Fig. 5: perplexity per segment; Fig. 4b: perplexity vs prefix length
    tables.py        Parquet tables as one HTML fragment
    style.py         colours, fonts and the PNG writer; columns.py: the Parquet readers
"""

from collections.abc import Callable
from pathlib import Path

from smalltalk.report.evaluation import prefix_sensitivity, segment_perplexity
from smalltalk.report.segmentation import em_convergence, expert_load, segment_source_heatmap
from smalltalk.report.style import DENSE, MIXTURE, ORACLE, TEST, TOPK, TRAIN
from smalltalk.report.tables import format_value, tables_html
from smalltalk.report.training import Curve, loss_curve, perplexity_vs_flops

# `smalltalk plot <figure>` draws these (the flags each one reads are listed in smalltalk.cli).
FIGURES: dict[str, Callable[..., Path]] = {
    "perplexity_vs_flops": perplexity_vs_flops,
    "expert_load": expert_load,
    "segment_perplexity": segment_perplexity,
    "prefix_sensitivity": prefix_sensitivity,
    "em_convergence": em_convergence,
    "segment_source": segment_source_heatmap,
}

__all__ = [
    "DENSE",
    "FIGURES",
    "MIXTURE",
    "ORACLE",
    "TEST",
    "TOPK",
    "TRAIN",
    "Curve",
    "em_convergence",
    "expert_load",
    "format_value",
    "loss_curve",
    "perplexity_vs_flops",
    "prefix_sensitivity",
    "segment_perplexity",
    "segment_source_heatmap",
    "tables_html",
]
