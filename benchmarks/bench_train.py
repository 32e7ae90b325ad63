"""Training throughput of `fit()` against a bare PyTorch loop, and against the matmul peak.

    python benchmarks/bench_train.py [--presets demo-expert router-4.4m] [--precision auto]
                                     [--rounds 8] [--repeats 3] [--steps 4] [--threads N]
                                     [--compile]

For each preset, in one process, one precision, one model and one batch:

- bare:      forward, backward, clip, AdamW step, zero_grad: the least a training step does;
- fit step:  `train_step()` plus the learning-rate schedule, exactly as `fit()` calls them;
- peak:      one 2048³ matmul in the same precision (bf16 operands under bf16), the most this
             processor does; achieved FLOP/s = Eq. 10's count per step / fit-step time;
- fit():     the whole `fit()` loop (data stream from Parquet, metrics, log) for `--steps`,
             timed by its own metrics rows, `--repeats` times, each paired with `--steps` bare
             steps run right after it.

The first three are called in turn, one call each per round for `--rounds` rounds (order rotated),
and per-call times are kept: on a machine other jobs share, each then sees the same share of the
cores, and medians shrug off the bursts when it sees none. Goals: fit step and fit() within 5% of
bare (ratio ≥ 0.95); for demo-expert on CPU, achieved FLOP/s ≥ 35% of the peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from timing import interleaved, timed

from smalltalk.flops import train_step_flops
from smalltalk.model import LM, PRESETS
from smalltalk.train import (
    TrainConfig,
    autocast_context,
    fit,
    learning_rate,
    resolve_precision,
    train_step,
)

# Sequences per step and sequence length: enough work per step to time, few enough seconds on a
# laptop CPU. Table 2 trains the 4.4M router at 32 x 1024; we keep its S = 1024 and V = 32000.
SHAPES = {"demo-expert": (16, 256), "router-4.4m": (2, 1024), "tiny": (16, 64)}


def write_tokens(path: Path, n_rows: int, seq_len: int, vocab_size: int) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab_size, (n_rows, seq_len + 1), dtype=np.uint16)
    offsets = pa.array(np.arange(n_rows + 1, dtype=np.int32) * (seq_len + 1))
    table = pa.table(
        {
            "seq_id": pa.array(np.arange(n_rows, dtype=np.int64)),
            "tokens": pa.ListArray.from_arrays(offsets, pa.array(tokens.ravel())),
            "source": pa.array(["bench"] * n_rows),
        }
    )
    pq.write_table(table, path, row_group_size=256)


def bench_preset(name: str, args, device: torch.device, workdir: Path) -> dict:
    batch, seq_len = SHAPES.get(name, (8, PRESETS[name].seq_len))
    model_config = dataclasses.replace(PRESETS[name], seq_len=seq_len)
    precision = resolve_precision(args.precision, device)
    autocast = autocast_context(device, precision)
    config = TrainConfig(
        steps=args.steps + 1, batch_size=batch, warmup_steps=1, ckpt_every=0, log_every=1,
        precision=precision, device=device.type, threads=args.threads, compile=args.compile,
    )  # fmt: skip
    tokens_per_step = batch * seq_len

    torch.manual_seed(0)
    model = LM(model_config).to(device)
    optimizer = model.configure_optimizer(config.lr, config.weight_decay, config.betas, device.type)
    model = torch.compile(model) if args.compile else model
    inputs = torch.randint(0, model_config.vocab_size, (batch, seq_len), device=device)
    targets = torch.randint(0, model_config.vocab_size, (batch, seq_len), device=device)

    def bare_step():
        with autocast:
            _, loss = model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_index = 0

    def fit_step():
        nonlocal step_index
        lr = learning_rate(step_index % config.steps, config, "cosine", config.steps)
        train_step(
            model, optimizer, [(inputs, targets)], lr=lr, grad_clip=config.grad_clip,
            autocast=autocast,
        )  # fmt: skip
        step_index += 1

    n = 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = interleaved(
        {"bare": bare_step, "fit step": fit_step, "peak": lambda: a @ b}, args.rounds, device
    )

    data = workdir / name
    data.mkdir(exist_ok=True)
    write_tokens(data / "0.parquet", batch * config.steps, seq_len, model_config.vocab_size)
    fit_seconds, fit_ratios = [], []
    for repeat in range(args.repeats):
        out = workdir / f"{name}-fit-{repeat}"
        fit(model_config, config, data, out, role="expert")
        rows = pq.read_table(out / "metrics.parquet").column("tokens_per_s").to_pylist()
        mine = [tokens_per_step / r for r in rows[1:]]  # the first row pays for start-up
        paired = [timed(bare_step, device) for _ in range(args.steps)]
        fit_seconds += mine
        fit_ratios.append(statistics.median(paired) / statistics.median(mine))

    median = {key: statistics.median(values) for key, values in seconds.items()}
    achieved = train_step_flops(model_config, batch, seq_len) / median["fit step"]  # Eq. 10
    return {
        "precision": precision,
        "tokens_per_step": tokens_per_step,
        "bare": tokens_per_step / median["bare"],
        "fit step": tokens_per_step / median["fit step"],
        "step ratio": statistics.median(  # per round: the two calls saw the same machine
            bare / step for bare, step in zip(seconds["bare"], seconds["fit step"], strict=True)
        ),
        "fit()": tokens_per_step / statistics.median(fit_seconds),
        "fit() ratio": statistics.median(fit_ratios),
        "achieved": achieved,
        "peak": 2 * n**3 / median["peak"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["demo-expert", "router-4.4m"])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (bare, step)")
    parser.add_argument("--repeats", type=int, default=3, help="fit() runs per preset")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per fit() run")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    header = (
        f"{'preset':<12} {'prec':<5} {'tok/step':>8} {'bare tok/s':>11} {'step tok/s':>11} "
        f"{'ratio':>6} {'fit() tok/s':>11} {'ratio':>6} {'GFLOP/s':>8} {'peak':>8} {'of peak':>8}"
    )
    lines = [header, "-" * len(header)]
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.presets:
            r = bench_preset(name, args, device, Path(workdir))
            lines.append(
                f"{name:<12} {r['precision']:<5} {r['tokens_per_step']:>8,} {r['bare']:>11,.0f} "
                f"{r['fit step']:>11,.0f} {r['step ratio']:>6.3f} {r['fit()']:>11,.0f} "
                f"{r['fit() ratio']:>6.3f} {r['achieved'] / 1e9:>8.1f} {r['peak'] / 1e9:>8.1f} "
                f"{r['achieved'] / r['peak']:>8.1%}"
            )
    print(
        f"device {device}, {torch.get_num_threads()} threads, compile {args.compile}; medians of "
        f"{args.rounds} interleaved rounds (bare, fit step, 2048^3 matmul peak) and of "
        f"{args.repeats} fit() runs of {args.steps} steps, each paired with {args.steps} bare steps"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
