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
from torch.nn.attention import SDPBackend

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
# of the demo's jobs (its longest, each half of the dense baseline, ~140 s), a router round never.
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


# The longest sequence for which explicit attention is chosen: measured faster at 128 (below), not
# at 256; its (B, nh, T, T) scores, kept for the backward pass, grow with T².
EXPLICIT_ATTENTION_MAX_LEN = 128


def attention_backends(
    device: torch.device, seq_len: int, precision: str
) -> list[SDPBackend] | None:
    """The attention kernels a training run uses: PyTorch's choice (None), except in bf16 on the
    CPU with short sequences, where the explicit product-softmax-product (MATH) is faster.

    There PyTorch picks its fused flash kernel, whose bf16 backward is slow at head sizes like ours
    (32); the explicit form is three plain ops, and compiled, Inductor fuses it into its own loops.
    Measured with `benchmarks/bench_train.py` (one thread, Xeon with AMX), the demo expert's bf16
    step (S = 128): compiled 1.4x as fast with it, eager 1.12x; the `demo-expert` preset's
    (S = 256) compiled 0.93-1.0x, hence S <= 128. A compiled fp32 step was slower with it (0.94x,
    0.90x), hence bf16 only.
    """
    explicit = (
        device.type == "cpu" and precision == "bf16" and seq_len <= EXPLICIT_ATTENTION_MAX_LEN
    )
    return [SDPBackend.MATH] if explicit else None


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
