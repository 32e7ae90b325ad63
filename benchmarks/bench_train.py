"""Training throughput of `fit()` against a bare PyTorch loop, and against the matmul peak.

    python benchmarks/bench_train.py [--presets demo-expert router-4.4m] [--precision auto]
                                     [--repeats 3] [--threads N]

For each preset, in the same process and precision, interleaved `--repeats` times (medians
reported, since the machine may be shared):

- bare:      forward, backward, clip, AdamW step, zero_grad on a fixed in-memory batch;
- fit step:  `train_step()` as `fit()` calls it, with its learning-rate update, on the same batch;
- fit():     the whole loop on synthetic token Parquet (data stream, metrics, progress),
             timed from its metrics rows after the first step;
- peak:      a square matmul (2048³) in the same precision, the most this CPU/GPU will do.

Goals: fit step and fit() within 5% of bare (ratio ≥ 0.95); for demo-expert on CPU, achieved
FLOP/s (Eq. 10's count per step / step time) ≥ 35% of the peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

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

# Batch (sequences) and sequence length per preset: enough work per step to measure, few enough
# seconds on a laptop CPU. Table 2 trains the 4.4M router at 32 x 1024; we keep S = 1024.
SHAPES = {"demo-expert": (16, 256), "router-4.4m": (4, 1024), "tiny": (16, 64)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, precision: str, n: int = 2048, reps: int = 5) -> list[float]:
    """FLOP/s of n x n x n matmuls in the training precision (bf16 operands under bf16)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return [2 * n**3 / seconds for seconds in time_steps(lambda: a @ b, reps, device)]


def time_steps(step, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of `steps` calls, after one untimed call. Per call, so that a median
    shrugs off the moments another job takes the cores."""
    step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


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


def bench_preset(name: str, args, device: torch.device, workdir: Path) -> dict[str, float]:
    """Median tokens/s of the three loops and median matmul FLOP/s, with what they were for."""
    batch, seq_len = SHAPES.get(name, (8, PRESETS[name].seq_len))
    model_config = dataclasses.replace(PRESETS[name], seq_len=seq_len)
    precision = resolve_precision(args.precision, device)
    autocast = autocast_context(device, precision)
    config = TrainConfig(
        steps=args.steps + 1, batch_size=batch, warmup_steps=1, ckpt_every=0, log_every=1,
        precision=precision, device=device.type, threads=args.threads,
    )  # fmt: skip
    tokens_per_step = batch * seq_len
    flops_per_step = train_step_flops(model_config, batch, seq_len)  # Eq. 10 without N_steps

    torch.manual_seed(0)
    model = LM(model_config).to(device)
    optimizer = model.configure_optimizer(config.lr, config.weight_decay, config.betas, device.type)
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
        lr = learning_rate(step_index, config, "cosine", config.steps)
        train_step(
            model, optimizer, [(inputs, targets)], lr=lr, grad_clip=config.grad_clip,
            autocast=autocast,
        )  # fmt: skip
        step_index += 1

    data = workdir / name
    data.mkdir(exist_ok=True)
    write_tokens(data / "0.parquet", batch * (args.steps + 1), seq_len, model_config.vocab_size)

    # Warm-up: kernel selection and allocator caches settle over the first few steps.
    time_steps(bare_step, 2, device)
    time_steps(fit_step, 2, device)
    seconds: dict[str, list[float]] = {"bare": [], "fit step": [], "fit()": []}
    peak: list[float] = []
    for repeat in range(args.repeats):
        peak += matmul_peak(device, precision)
        loops = [("bare", bare_step), ("fit step", fit_step)]
        for key, step in loops if repeat % 2 == 0 else loops[::-1]:  # alternate who goes first
            seconds[key] += time_steps(step, args.steps, device)
        out = workdir / f"{name}-fit-{repeat}"
        fit(model_config, config, data, out, role="expert")
        rows = pq.read_table(out / "metrics.parquet").column("tokens_per_s").to_pylist()
        seconds["fit()"] += [tokens_per_step / r for r in rows[1:]]  # row 1 pays for start-up
    results = {key: tokens_per_step / statistics.median(s) for key, s in seconds.items()}
    results["peak"] = statistics.median(peak)
    results |= {"precision": precision, "tokens_per_step": tokens_per_step, "flops": flops_per_step}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["demo-expert", "router-4.4m"])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per loop and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
            achieved = r["fit step"] / r["tokens_per_step"] * r["flops"]
            lines.append(
                f"{name:<12} {r['precision']:<5} {r['tokens_per_step']:>8,} {r['bare']:>11,.0f} "
                f"{r['fit step']:>11,.0f} {r['fit step'] / r['bare']:>6.3f} "
                f"{r['fit()']:>11,.0f} {r['fit()'] / r['bare']:>6.3f} "
                f"{achieved / 1e9:>8.1f} {r['peak'] / 1e9:>8.1f} {achieved / r['peak']:>8.1%}"
            )
    print(
        f"device {device}, {torch.get_num_threads()} threads; medians of {args.repeats} x "
        f"{args.steps} steps per loop; peak: median of {args.repeats} x 5 matmuls of 2048^3"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
