"""Training speed: the workflow's default step against a bare loop and eager fp32, and its MFU.

    python benchmarks/bench_train.py [--presets demo demo-expert router-4.4m] [--paper]
                                     [--precision auto] [--compile auto] [--job-steps N]
                                     [--no-levers] [--rounds 5] [--repeats 1] [--steps 3]
                                     [--threads N]

For each model, one batch (`demo`: the workflow's demo expert, sized and batched as `config.yaml`
says; `--paper`: the paper's 335M expert at 32 x 1024 and 1.3B at 16 x 1024, Table 1, for a GPU),
on as many threads as the workflow gives an expert job (`cluster: expert_train: cpus`, unless
`--threads`):

- step:       `train_step()` plus the learning-rate schedule, exactly as `fit()` calls them, as the
              workflow trains by default: precision auto (bf16 on CUDA and on CPUs with native
              bf16, else fp32), compile auto (`resolve_compile`, decided for a job of the demo
              expert's `--job-steps`), attention in fp32 where `fp32_attention` says, the loss
              in chunks of positions where `loss_rows` says, fused AdamW; on the CPU with glibc
              timed twice: at the allocator's defaults, and keeping freed memory as `fit()` makes
              a training job's (`keep_freed_memory`), the one `speedup` is taken of;
- bare:       forward, backward, clip, AdamW step, zero_grad, with the step's precision and
              compilation: the least a training step does; `vs bare` compares the step with it;
- eager fp32: the same loop left at PyTorch's defaults: the plain module, float32 (no TF32),
              `torch.optim.AdamW` unfused; `speedup over eager fp32` = its time / step's;
- levers:     (not with `--no-levers`) the way from eager fp32 to the step one setting at a time:
              + fused AdamW, + bf16 autocast, + torch.compile, + fp32 attention, + chunked loss,
              + freed memory kept, as far as the step uses them; each printed as a speedup over
              eager fp32;
- peak:       one n³ matmul in the step's precision (n = 8192 on CUDA, 2048 on the CPU): the most
              this processor does in this run; MFU = Eq. 10's FLOPs per step / step time, as a
              share of that peak and, for a GPU in NOMINAL_BF16_FLOPS, of its data-sheet peak;
- fit():      the whole `fit()` loop (data stream from Parquet, metrics, log) for `--steps`,
              timed by its own metrics rows, `--repeats` times, each paired with `--steps` bare
              steps run right after it, in a process of its own (none by default with `--paper`:
              a second model).

Each of these is a model of its own; on the CPU each runs in a process of its own too, as a
training job or a user's script would (an allocator's state is a whole process's:
`ContenderProcess`). On a GPU they share one process, but eager fp32 runs its rounds alone first
and is freed before the others are built (at the paper's sizes it would not fit beside them),
and each preset starts from a fresh Dynamo.
They are called in turn, one call each per round for `--rounds` rounds (order shuffled), after
two untimed calls each (compiling), and per-call times are kept: on a machine other jobs share,
each then sees the same share of the cores, and medians shrug off the bursts when it sees none.
Goals: step and fit() within 5% of bare (ratio >= 0.95); on the CPU, the demo expert's step at
2.5x eager fp32 or more.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import multiprocessing
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from timing import interleaved, timed

from smalltalk.allocator import ON_GLIBC, keep_freed_memory
from smalltalk.config import PRESETS, ModelConfig, load_config, model_config
from smalltalk.flops import train_step_flops
from smalltalk.model import LM
from smalltalk.runtime import (
    autocast_context,
    fp32_attention,
    loss_rows,
    resolve_compile,
    resolve_precision,
)
from smalltalk.train import TrainConfig, fit, learning_rate, train_step

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = load_config(REPO / "config.yaml")

# Sequences per step and sequence length: enough work per step to time, few enough seconds on a
# laptop CPU. Table 2 trains the 4.4M router at 32 x 1024; we keep its S = 1024 and V = 32000.
SHAPES = {
    "demo": (WORKFLOW["training"]["expert"]["batch_size"], WORKFLOW["seq_len"]),
    "demo-expert": (16, 256),
    "router-4.4m": (2, 1024),
    "tiny": (16, 64),
    "expert-335m": (32, 1024),
    "expert-1.3b": (16, 1024),
}
PAPER = ["expert-335m", "expert-1.3b"]

# Dense bf16 tensor-core FLOP/s from NVIDIA's data sheets, by a part of the device name; parts
# whose names hold an excluded word run at other clocks (H100 PCIe: 756, NVL parts) and, like every
# GPU not listed, get no nominal column.
NOMINAL_BF16_FLOPS = [
    ("H100", ("PCIE", "NVL"), 989e12),  # SXM
    ("H200", ("NVL",), 989e12),  # SXM
    ("A100", (), 312e12),  # SXM and PCIe alike
]


def preset_model(name: str) -> tuple:
    """(ModelConfig, batch, seq_len) of a benchmarked model."""
    batch, seq_len = SHAPES.get(name, (8, None))
    if name == "demo":
        vocab_size = WORKFLOW["tokenizer"]["vocab_size"]
        return model_config(WORKFLOW, "expert", vocab_size=vocab_size), batch, seq_len
    seq_len = seq_len or PRESETS[name].seq_len
    return dataclasses.replace(PRESETS[name], seq_len=seq_len), batch, seq_len


def nominal_peak(device: torch.device) -> tuple[str, float] | None:
    """(GPU name, nominal dense bf16 FLOP/s), or None on the CPU and on GPUs not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for part, excluded, flops in NOMINAL_BF16_FLOPS:
        if part in name.upper() and not any(word in name.upper() for word in excluded):
            return name, flops
    return None


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


def with_matmul_precision(device: torch.device, matmul_precision: str, call):
    """`call` under a float32 matmul precision: fit() allows TF32 on CUDA ('high') for the matmuls
    autocast leaves in fp32; a loop left at PyTorch's defaults does not ('highest')."""
    if device.type != "cuda":
        return call

    def run():
        torch.set_float32_matmul_precision(matmul_precision)
        call()

    return run


@dataclasses.dataclass(frozen=True)
class Setting:
    """How a step trains: the levers between PyTorch's defaults and the workflow's."""

    fused: bool = False  # fused AdamW (`LM.configure_optimizer`) instead of the plain one
    precision: str = "fp32"
    compiled: bool = False
    fp32_attention: bool = False  # attention in fp32 under bf16 autocast
    loss_rows: int | None = None  # the loss computed this many positions at a time


LEVERS = [
    ("+ fused AdamW", "fused"),
    ("+ bf16 autocast", "precision"),
    ("+ torch.compile", "compiled"),
    ("+ fp32 attention", "fp32_attention"),
    ("+ chunked loss", "loss_rows"),
]


def lever_ladder(step: Setting) -> list[tuple[str, Setting]]:
    """From eager fp32 to `step` one lever at a time, each rung adding one that `step` uses; the
    last rung has `step`'s own settings."""
    rungs, setting = [], Setting()
    for label, field in LEVERS:
        if getattr(step, field) != getattr(setting, field):
            setting = dataclasses.replace(setting, **{field: getattr(step, field)})
            rungs.append((label, setting))
    return rungs


def loop_step(model_config, setting: Setting, config: TrainConfig, device, batch):
    """A bare training step of a model of its own, trained as `setting` says: forward, backward,
    clip, AdamW step, zero_grad, the least a training step does; with the model as it is called
    (compiled or not) and its optimizer."""
    torch.manual_seed(0)
    with torch.device(device):  # built where it trains: a 1.3B model on one CPU thread is slow
        model = LM(model_config)
    model.use_fp32_attention(setting.fp32_attention)
    model.use_chunked_loss(setting.loss_rows)
    if setting.fused:
        optimizer = model.configure_optimizer(
            config.lr, config.weight_decay, config.betas, device.type
        )
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
    trained = torch.compile(model) if setting.compiled else model
    autocast = autocast_context(device, setting.precision)
    inputs, targets = batch

    def step():
        with autocast:
            _, loss = trained(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, trained, optimizer


@dataclasses.dataclass(frozen=True)
class Workload:
    """What a preset's step trains on and how the workflow trains it."""

    model_config: ModelConfig
    batch: int
    seq_len: int
    config: TrainConfig
    setting: Setting
    why_compiled: str
    step_flops: float
    tensors: tuple[torch.Tensor, torch.Tensor]  # inputs, targets: the same in every process


def workload(name: str, args, device: torch.device) -> Workload:
    """Preset `name`'s batch and the workflow's default settings for it."""
    model_config, batch, seq_len = preset_model(name)
    precision = resolve_precision(args.precision, device)
    step_flops = train_step_flops(model_config, batch, seq_len)  # Eq. 10
    compiled, why = resolve_compile(
        args.compile, device, args.job_steps * step_flops, torch.get_num_threads(), precision
    )
    attention_in_fp32 = fp32_attention(device, precision, model_config.head_dim)
    config = TrainConfig(
        steps=args.steps + 1, batch_size=batch, warmup_steps=1, ckpt_every=0, log_every=1,
        precision=precision, device=device.type, threads=args.threads, compile=compiled,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    inputs, targets = (
        torch.randint(0, model_config.vocab_size, (batch, seq_len), generator=generator).to(device)
        for _ in range(2)
    )
    return Workload(
        model_config, batch, seq_len, config,
        Setting(True, precision, compiled, attention_in_fp32, loss_rows(device)),
        why, step_flops, (inputs, targets),
    )  # fmt: skip


def workflow_steps(work: Workload, device: torch.device):
    """The bare step and `fit()`'s step (`train_step()` plus the learning-rate schedule exactly as
    `fit()` calls them) of one model trained with the workflow's settings: (bare, fit_step)."""
    config = work.config
    bare_step, trained, optimizer = loop_step(
        work.model_config, work.setting, config, device, work.tensors
    )
    autocast = autocast_context(device, work.setting.precision)
    step_index = 0

    def fit_step():
        nonlocal step_index
        lr = learning_rate(step_index % config.steps, config, "cosine", config.steps)
        train_step(
            trained, optimizer, [work.tensors], lr=lr, grad_clip=config.grad_clip,
            autocast=autocast,
        )  # fmt: skip
        step_index += 1

    return bare_step, fit_step


def make_step(work: Workload, device: torch.device, setting: Setting | None):
    """A step of a model of its own: the bare loop trained as `setting` says, or, for None,
    `fit()`'s step with the workflow's settings."""
    if setting is not None:
        return loop_step(work.model_config, setting, work.config, device, work.tensors)[0]
    return workflow_steps(work, device)[1]


def serve_contender(connection, name: str, args, device: str, setting, keep_memory: bool) -> None:
    """A child process's life: one contender's step (`make_step`) of preset `name`, one step per
    request until None. With `keep_memory` its allocator keeps freed memory, as a training job's
    does (`allocator.keep_freed_memory`, before anything is allocated). Built, compiled and
    warmed before it says it is ready."""
    if keep_memory:
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(device)
    step = make_step(workload(name, args, device), device, setting)
    step()
    step()
    connection.send("ready")
    while connection.recv() is not None:
        step()
        connection.send("done")


class ContenderProcess:
    """A contender in a process of its own (spawned: a fresh C allocator). glibc adapts when it
    maps and trims memory to what the process freed before, so contenders sharing a process
    shape each other's speed: an eager fp32 loop ran at 61k or 89k tokens/s depending on what ran
    beside it. Called, it runs one step there and waits for it (a pipe's round trip, tens of
    microseconds, is timed with it)."""

    def __init__(self, name: str, args, device: torch.device, setting, keep_memory=False):
        context = multiprocessing.get_context("spawn")
        self.connection, theirs = context.Pipe()
        self.process = context.Process(
            target=serve_contender,
            args=(theirs, name, args, str(device), setting, keep_memory),
            daemon=True,
        )
        self.process.start()

    def wait_until_ready(self) -> None:
        if self.connection.recv() != "ready":
            raise RuntimeError("a contender's process failed to start")

    def __call__(self) -> None:
        self.connection.send(True)
        self.connection.recv()

    def close(self) -> None:
        self.connection.send(None)
        self.process.join()


def fit_against_bare(name: str, args, device: str, workdir: Path) -> tuple[list, list]:
    """`args.repeats` whole `fit()` runs of `args.steps` steps on preset `name`, each followed by
    as many bare steps: (each fit() step's seconds, each run's median bare / median fit() step)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(device)
    work = workload(name, args, device)
    bare_step = make_step(work, device, work.setting)
    config, batch, seq_len = work.config, work.batch, work.seq_len
    data = workdir / name
    data.mkdir(exist_ok=True)
    write_tokens(data / "0.parquet", batch * config.steps, seq_len, work.model_config.vocab_size)
    bare = with_matmul_precision(device, "high", bare_step)
    bare()
    fit_seconds, fit_ratios = [], []
    for repeat in range(args.repeats):
        out = workdir / f"{name}-fit-{repeat}"
        fit(work.model_config, config, data, out, role="expert")
        rows = pq.read_table(out / "metrics.parquet").column("tokens_per_s").to_pylist()
        mine = [batch * seq_len / r for r in rows[1:]]  # the first row pays for start-up
        paired = [timed(bare, device) for _ in range(args.steps)]
        fit_seconds += mine
        fit_ratios.append(statistics.median(paired) / statistics.median(mine))
    return fit_seconds, fit_ratios


def release_memory(device: torch.device) -> None:
    """Give what dropped models held back: cycles collected, and on a GPU the caching allocator's
    free blocks returned, so the next, larger model finds the card's memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def eager_fp32_alone(work: Workload, device: torch.device, rounds: int) -> dict:
    """On a GPU, eager fp32 timed by itself before the other contenders are built, then freed: at
    the paper's sizes its activations alone nearly fill an 80 GB card. {} if it does not fit."""
    seconds, step = {}, None
    try:
        step = with_matmul_precision(device, "highest", make_step(work, device, Setting()))
        seconds = interleaved({"eager fp32": step}, rounds, device)
    except torch.OutOfMemoryError:
        pass  # the traceback, holding the model, goes with this block
    step = None
    release_memory(device)
    return seconds


def timed_contenders(
    name: str, args, work: Workload, levers: list, device: torch.device, peak: tuple
) -> dict[str, list[float]]:
    """Seconds per round of each contender of preset `name` (the bare step, the workflow's step,
    eager fp32, the levers, an (n, dtype) matmul for the peak), interleaved. Everything they
    hold, models, optimizers and matrices, is only referenced from here and goes on return."""
    contenders = {"bare": work.setting, "step": None, "eager fp32": Setting(), **dict(levers)}
    calls, processes, eager_seconds = {}, [], {}
    if device.type == "cpu":  # each in a process of its own, started at once, compiling together
        for label, contender in contenders.items():
            calls[label] = ContenderProcess(name, args, device, contender)
        if ON_GLIBC:  # where keep_freed_memory does anything
            calls["step, memory kept"] = ContenderProcess(name, args, device, None, True)
        processes = list(calls.values())
        for process in processes:
            process.wait_until_ready()
    else:  # one process: a GPU's caching allocator serves them all alike
        eager_seconds = eager_fp32_alone(work, device, args.rounds)
        # bare and step share a model, as at the paper's sizes a third might not fit
        bare_step, fit_step = workflow_steps(work, device)
        calls["bare"] = with_matmul_precision(device, "high", bare_step)
        calls["step"] = with_matmul_precision(device, "high", fit_step)
        for label, contender in levers:
            calls[label] = with_matmul_precision(device, "high", make_step(work, device, contender))
    n, dtype = peak
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    calls["peak"] = lambda: a @ b
    for call in calls.values():  # compiles; the interleaved rounds warm up once more
        call()
    seconds = eager_seconds | interleaved(calls, args.rounds, device)
    for process in processes:
        process.close()
    return seconds


def bench_preset(name: str, args, device: torch.device, workdir: Path) -> dict:
    # A fresh Dynamo: the previous preset's graphs go, and its other batch size does not make
    # this one compile for dynamic shapes.
    torch._dynamo.reset()
    release_memory(device)
    work = workload(name, args, device)
    setting = work.setting
    precision, compiled = setting.precision, setting.compiled
    tokens_per_step = work.batch * work.seq_len
    rungs = lever_ladder(setting)
    levers = rungs[:-1] if args.levers else []  # the last rung is the step, timed anyway
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    seconds = timed_contenders(name, args, work, levers, device, (n, dtype))
    release_memory(device)  # what they held, for fit() below: on a GPU the paper's models fill it

    fit_seconds, fit_ratios = [], []
    if args.repeats:  # in a process of its own: fit() keeps freed memory from then on
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = pool.submit(fit_against_bare, name, args, str(device), workdir)
            fit_seconds, fit_ratios = runs.result()

    def ratio(slow: str, fast: str) -> float | None:
        """Median over rounds of slow / fast: in each round the two saw the same machine (on a
        GPU, eager fp32's rounds come before the others', on a machine of its own)."""
        if slow not in seconds or fast not in seconds:
            return None
        pairs = zip(seconds[slow], seconds[fast], strict=True)
        return statistics.median(s / f for s, f in pairs)

    median = {key: statistics.median(values) for key, values in seconds.items()}
    ladder = [(label, ratio("eager fp32", label)) for label, _ in levers]
    workflow = "step"  # the step as a training job runs it
    if "step, memory kept" in seconds:
        ladder.append((rungs[-1][0] if rungs else "step", ratio("eager fp32", "step")))
        workflow = "step, memory kept"
    return {
        "precision": precision,
        "compiled": compiled,
        "why compiled": work.why_compiled,
        "tokens_per_step": tokens_per_step,
        "bare": tokens_per_step / median["bare"],
        "step": tokens_per_step / median[workflow],
        "step ratio": ratio("bare", "step"),
        "memory kept": ratio("step", "step, memory kept"),
        "eager fp32": tokens_per_step / median["eager fp32"] if "eager fp32" in median else None,
        "speedup": ratio("eager fp32", workflow),
        "levers": ladder,
        "attention": "fp32" if setting.fp32_attention else precision,
        "loss rows": setting.loss_rows,
        "fit()": tokens_per_step / statistics.median(fit_seconds) if fit_seconds else None,
        "fit() ratio": statistics.median(fit_ratios) if fit_ratios else None,
        "achieved": work.step_flops / median[workflow],
        "peak": 2 * n**3 / median["peak"],
        "peak name": f"{n}^3 {'bf16' if dtype == torch.bfloat16 else 'fp32'} matmul",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["demo", "demo-expert", "router-4.4m"])
    parser.add_argument("--paper", action="store_true", help=f"--presets {' '.join(PAPER)}")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    parser.add_argument(
        "--job-steps",
        type=int,
        default=WORKFLOW["training"]["expert"]["steps"],
        help="steps of the job compile auto decides for (default: the demo expert's)",
    )
    parser.add_argument(
        "--no-levers", dest="levers", action="store_false", help="time the step's settings only"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=None, help="fit() runs per preset")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per fit() run")
    parser.add_argument(
        "--threads",
        type=int,
        default=WORKFLOW["cluster"]["expert_train"]["cpus"],
        help="torch.set_num_threads (default: an expert job's cpus in config.yaml)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.paper:
        args.presets = PAPER
        args.levers = False  # one more model of the paper's size each
    if args.repeats is None:
        args.repeats = 0 if args.paper else 1
    args.compile = {"true": True, "false": False}.get(args.compile, args.compile)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    nominal = nominal_peak(device)
    unit, scale = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)

    columns = [
        ("preset", "<12"), ("prec", "<5"), ("compiled", "<8"), ("tok/step", ">8"),
        ("step tok/s", ">11"), ("vs bare", ">7"), ("fp32 tok/s", ">11"), ("speedup", ">7"),
        ("fit() tok/s", ">11"), ("vs bare", ">7"), (unit, ">8"), ("of peak", ">8"),
    ] + ([("of nominal", ">10")] if nominal else [])  # fmt: skip
    header = " ".join(f"{title:{align}}" for title, align in columns)
    notes = []
    # Each row as soon as its preset is done: a later, larger one may not fit in memory.
    print(
        f"device {device}, {torch.get_num_threads()} threads; medians of {args.rounds} "
        f"interleaved rounds (bare, step, eager fp32, levers, matmul peak) and of {args.repeats} "
        f"fit() runs of {args.steps} steps, each paired with {args.steps} bare steps",
        header,
        "-" * len(header),
        sep="\n",
        flush=True,
    )

    def number(value, spec):
        return "-" if value is None else format(value, spec)

    with tempfile.TemporaryDirectory() as workdir:
        for name in args.presets:
            try:
                r = bench_preset(name, args, device, Path(workdir))
            except torch.OutOfMemoryError as error:
                print(f"{name:<12} out of memory", flush=True)
                notes.append(f"{name}: out of memory: {str(error).splitlines()[0]}")
                continue
            cells = [
                name, r["precision"], "yes" if r["compiled"] else "no",
                f"{r['tokens_per_step']:,}", f"{r['step']:,.0f}", number(r["step ratio"], ".3f"),
                number(r["eager fp32"], ",.0f"), number(r["speedup"], ".2f"),
                number(r["fit()"], ",.0f"), number(r["fit() ratio"], ".3f"),
                f"{r['achieved'] / scale:.1f}", f"{r['achieved'] / r['peak']:.1%}",
            ] + ([f"{r['achieved'] / nominal[1]:.1%}"] if nominal else [])  # fmt: skip
            row = " ".join(f"{c:{a}}" for c, (_, a) in zip(cells, columns, strict=True))
            print(row, flush=True)
            speedup = number(r["speedup"], ".2f") if r["speedup"] else "- (out of memory)"
            notes.append(
                f"{name}: speedup over eager fp32: {speedup}; {r['achieved'] / r['peak']:.1%} of "
                f"the {r['peak name']} peak ({r['peak'] / scale:,.1f} {unit})"
                + (
                    f", {r['achieved'] / nominal[1]:.1%} of the nominal {nominal[1] / 1e12:.0f} "
                    f"TFLOP/s of the {nominal[0]}"
                    if nominal
                    else ""
                )  # fmt: skip
                + f"; compile {'on' if r['compiled'] else 'off'} ({r['why compiled']}); "
                f"attention {r['attention']}"
                + (f"; loss in chunks of {r['loss rows']} positions" if r["loss rows"] else "")
            )
            if r["levers"]:
                ladder = [f"{label} {number(x, '.2f')}" for label, x in r["levers"]]
                last = "+ freed memory kept " if r["memory kept"] else "step "
                notes.append(f"  levers over eager fp32: {', '.join(ladder)}, {last}{speedup}")
    print("", *notes, sep="\n")


if __name__ == "__main__":
    main()
