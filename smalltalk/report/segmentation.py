"""How the data is segmented and routed: EM's convergence, each segment's sources, the load
per expert.

Inputs are the EM diagnostics and contingency tables (`routers/`), `routers/final/em.json`, the
shard check JSON and the evaluation's `load` and `segment_source` aggregates.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.ticker import FixedLocator, MaxNLocator, PercentFormatter

from smalltalk.report.columns import read_columns, read_concatenated, rows_where, select_rows
from smalltalk.report.style import (
    MIXTURE,
    TEST,
    TRAIN,
    PathLike,
    new_figure,
    no_data,
    percent,
    save,
    styled,
)


def em_convergence(
    diagnostics: PathLike | Sequence[PathLike], out: PathLike, em: PathLike | None = None
) -> Path:
    """Four panels over EM rounds (Algorithm 1): NMI of segments against sources, the share of
    validation probe sequences whose argmin expert changed, the mean routed prefix NLL, and the
    largest expert's load under the balanced assignment and under argmin routing. With `em`
    (routers/final/em.json) a line marks the round that ended EM and the title says why."""
    rows = read_concatenated(diagnostics, ["round", "nmi_source"])
    rows = select_rows(rows, np.argsort(rows["round"], kind="stable"))
    rounds = rows["round"].astype(int)
    n_experts = sum(name.startswith("load_e") for name in rows)

    def column(name: str) -> np.ndarray:
        return rows[name].astype(float) if name in rows else np.full(len(rounds), np.nan)

    def draw(ax, name: str, label: str, color: str, linestyle: str = "-", marker: str = "o"):
        values = column(name)
        ok = np.isfinite(values)
        if ok.any():
            ax.plot(rounds[ok], values[ok], label=label, color=color, ls=linestyle, marker=marker)
        return ok.any()

    with styled():
        fig = new_figure(9.0, 6.2)
        axes = fig.subplots(2, 2, sharex=True)
        (nmi, changed), (nll, load) = axes

        draw(nmi, "nmi_source", "EM block, balanced assignment", MIXTURE)
        draw(nmi, "probe_nmi_source", "validation probe, argmin routing", TEST, "--", "s")
        nmi.set_ylim(0, 1.02)
        nmi.set_ylabel("NMI(segment; source)")
        nmi.set_title("Segments vs data sources")
        nmi.legend(loc="best")

        if draw(changed, "probe_changed", "probe sequences", MIXTURE):
            percent(changed)
            changed.set_ylim(bottom=0)
        else:
            no_data(changed, "needs two rounds with probe scores")
        changed.set_ylabel("changed expert since last round")
        changed.set_title("Routing stability (validation probe)")

        if not draw(nll, "mean_routed_nll", "EM block", MIXTURE):
            no_data(nll, "no router scores yet (round 0 is random)")
        nll.set_ylabel("NLL (nats per token)")
        nll.set_title("Mean prefix NLL of the chosen router")

        draw(load, "max_load", "balanced assignment", MIXTURE)
        draw(load, "argmin_max_load", "argmin routing (no capacity)", TEST, "--", "s")
        if n_experts:
            load.axhline(1.0 / n_experts, color="0.25", ls=":", lw=1.2, label="even, 1/E")
        percent(load)
        busiest = np.r_[column("max_load"), column("argmin_max_load"), 1.0 / max(n_experts, 1)]
        busiest = busiest[np.isfinite(busiest)]
        load.set_ylim(0, min(1.0, 1.2 * max(busiest.max() if len(busiest) else 1.0, 0.05)))
        load.set_ylabel("largest expert's share")
        load.set_title("Load of the busiest expert (EM block)")
        load.legend(loc="best")

        for ax in (nll, load):
            ax.set_xlabel("EM round")
        for ax in axes.flat:
            if len(set(rounds.tolist())) <= 20:
                ax.xaxis.set_major_locator(FixedLocator(sorted(set(rounds.tolist()))))
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if len(rounds):
                ax.set_xlim(rounds.min() - 0.5, rounds.max() + 0.5)
        title = f"EM convergence of the routers (Algorithm 1, E = {n_experts or '?'})"
        if em is not None:
            ended = json.loads(Path(em).read_text())
            for ax in axes.flat:
                ax.axvline(ended["final_round"], color="0.25", ls="--", lw=1.0)
            why = f"ended after round {ended['final_round']}: {ended['reason']}"
            title += "\n" + textwrap.fill(why, 80)
        fig.suptitle(title)
        return save(fig, out)


def segment_source_heatmap(
    contingency_or_segment_source: PathLike,
    out: PathLike,
    *,
    em_round: int | None = None,
    prefix_len: int | None = None,
) -> Path:
    """Where each segment's sequences come from: segment x source counts, each row normalised
    to shares. Reads an EM contingency table (column `round`; None: the last round) or the
    evaluation's `segment_source` (column `prefix_len`; None: the largest)."""
    path = contingency_or_segment_source
    rows = read_columns(path, ["expert", "source", "sequences"])
    if "round" in rows:
        rows, em_round = rows_where(rows, "round", em_round, path)
        where = f"train sequences of EM round {em_round}, balanced assignment"
    elif "prefix_len" in rows:
        rows, prefix_len = rows_where(rows, "prefix_len", prefix_len, path)
        where = f"test sequences, argmin routing at M\u0302 = {prefix_len}"
    else:
        where = "sequences"
    sources = sorted({"(none)" if s is None else str(s) for s in rows["source"]})
    n_experts = int(rows["expert"].max()) + 1 if len(rows["expert"]) else 0
    counts = np.zeros((n_experts, len(sources)))
    column = {source: j for j, source in enumerate(sources)}
    for e, s, n in zip(rows["expert"], rows["source"], rows["sequences"], strict=True):
        counts[int(e), column["(none)" if s is None else str(s)]] += n
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    with styled():
        fig = new_figure(max(6.0, 0.85 * len(sources) + 3.5), max(3.4, 0.42 * n_experts + 2.0))
        ax = fig.add_subplot()
        image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
        ax.grid(False)
        detailed = n_experts * len(sources) <= 120
        for (e, j), value in np.ndenumerate(shares):
            text = f"{value:.0%}"
            if detailed:
                text += f"\n{int(counts[e, j]):,}"
            ax.text(
                j,
                e,
                text,
                ha="center",
                va="center",
                fontsize=7 if detailed else 6,
                color="white" if value > 0.55 else "0.15",
            )
        ax.set_xticks(range(len(sources)), sources, rotation=30, ha="right")
        ax.set_yticks(
            range(n_experts), [f"{e}  (n={int(totals[e, 0]):,})" for e in range(n_experts)]
        )
        ax.set_xlabel("data source")
        ax.set_ylabel("segment = expert e")
        colorbar = fig.colorbar(image, ax=ax, pad=0.01)
        colorbar.set_label("share of the segment's sequences")
        colorbar.formatter = PercentFormatter(1.0, decimals=0)
        colorbar.update_ticks()
        ax.set_title(
            f"Source mix of each segment\n{where}"
            + ("; cells: share and count" if detailed else "")
        )
        return save(fig, out)


def expert_load(
    train_check_json: PathLike,
    eval_load: PathLike,
    out: PathLike,
    *,
    prefix_len: int | None = None,
) -> Path:
    """Share of sequences per expert: train shards (balanced assignment, the shard check's counts)
    next to test sequences under argmin routing at prefix `prefix_len` (None: the largest)."""
    counts = json.loads(Path(train_check_json).read_text())["sequences_per_expert"]
    train = {int(e): int(n) for e, n in counts.items()}
    load, prefix_len = rows_where(
        read_columns(eval_load, ["prefix_len", "expert", "sequences"]),
        "prefix_len",
        prefix_len,
        eval_load,
    )
    test: dict[int, int] = {}
    for e, n in zip(load["expert"].tolist(), load["sequences"].tolist(), strict=True):
        test[int(e)] = test.get(int(e), 0) + int(n)
    n_experts = max([*train, *test]) + 1
    experts = np.arange(n_experts)
    train_n = np.array([train.get(e, 0) for e in experts], dtype=float)
    test_n = np.array([test.get(e, 0) for e in experts], dtype=float)
    train_share = train_n / max(train_n.sum(), 1.0)
    test_share = test_n / max(test_n.sum(), 1.0)
    with styled():
        fig = new_figure(max(6.0, 0.45 * n_experts + 3.0), 4.4)
        ax = fig.add_subplot()
        width = 0.4
        bars = [
            ax.bar(
                experts - width / 2,
                train_share,
                width,
                color=TRAIN,
                label=f"train shards, balanced assignment ({int(train_n.sum()):,} sequences)",
            ),
            ax.bar(
                experts + width / 2,
                test_share,
                width,
                color=TEST,
                label=f"test, argmin routing at M\u0302 = {prefix_len} "
                f"({int(test_n.sum()):,} sequences)",
            ),
        ]
        ax.axhline(1.0 / n_experts, color="0.25", linestyle=":", linewidth=1.2, label="even, 1/E")
        if n_experts <= 12:
            for group in bars:
                ax.bar_label(group, labels=[f"{b.get_height():.0%}" for b in group], fontsize=8)
        ax.set_xticks(experts)
        ax.set_xlabel("expert e (segment)")
        ax.set_ylabel("share of sequences")
        percent(ax)
        ax.set_ylim(0, max(train_share.max(), test_share.max(), 1.0 / n_experts) * 1.15)
        ax.set_title(f"Load per expert: train shards vs test routing (E = {n_experts})")
        fig.legend(loc="outside lower center", ncols=1)
        return save(fig, out)
