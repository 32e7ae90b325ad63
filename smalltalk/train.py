"""The one training loop of SmallTalk: routers, experts and the dense baseline (paper §2, App. A.1).

The three roles are the same model at different sizes and differ only in data and schedule:

    router  its round-r sequences (`seq_ids`), prefixes of M tokens (Eq. 9), warm-up + constant LR
    expert  its shard, full sequences, warm-up + cosine decay
    dense   all shards, full sequences, warm-up + cosine decay, as many tokens as all experts

`fit()` reads top to bottom: resolve the device, precision and budget; build the data stream,
model and optimizer; resume from the newest checkpoint in `out_dir/ckpt` if it was made from the
same inputs and settings (else delete the checkpoints and start afresh); loop; write
`metrics.parquet`, `summary.json` and, last, `model.safetensors`. Only the final weights mark a
finished run, so a workflow never takes a half-trained model for a finished one; they are
followed by `ckpt/finished`, so that running a finished job again trains it again.

Under `torchrun` (WORLD_SIZE > 1) the same loop runs with DistributedDataParallel (NCCL on CUDA,
gloo on CPU) at the same global batch; only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from smalltalk.allocator import keep_freed_memory
from smalltalk.checkpoint import (
    STATE,
    WEIGHTS,
    is_finished,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    mark_finished,
    read_state,
    remove_checkpoints,
    save_checkpoint,
    save_weights,
)
from smalltalk.config import ROLES, ModelConfig, TrainConfig
from smalltalk.files import fingerprint, write_atomically
from smalltalk.flops import training_flops
from smalltalk.model import LM, counted_flops
from smalltalk.runtime import (
    autocast_context,
    fp32_attention,
    loss_rows,
    peak_memory_bytes,
    resolve_compile,
    resolve_precision,
    start_processes,
)
from smalltalk.scoring import sequence_nll
from smalltalk.stream import TokenStream, parquet_files
from smalltalk.tokens import token_matrix

SCHEDULE_BY_ROLE = {"router": "constant", "expert": "cosine", "dense": "cosine"}  # App. A.1
METRICS_SAVE_SECONDS = 60  # also rewrite metrics.parquet this often, for those watching a run
# Settings a resumed run may change without changing what it computes.
RESUMABLE_CHANGES = {"ckpt_every", "keep_last", "log_every", "threads", "compile", "device"}


# ---- learning-rate schedules (App. A.1) -----------------------------------------------------


def learning_rate(step: int, config: TrainConfig, schedule: str, total_steps: int) -> float:
    """LR at 0-based `step`: linear warm-up to `lr` over `warmup_steps`, then `lr` ('constant',
    routers) or a cosine decay reaching `min_lr` exactly at the last step ('cosine', experts)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, total_steps - 1 - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # 1 -> 0
    return config.min_lr + cosine * (config.lr - config.min_lr)


# ---- one optimizer step ---------------------------------------------------------------------


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    grad_clip: float,
    autocast,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over the micro-batches, summing their gradients, then clip and step.

    Returns the step's mean loss and the gradient norm before clipping as device tensors: reading
    them is the caller's choice, as it waits for the device.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = 0.0
    for i, (inputs, targets) in enumerate(micro_batches):
        # Under DDP, all-reduce the gradients once, in the last micro-batch's backward pass.
        last = i == len(micro_batches) - 1
        no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) else nullcontext()
        with nullcontext() if last else no_sync:
            with autocast:
                _, loss = model(inputs, targets)
            (loss / len(micro_batches)).backward()  # mean over the step's micro-batches
        loss_sum = loss_sum + loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / len(micro_batches), grad_norm


# ---- metrics --------------------------------------------------------------------------------

METRICS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("tokens", pa.int64()),  # trained so far, all processes together
        ("loss", pa.float64()),  # mean training loss over the steps since the previous row
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),  # before clipping, at this row's step
        ("tokens_per_s", pa.float64()),  # over the steps since the previous row
        ("flops", pa.float64()),  # cumulative training FLOPs, Eq. 10 (float: 1e21 > int64)
        ("seconds", pa.float64()),  # training wall time so far, over resumed segments too
        ("val_loss", pa.float64()),  # mean NLL per token on the validation set; null between passes
        ("val_tokens", pa.int64()),  # tokens behind val_loss (constant over a run)
    ]
)


class MetricsLog:
    """Rows of `metrics.parquet`, rewritten whole (and atomically) when saved: a log holds one row
    per `log_every` steps, small enough to rewrite at every checkpoint."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.saved_at = time.perf_counter()

    def resume(self, step: int, saved_rows: list[dict[str, Any]] | None = None) -> None:
        """Take up the rows of a previous run up to `step`, the checkpoint resumed from: those
        the checkpoint holds (a workflow manager deletes an unfinished job's outputs, this file
        among them, before running it again), else those of the file."""
        rows = saved_rows
        if rows is None and self.path.exists():
            rows = pq.read_table(self.path).to_pylist()
        self.rows = [row for row in rows or [] if row["step"] <= step]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def save(self) -> None:
        table = pa.Table.from_pylist(self.rows, schema=METRICS_SCHEMA)
        write_atomically(self.path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        self.saved_at = time.perf_counter()


def _validation_tokens(files, count: int) -> torch.Tensor:
    """The first `count` rows of the validation files as one (n, S+1) tensor."""
    rows = []
    for path in parquet_files(files):
        for batch in pq.ParquetFile(path).iter_batches(columns=["tokens"], batch_size=1024):
            rows.append(token_matrix(batch.column("tokens")))  # (n, S+1)
            if sum(len(r) for r in rows) >= count:
                break
        if sum(len(r) for r in rows) >= count:
            break
    if not rows:
        return torch.zeros((0, 2), dtype=torch.long)
    return torch.from_numpy(np.concatenate(rows)[:count].astype(np.int64))


def _input_fingerprints(
    data_files, seq_ids, init_from, val_files, branch_from=None
) -> dict[str, str | None]:
    """Digests of what a run learns from and is measured on (see `files.fingerprint` for their
    cost): a checkpoint goes on only with the same."""
    sequences = None
    if seq_ids is not None:  # a set: the stream keeps rows in file order whatever the ids' order
        sequences = hashlib.blake2b(np.unique(seq_ids).astype(np.int64).tobytes()).hexdigest()
    return {
        "data": fingerprint(parquet_files(data_files)),
        "seq_ids": sequences,
        "init_from": None if init_from is None else fingerprint([init_from]),
        "val": fingerprint(parquet_files(val_files)) if val_files else None,
        "branch_from": None
        if branch_from is None
        else fingerprint([Path(branch_from) / name for name in (WEIGHTS, STATE)]),
    }


def _why_not_resume(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How the run that wrote a checkpoint differs from this one; continuing it would make a run
    that is neither. Empty if it may go on."""
    differences = [
        f"inputs.{key} changed"
        for key, digest in current["inputs"].items()
        if saved.get("inputs", {}).get(key) != digest  # absent: a checkpoint made before digests
    ]
    differences += [
        f"{key}: {saved.get(key)!r} -> {current[key]!r}"
        for key in ("role", "model_config", "steps", "seq_len", "schedule", "prefix_len", "stop_at")
        if saved.get(key) != current[key]
    ]
    differences += [
        f"train_config.{key}: {value!r} -> {current['train_config'].get(key)!r}"
        for key, value in saved["train_config"].items()
        if key not in RESUMABLE_CHANGES and value != current["train_config"].get(key)
    ]
    return differences


# ---- the loop -------------------------------------------------------------------------------


def fit(
    model_config: ModelConfig,
    train_config: TrainConfig,
    data_files,
    out_dir: str | os.PathLike,
    *,
    role: str,
    init_from: str | os.PathLike | None = None,
    seq_ids: np.ndarray | None = None,
    prefix_len: int | None = None,
    weights_path: str | os.PathLike | None = None,
    val_files=None,
    val_every: int = 0,
    val_sequences: int = 512,
    branch_from: str | os.PathLike | None = None,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train one LM on token Parquet files and write its results to `out_dir`; return the summary.

    data_files: token Parquet files or directories of them. init_from: safetensors weights to start
    from (a router's previous EM round) instead of a fresh initialisation; a checkpoint in
    `out_dir/ckpt`, if any, takes precedence over both. seq_ids: train only on these sequences.
    prefix_len: train on the first M tokens of each sequence only (routers, Eq. 9).
    weights_path: where the final weights go (default `out_dir/model.safetensors`).
    val_files: token files whose first `val_sequences` rows give a validation loss every
    `val_every` steps and at the end (the curves of perplexity against training FLOPs, Fig. 2).
    branch_from: a checkpoint directory of another run (BTM's seed, `branch_steps`) to go on
    from: its weights, optimizer moments and step; on the same data also its data cursor and
    metrics, so the run continues it exactly. stop_at: end after this step, with a checkpoint
    there for others to branch from; the learning-rate schedule still spans all the steps.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    config = train_config
    out_dir = Path(out_dir)
    procs = start_processes(config.device)
    device = procs.device
    precision = resolve_precision(config.precision, device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    memory_kept = device.type == "cpu" and keep_freed_memory()  # no page faults per step
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the matmuls autocast leaves in fp32
    log = (lambda line: tqdm.write(line, file=sys.stderr)) if procs.is_main else (lambda _: None)

    # Every process reads the same global micro-batch and keeps its share of the rows.
    micro_batch = config.batch_size // config.grad_accum
    if micro_batch % procs.world_size:
        raise ValueError(
            f"batch_size / grad_accum = {micro_batch} does not split over "
            f"{procs.world_size} processes"
        )
    stream = TokenStream(
        data_files,
        batch_size=micro_batch,
        seed=config.seed,
        shuffle_buffer=config.shuffle_buffer,
        prefix_len=prefix_len,
        seq_ids=seq_ids,
        rank=procs.rank,
        world_size=procs.world_size,
    )
    seq_len = stream.seq_len  # T: S, or M for prefixes
    if seq_len > model_config.seq_len:
        raise ValueError(
            f"the data has {seq_len} tokens per example, the model {model_config.seq_len}"
        )
    tokens_per_step = config.batch_size * seq_len
    total_steps = config.total_steps(tokens_per_step)
    schedule = SCHEDULE_BY_ROLE[role] if config.schedule == "auto" else config.schedule

    torch.manual_seed(config.seed)  # identical initial weights in every process
    model = LM(model_config).to(device)
    if init_from is not None:
        load_weights(model, init_from)
    optimizer = model.configure_optimizer(config.lr, config.weight_decay, config.betas, device.type)
    torch.manual_seed(config.seed + procs.rank)  # but a different dropout mask in each

    resolved = {
        "role": role,
        "model_config": dataclasses.asdict(model_config),
        "train_config": dataclasses.asdict(config),
        "steps": total_steps,
        "seq_len": seq_len,
        "schedule": schedule,
        "prefix_len": prefix_len,
        "init_from": None if init_from is None else str(init_from),
        "device": str(device),
        "precision": precision,
        "world_size": procs.world_size,
        "inputs": _input_fingerprints(data_files, seq_ids, init_from, val_files, branch_from),
        "stop_at": stop_at,
    }
    step, seconds_before = 0, 0.0
    metrics = MetricsLog(out_dir / "metrics.parquet")
    ckpt_dir = out_dir / "ckpt"
    ckpt, stale = latest_checkpoint(ckpt_dir), []
    if is_finished(ckpt_dir):
        stale = ["its training finished, and a finished job run again is trained again"]
    elif ckpt is not None:
        state = read_state(ckpt)
        stale = _why_not_resume(state["resolved"], resolved)
    if stale:
        resumption = (
            f"not resuming {ckpt or ckpt_dir}: {'; '.join(stale)}. Deleted; starting afresh"
        )
        if procs.world_size > 1:
            torch.distributed.barrier()  # every rank has read the checkpoint before it goes
        if procs.is_main:
            remove_checkpoints(ckpt_dir)
        ckpt = None
    elif ckpt is None:
        resumption = f"no checkpoint in {ckpt_dir}: starting afresh"
    else:
        resumption = f"resuming from {ckpt}: made from the same inputs and settings"
        state = load_checkpoint(ckpt, model, optimizer, state)
        step, seconds_before = state["step"], state["seconds"]
        stream.load_state_dict(state["stream"])
        metrics.resume(step, state.get("metrics"))
        if procs.rank:  # the checkpoint holds rank 0's RNG; keep the other ranks' masks distinct
            torch.manual_seed(config.seed + procs.rank + 1_000_003 * step)
    if ckpt is None and branch_from is not None:
        state = load_checkpoint(branch_from, model, optimizer)
        step = state["step"]
        if not 0 < step < total_steps or state["resolved"]["steps"] != total_steps:
            raise ValueError(
                f"{branch_from}: a branch point at step {step} of {state['resolved']['steps']} "
                f"does not fit a run of {total_steps} steps"
            )
        if state["resolved"]["inputs"]["data"] == resolved["inputs"]["data"]:
            # The run that made it, going on: the same batches and its curve so far.
            stream.load_state_dict(state["stream"])
            metrics.resume(step, state.get("metrics"))
            seconds_before = state["seconds"]
        torch.manual_seed(config.seed + procs.rank + 1_000_003 * step)
        resumption = f"branching from {branch_from} at step {step}"
    resolved["branched_from_step"] = step if branch_from is not None else None

    end = total_steps if stop_at is None else stop_at
    run_steps = end - (resolved["branched_from_step"] or 0)  # this job's, resumed or not
    compiled, why_compiled = resolve_compile(
        config.compile,
        device,
        training_flops(model_config, run_steps, config.batch_size, seq_len),
        torch.get_num_threads() * procs.world_size,  # CPU threads working on the run
        precision,
    )
    resolved["compiled"] = compiled
    attention_in_fp32 = fp32_attention(device, precision, model_config.head_dim)
    model.use_fp32_attention(attention_in_fp32)
    model.use_chunked_loss(loss_rows(device))
    resolved["loss_rows"] = model.loss_rows
    train_model = torch.compile(model) if compiled else model  # checkpoints save `model`
    if procs.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(train_model, device_ids=device_ids)
    train_model.train()
    autocast = autocast_context(device, precision)

    out_dir.mkdir(parents=True, exist_ok=True)
    n_params = model.num_parameters()
    log(
        f"{role}: {n_params:,} parameters ({model.num_parameters(exclude_embeddings=True):,} "
        f"without embeddings) | {tokens_per_step:,} tokens per step ({config.batch_size} x "
        f"{seq_len}, {config.grad_accum} micro-batches, {procs.world_size} processes) | "
        f"{total_steps:,} steps = {total_steps * tokens_per_step:,} tokens | planned training "
        f"FLOPs {training_flops(model_config, total_steps, config.batch_size, seq_len):.3e} "
        f"(Eq. 10) | {device} {precision} | {schedule} lr {config.lr:g}, warm-up "
        f"{config.warmup_steps}" + (f" | resumed from {ckpt.name}" if ckpt is not None else "")
    )
    log(resumption)
    log(
        f"torch.compile {'on' if compiled else 'off'} ({why_compiled}); attention in "
        + ("fp32 (faster here at this head size)" if attention_in_fp32 else precision)
        + (f"; loss in chunks of {model.loss_rows} positions" if model.loss_rows else "")
        + ("; freed memory kept for reuse" if memory_kept else "")
    )

    val_tokens = _validation_tokens(val_files, val_sequences) if val_files else None

    def validation_loss() -> tuple[float | None, int | None]:
        if val_tokens is None or not procs.is_main or len(val_tokens) == 0:
            return None, None
        nll = sequence_nll(model, val_tokens, batch_size=64)  # (n,) sums; one sync, in eval mode
        count = len(val_tokens) * (val_tokens.size(1) - 1)
        return float(nll.sum()) / count, count

    def to_device(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if device.type == "cuda":  # pinned host memory lets the copy overlap the previous step
            return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
        return batch

    batches = iter(stream)
    progress = tqdm(
        total=total_steps,
        initial=step,
        unit="step",
        file=sys.stderr,
        disable=None if procs.is_main else True,
    )
    start_step, loop_start = step, time.perf_counter()
    interval_start, interval_steps, interval_loss = loop_start, 0, torch.zeros((), device=device)
    while step < end:
        lr = learning_rate(step, config, schedule, total_steps)
        micro_batches = [to_device(next(batches)) for _ in range(config.grad_accum)]
        loss, grad_norm = train_step(
            train_model,
            optimizer,
            micro_batches,
            lr=lr,
            grad_clip=config.grad_clip,
            autocast=autocast,
        )
        step += 1
        interval_loss += loss
        interval_steps += 1
        progress.update()

        checkpoint_due = step == stop_at or (
            config.ckpt_every and step % config.ckpt_every == 0 and step < total_steps
        )
        validation_due = val_tokens is not None and (
            step == end or (val_every and step % val_every == 0)
        )
        if step % config.log_every == 0 or checkpoint_due or validation_due or step == end:
            if procs.world_size > 1:  # the loss of the global batch, not of this rank's share
                torch.distributed.all_reduce(interval_loss, op=torch.distributed.ReduceOp.AVG)
            mean_loss = (interval_loss / interval_steps).item()  # sync: waits for the device
            now = time.perf_counter()
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training loss is {mean_loss} at step {step}")
            row = {
                "step": step,
                "tokens": step * tokens_per_step,
                "loss": mean_loss,
                "lr": lr,
                "grad_norm": grad_norm.item(),  # sync, but the device is idle already
                "tokens_per_s": interval_steps * tokens_per_step / (now - interval_start),
                "flops": float(training_flops(model_config, step, config.batch_size, seq_len)),
                "seconds": seconds_before + now - loop_start,
                "val_loss": None,
                "val_tokens": None,
            }
            if validation_due:
                row["val_loss"], row["val_tokens"] = validation_loss()
            metrics.append(row)
            progress.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
            if progress.disable:
                log(
                    f"step {step}/{total_steps} | loss {mean_loss:.4f} | lr {lr:.3e} | "
                    f"grad norm {row['grad_norm']:.3f} | {row['tokens_per_s']:,.0f} tokens/s"
                )
            interval_start, interval_steps = now, 0
            interval_loss = torch.zeros((), device=device)
            if procs.is_main and now - metrics.saved_at > METRICS_SAVE_SECONDS:
                metrics.save()

        if checkpoint_due and procs.is_main:
            # Metrics first: a resumed run drops the rows past its checkpoint, but cannot recover
            # rows that never reached the disk.
            metrics.save()
            state = {
                "metrics": metrics.rows,
                "resolved": resolved,
                "stream": stream.state_dict(),
                "seconds": seconds_before + time.perf_counter() - loop_start,
            }
            save_checkpoint(out_dir / "ckpt", step, model, optimizer, state, config.keep_last)
    progress.close()

    seconds = seconds_before + time.perf_counter() - loop_start
    tokens = end * tokens_per_step
    trained_here = (step - start_step) * tokens_per_step
    summary = {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": trained_here / max(time.perf_counter() - loop_start, 1e-9),
        "peak_memory_bytes": peak_memory_bytes(device),
        "flops": training_flops(model_config, end, config.batch_size, seq_len),  # Eq. 10
        # The same run as PyTorch's FLOP counter sees it (matmuls only), to check Eq. 10 against.
        "flops_counted": end
        * counted_flops(model_config, config.batch_size, seq_len, training=True),
        "parameters": n_params,
        "parameters_without_embeddings": model.num_parameters(exclude_embeddings=True),
        "final_loss": metrics.rows[-1]["loss"] if metrics.rows else None,
        "resumed_from_step": start_step,
        **resolved,
    }
    if procs.is_main:
        metrics.save()
        write_atomically(
            out_dir / "summary.json",
            lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"),
        )
        metadata = {"role": role, "model_config": resolved["model_config"], "step": step}
        final = Path(weights_path) if weights_path is not None else out_dir / "model.safetensors"
        final.parent.mkdir(parents=True, exist_ok=True)
        save_weights(model, final, metadata=metadata)  # marks the run done
        mark_finished(out_dir / "ckpt", step)  # so that running it again does not resume it
        log(
            f"done: {tokens:,} tokens in {seconds:,.1f} s ({summary['tokens_per_s']:,.0f} tokens/s "
            f"here), peak memory {summary['peak_memory_bytes'] / 2**20:,.0f} MiB"
        )
    if procs.world_size > 1:
        torch.distributed.barrier()  # nobody leaves before rank 0 has written the results
    return summary
