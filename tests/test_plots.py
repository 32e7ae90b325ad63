"""Report figures and tables: each writes a readable PNG (or HTML), byte-identical on a rerun."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("matplotlib")

from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from smalltalk import report  # noqa: E402
from smalltalk.report import segmentation  # noqa: E402

E = 4
SOURCES = ["arxiv", "book", "c4", "github", "wikipedia"]
PREFIX_LENS = [8, 16, 32]


def write(path: Path, data: dict | list, schema: pa.Schema | None = None) -> Path:
    """Columns ({name: values}) or rows ([{name: value}]) as a Parquet file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, list):
        table = pa.Table.from_pylist(data, schema=schema)
    else:
        table = pa.table(data, schema=schema)
    pq.write_table(table, path)
    return path


def metrics(path: Path, *, scale: float, floor: float, batch_flops: float, val: bool) -> Path:
    """A training log: a row every 50 steps, a validation pass every 200 (nulls between)."""
    steps = np.arange(50, 1001, 50)
    loss = floor + 4.0 * np.exp(-steps / 180.0) * scale
    val_due = steps % 200 == 0
    columns = {
        "step": steps,
        "tokens": steps * 4096,
        "loss": loss,
        "lr": np.full(len(steps), 1e-3),
        "grad_norm": np.full(len(steps), 0.5),
        "tokens_per_s": np.full(len(steps), 1e5),
        "flops": steps * batch_flops,
        "seconds": steps * 0.1,
    }
    if val:
        columns["val_loss"] = pa.array(
            [float(v) + 0.05 if due else None for v, due in zip(loss, val_due, strict=True)],
            pa.float64(),
        )
        columns["val_tokens"] = pa.array(
            [int(2000 * (1 + scale)) if due else None for due in val_due], pa.int64()
        )
    return write(path, columns)


def make_inputs(root: Path, *, val: bool = True) -> dict:
    """Small synthetic versions of every file the figures read."""
    rng = np.random.default_rng(0)
    experts = [
        metrics(
            root / f"experts/{e}/metrics.parquet",
            scale=1 + 0.1 * e,
            floor=2.9 + 0.05 * e,
            batch_flops=3e12,
            val=val,
        )
        for e in range(E)
    ]
    dense = metrics(
        root / "dense/metrics.parquet", scale=1.0, floor=3.1, batch_flops=E * 3e12, val=val
    )
    check = root / "shards/check.json"
    check.parent.mkdir(parents=True, exist_ok=True)
    check.write_text(
        json.dumps(
            {"ok": True, "sequences_per_expert": {"0": 2500, "1": 2500, "2": 2499, "3": 2498}}
        )
    )
    load_rows, seg_rows, overall_rows, source_rows = [], [], [], []
    for m in PREFIX_LENS:
        weights = rng.dirichlet(np.full(E, 8.0))
        counts = np.round(weights * 1000).astype(int)
        for e in range(E):
            load_rows.append({"prefix_len": m, "expert": e, "sequences": int(counts[e])})
            dense_ppl = 24.0 + 3 * e
            seg_rows.append(
                {
                    "prefix_len": m,
                    "expert": e,
                    "sequences": int(counts[e]),
                    "share": float(counts[e] / counts.sum()),
                    "ppl_expert": dense_ppl * (0.88 + 0.02 * e + 0.1 / m),
                    "ppl_dense": dense_ppl,
                }
            )
            for j, source in enumerate(SOURCES):
                n = int(rng.integers(0, 60) + (200 if j == e else 0))
                source_rows.append({"prefix_len": m, "expert": e, "source": source, "sequences": n})
        overall_rows.append(
            {
                "prefix_len": m,
                "ppl_mixture": 25.0 + 16.0 / m,
                "ppl_dense": 27.4,
                "ppl_oracle": 22.0,
                "ppl_topk": 25.3 + 8.0 / m,
                "ppl_mixture_full": 25.5 + 16.0 / m,
                "ppl_dense_full": 27.9,
                "gain": (25.0 + 16.0 / m) / 27.4 - 1,
                "sequences": 1000,
                "tokens": 128000,
                "ratio": (25.0 + 16.0 / m) / 27.4,
                "ratio_ci_low": (24.5 + 16.0 / m) / 27.4,
                "ratio_ci_high": (25.5 + 16.0 / m) / 27.4,
                "ratio_topk": (25.3 + 8.0 / m) / 27.4,
                "ratio_topk_ci_low": (25.0 + 8.0 / m) / 27.4,
                "ratio_topk_ci_high": (25.6 + 8.0 / m) / 27.4,
            }
        )
    rounds = 5
    diag_rows, contingency_rows = [], []
    for r in range(rounds):
        row = {
            "round": r,
            "sequences": 4096,
            "nmi_source": 0.02 + 0.5 * (1 - math.exp(-r)),
            "max_load": 0.25 + 0.0005 * r,
            "mean_routed_nll": math.nan if r == 0 else 4.0 - 0.3 * r,
            "argmin_max_load": math.nan if r == 0 else 0.45 - 0.04 * r,
            "probe_nmi_source": math.nan if r == 0 else 0.5 * (1 - math.exp(-r)),
            "probe_changed": math.nan if r < 2 else 0.4 * math.exp(-(r - 2)),
        }
        for e in range(E):
            row[f"load_e{e}"] = 0.25
        diag_rows.append(row)
        for e in range(E):
            for j, source in enumerate(SOURCES):
                contingency_rows.append(
                    {
                        "round": r,
                        "expert": e,
                        "source": source,
                        "sequences": int(rng.integers(5, 40) + 60 * r * (j == e)),
                    }
                )
    summary = root / "eval/summary"
    contingency_schema = pa.schema(
        [
            ("round", pa.int32()),
            ("expert", pa.int64()),
            ("source", pa.string()),
            ("sequences", pa.int64()),
        ]
    )
    ledger = write(
        root / "ledger/communication.parquet",
        {
            "scope": ["this run", "this run", "paper App. A.4"],
            "stage": ["EM round 1", "total", "EM, E=4: 3 exchanges"],
            "sequences": pa.array([4096, None, 131836], pa.int64()),
            "routers": [4, 4, 4],
            "bytes": [32768.0, 98304.0, 3164064.0],
            "megabytes": [0.032768, 0.098304, 3.164064],
            "note": ["all routers", "all routers", "per router; 1.055 MB per exchange"],
        },
    )
    flops_ledger = write(
        root / "ledger/flops.parquet",
        {
            "phase": ["training", "training"],
            "component": ["experts (Eq. 15)", "dense baseline (Eq. 10)"],
            "flops": [1.2345e16, 1.2e16],
            "relative_to_dense": [1.02875, 1.0],
        },
    )
    return {
        "experts": experts,
        "dense": dense,
        "check": check,
        "load": write(summary / "load.parquet", load_rows),
        "per_segment": write(summary / "per_segment.parquet", seg_rows),
        "overall": write(summary / "overall.parquet", overall_rows),
        "segment_source": write(summary / "segment_source.parquet", source_rows),
        "diagnostics": write(root / "routers/diagnostics.parquet", diag_rows),
        "contingency": write(
            root / "routers/contingency.parquet",
            contingency_rows,
            contingency_schema,
        ),
        "ledger": ledger,
        "flops_ledger": flops_ledger,
    }


def render_all(inputs: dict, out_dir: Path) -> dict[str, Path]:
    """Every figure, written to out_dir/<name>.png."""
    return {
        "perplexity_vs_flops": report.perplexity_vs_flops(
            inputs["experts"], inputs["dense"], out_dir / "perplexity_vs_flops.png"
        ),
        "expert_load": report.expert_load(
            inputs["check"], inputs["load"], out_dir / "expert_load.png", prefix_len=32
        ),
        "segment_perplexity": report.segment_perplexity(
            inputs["per_segment"], 32, out_dir / "segment_perplexity.png"
        ),
        "prefix_sensitivity": report.prefix_sensitivity(
            inputs["overall"], out_dir / "prefix_sensitivity.png", train_prefix_len=32
        ),
        "em_convergence": report.em_convergence(
            inputs["diagnostics"], out_dir / "em_convergence.png"
        ),
        "segment_source": report.segment_source_heatmap(
            inputs["segment_source"], out_dir / "segment_source.png", prefix_len=32
        ),
        "em_segment_source": report.segment_source_heatmap(
            inputs["contingency"], out_dir / "em_segment_source.png"
        ),
    }


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    height, width = image.shape[:2]
    assert width >= 600 and height >= 400
    assert image[..., :3].std() > 0.05  # something is drawn on the white background
    assert not list(path.parent.glob(".*.tmp-*"))  # the temporary file was renamed away


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def test_every_figure_writes_a_png(inputs, tmp_path):
    written = render_all(inputs, tmp_path)
    assert set(report.FIGURES) <= set(written)
    for path in written.values():
        assert_png(path)


def test_figures_are_byte_identical_on_rerun(inputs, tmp_path):
    first = render_all(inputs, tmp_path / "a")
    second = render_all(inputs, tmp_path / "b")
    for name, path in first.items():
        assert path.read_bytes() == second[name].read_bytes(), name


def test_the_plot_command_passes_each_figure_the_inputs_it_takes():
    from smalltalk.cli import build_parser
    from smalltalk.cli.reports import PLOT_FLAGS

    assert list(PLOT_FLAGS) == list(report.FIGURES)
    plot = build_parser().parse_args(["plot", "em_convergence", "--out", "x.png"])
    for name, flags in PLOT_FLAGS.items():
        parameters = inspect.signature(report.FIGURES[name]).parameters
        required = {p for p, v in parameters.items() if v.default is inspect.Parameter.empty}
        assert set(flags) <= set(parameters) and required <= {*flags, "out"}, name
        assert all(hasattr(plot, flag) for flag in flags.values()), name


def test_prefix_sensitivity_draws_the_intervals_the_aggregate_has(inputs, tmp_path):
    overall = pq.read_table(inputs["overall"])
    bare = write(tmp_path / "bare.parquet", overall.drop_columns(["ratio_ci_low"]).to_pylist())
    with_bars = imread(report.prefix_sensitivity(inputs["overall"], tmp_path / "bars.png"))
    without = imread(report.prefix_sensitivity(bare, tmp_path / "bare.png"))

    def mixture_pixels(image):
        return (np.abs(image[..., :3] - to_rgb(report.MIXTURE)).sum(axis=-1) < 0.05).sum()

    assert mixture_pixels(with_bars) > mixture_pixels(without)


def test_mixture_curve_by_hand(tmp_path):
    # Two experts validated at steps 200, ..., 1000 with different validation set sizes.
    paths = [
        metrics(tmp_path / f"{e}.parquet", scale=1 + e, floor=3.0, batch_flops=1e12, val=True)
        for e in range(2)
    ]
    curve = report.loss_curve(paths)
    assert curve.validation
    assert curve.steps.tolist() == [200, 400, 600, 800, 1000]
    runs = [pq.read_table(path).to_pydict() for path in paths]
    at = runs[0]["step"].index(600)
    tokens = [run["val_tokens"][at] for run in runs]
    nll = sum(t * run["val_loss"][at] for t, run in zip(tokens, runs, strict=True)) / sum(tokens)
    assert curve.perplexity[2] == pytest.approx(math.exp(nll))
    assert curve.flops[2] == pytest.approx(2 * 600 * 1e12)


def test_missing_validation_falls_back_to_training_loss(tmp_path):
    inputs = make_inputs(tmp_path / "in", val=False)
    curve = report.loss_curve(inputs["experts"])
    assert not curve.validation
    assert len(curve.steps) == 20  # every logged step
    runs = [pq.read_table(path).to_pydict() for path in inputs["experts"]]
    assert curve.perplexity[0] == pytest.approx(math.exp(np.mean([run["loss"][0] for run in runs])))
    out = report.perplexity_vs_flops(inputs["experts"], inputs["dense"], tmp_path / "f.png")
    assert_png(out)


def test_selection_errors_name_what_is_present(inputs, tmp_path):
    with pytest.raises(ValueError, match="present"):
        report.segment_perplexity(inputs["per_segment"], 99, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_tables_html_holds_the_values(inputs, tmp_path):
    out = report.tables_html(
        {"Communication ledger": inputs["ledger"], "FLOPs ledger": inputs["flops_ledger"]},
        tmp_path / "tables.html",
    )
    text = out.read_text(encoding="ascii")
    assert text.count("<table>") == 2
    for expected in (
        "Communication ledger",
        "FLOPs ledger",
        "EM round 1",
        "4,096",
        "131,836",
        "1.234e+16",
        "1.029",
        "3.164",
        "per router; 1.055 MB per exchange",
        "&#8212;",
    ):  # the missing sequence count
        assert expected in text, expected


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "\u2014"),
        (math.nan, "\u2014"),
        (12345, "12,345"),
        (27.3456, "27.35"),
        (0.5, "0.5"),
        (3.1e19, "3.100e+19"),
        (1234.56, "1,234.6"),
        (0.0, "0"),
        ("c4", "c4"),
    ],
)
def test_format_value(value, text):
    assert report.format_value(value) == text


def test_mixed_validation_compares_training_losses(tmp_path):
    # Experts with validation passes, a dense run without: both curves fall back to training.
    experts = [
        metrics(tmp_path / f"e{e}.parquet", scale=1.0, floor=3.0, batch_flops=1e12, val=True)
        for e in range(2)
    ]
    dense = metrics(tmp_path / "dense.parquet", scale=1.0, floor=3.1, batch_flops=2e12, val=False)
    assert report.loss_curve(experts).validation
    assert not report.loss_curve(experts, validation=False).validation
    assert_png(report.perplexity_vs_flops(experts, dense, tmp_path / "f.png"))


@pytest.mark.parametrize("wildcards", [{}, {"r": "2", "e": "1"}])
def test_report_captions_render(wildcards):
    # Snakemake renders captions with Jinja2 (config, wildcards) and then docutils; strict
    # undefined here catches a misspelt config key that Snakemake would render as empty.
    from types import SimpleNamespace

    from docutils.core import publish_parts
    from jinja2 import Environment, StrictUndefined
    from snakemake.iocontainers import Namedlist

    from smalltalk.config import load_config

    repo = Path(__file__).resolve().parents[1]
    snakemake = SimpleNamespace(
        config=load_config(repo / "config.yaml"), wildcards=Namedlist(fromdict=wildcards)
    )
    env = Environment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
    captions = sorted((repo / "reports").glob("*.rst"))
    assert {path.stem for path in captions} >= {"workflow", "perplexity_vs_flops", "ledger_table"}
    for path in captions:
        text = env.from_string(path.read_text()).render(snakemake=snakemake)
        body = publish_parts(
            text, writer="html", settings_overrides={"halt_level": 2, "report_level": 5}
        )["body"]
        assert "{{" not in body and len(body) > 200, path.name


def test_em_convergence_marks_the_round_that_ended_em_and_why(inputs, tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(segmentation, "save", lambda fig, out: figures.append(fig) or Path(out))
    em = tmp_path / "em.json"
    em.write_text(json.dumps({"final_round": 3, "reason": "stable: fewer than 5.0% changed"}))
    report.em_convergence(inputs["diagnostics"], tmp_path / "em.png", em=em)
    (fig,) = figures
    title = " ".join(fig._suptitle.get_text().split())
    assert "ended after round 3: stable: fewer than 5.0% changed" in title
    for ax in fig.axes:
        assert [3, 3] in [list(line.get_xdata()) for line in ax.get_lines()]
