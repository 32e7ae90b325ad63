"""Where and how a training job runs: its device, precision (bf16 where the processor multiplies
it natively), whether to torch.compile, its place among torchrun's processes, its peak memory.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed

from smalltalk.checkpoint import resolve_device


def cpu_supports_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX tiles).

    With them oneDNN's bf16 matmuls beat fp32 (here 1.5x on a 1024² product); without them bf16 is
    emulated and slower than fp32. A flag check rather than a timing, so that the choice, and with
    it every number a run produces, does not depend on how busy the machine was at start-up.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence getattr
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast (matmuls in bf16, reductions and the loss in fp32) or nothing for fp32.
    No fp16 anywhere, hence no gradient scaler."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


# torch.compile on the CPU, one thread, with the demo's shapes. Compiling costs 18-24 s on a 2-core
# Xeon with AMX and 36-50 s on a 2-core AMD EPYC (Zen 4): the first step of a job, whatever the
# model's size (3.5-5 s when Inductor's on-disk cache already holds its kernels, which a job cannot
# count on). What it saves, `benchmarks/bench_train.py`'s levers, compiled against eager with the
# same fused AdamW: in bf16 (Xeon, AMX) 56% of the demo expert's step time and 31% of the
# `demo-expert` preset's; in fp32 20% and 14% on the Xeon, 9% on the EPYC. An eager step does
# about 16 GFLOP/s (Eq. 10) per thread at the demo's sizes on the EPYC (30-90 on the Xeon). So
# compiling pays once a run would take over ~50 s / 0.3 = 170 s eager in bf16, 550 s in fp32: none
# of the demo's jobs (its longest, each half of the dense baseline, ~160 s), a router round never.
# The choice is a rule on the planned FLOPs, not a timing, so the same config trains the same way
# on the same machine.
CPU_COMPILE_SECONDS = 50.0
CPU_COMPILE_SAVING = {"bf16": 0.30, "fp32": 0.09}
CPU_FLOPS_PER_THREAD = 16e9


def resolve_compile(
    compile: bool | str, device: torch.device, planned_flops: float, threads: int, precision: str
) -> tuple[bool, str]:
    """Whether to torch.compile the model, and why, in a phrase for the training log.

    'auto' compiles on CUDA, where it removes most of the kernel launches and memory traffic of
    the small ops; on the CPU only when the time it saves, CPU_COMPILE_SAVING[precision] of the
    run's estimated eager time (its planned Eq. 10 FLOPs at CPU_FLOPS_PER_THREAD per thread),
    exceeds what compiling costs. `planned_flops` are the whole run's, not what is left after a
    resume, so that a resumed run decides as the run it continues did.
    """
    if compile is not True and compile is not False and compile != "auto":
        raise ValueError(f"compile must be true, false or 'auto', got {compile!r}")
    if compile != "auto":
        return compile, f"compile: {str(compile).lower()} in the config"
    if device.type == "cuda":
        return True, "auto: always on CUDA"
    eager_seconds = planned_flops / (CPU_FLOPS_PER_THREAD * threads)
    saved = CPU_COMPILE_SAVING[precision] * eager_seconds
    pays = saved > CPU_COMPILE_SECONDS
    why = (
        f"auto: on the CPU a run of about {eager_seconds:,.0f} s eager in {precision} on "
        f"{threads} thread{'s' if threads > 1 else ''} "
        f"would save about {saved:,.0f} s, {'more' if pays else 'less'} than compiling costs "
        f"(~{CPU_COMPILE_SECONDS:.0f} s)"
    )
    compiler = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
    if pays and shutil.which(compiler) is None:  # what Inductor builds its CPU kernels with
        return False, f"{why}, but there is no C++ compiler ({compiler}) to compile with"
    return pays, why


# The widest attention head computed in fp32 under bf16 autocast on the CPU. PyTorch's CPU flash
# attention, forward and backward, one thread, Xeon with AMX: at head size 32 (the demo expert,
# B x nh x S = 32 x 1 x 128, and `demo-expert`, 16 x 4 x 256) fp32 takes 0.29x and 0.68x the time
# of bf16, at 8 (router-4.4m, 2 x 12 x 1024) 0.70x; at 64 (8 x 8 x 512) 1.4x, so bf16 is kept there.
FP32_ATTENTION_MAX_HEAD_DIM = 32


def fp32_attention(device: torch.device, precision: str, head_dim: int) -> bool:
    """Whether a training run computes attention in fp32 although its matmuls run in bf16: on the
    CPU with heads of at most FP32_ATTENTION_MAX_HEAD_DIM, where PyTorch's bf16 flash kernel is
    slower than its fp32 one (its bf16 backward converts blocks too small to repay it).

    q, k and v are (B, nh, T, hs): B x T x d values each, cast once, against B x nh x T² scores;
    the matmuls of the projections and the MLP stay in bf16.
    """
    return device.type == "cpu" and precision == "bf16" and head_dim <= FP32_ATTENTION_MAX_HEAD_DIM


# Positions whose training loss is computed at a time on the CPU (`LM.use_chunked_loss`). The
# demo expert's step (d = 32, V = 1024, 32 x 128, bf16 and fp32 alike, Xeon with AMX) ran 1.25x
# faster on 1 thread and 1.12x on 2, with 256 to 1024 rows alike: its loss, softmax and casts over
# V = 1024 per position, was a third of the step. Where the model is wider the loss's share is
# smaller: `demo-expert` (d = 128, V = 4096) 1.10x eager and 0.97-1.03x compiled, router-4.4m
# (d = 96, V = 32000) 1.04-1.06x eager and 0.98-1.03x compiled; slower nowhere beyond noise. Not
# used on CUDA, where it was not measured.
CPU_LOSS_ROWS = 512


def loss_rows(device: torch.device) -> int | None:
    """How many positions at a time a training run computes its loss and the loss's gradient over:
    CPU_LOSS_ROWS on the CPU; None (the whole batch's logits at once) on a GPU."""
    return CPU_LOSS_ROWS if device.type == "cpu" else None


@dataclass(frozen=True, slots=True)
class Processes:
    """This process's place among the data-parallel processes started by torchrun."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_processes(device: str) -> Processes:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group."""
    device = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(0, 1, torch.device(device))
    if device == "cuda":
        local = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(local)
    else:
        local = torch.device("cpu")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    return Processes(torch.distributed.get_rank(), world_size, local)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak tensor memory on a GPU; on the CPU, the process's peak resident set (all of it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
