"""The training loop and its data stream: schedules, optimizer groups, gradient accumulation,
learning, metrics, budgets, and the stream's filters, cursor and memory bound."""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, load_model, save_model

import smalltalk.train
from smalltalk.checkpoint import WEIGHTS
from smalltalk.config import PRESETS, load_config, model_config, train_config
from smalltalk.files import fingerprint
from smalltalk.flops import training_flops
from smalltalk.model import LM
from smalltalk.runtime import (
    CPU_LOSS_ROWS,
    FP32_ATTENTION_MAX_HEAD_DIM,
    autocast_context,
    cpu_supports_bf16,
    fp32_attention,
    loss_rows,
    resolve_compile,
    resolve_precision,
)
from smalltalk.stream import TokenStream
from smalltalk.train import METRICS_SCHEMA, TrainConfig, fit, learning_rate, train_step

REPO = Path(__file__).resolve().parents[1]

TINY = dataclasses.replace(PRESETS["tiny"], vocab_size=64, seq_len=32)


def write_tokens(
    path: Path,
    n_rows: int,
    *,
    seq_len: int = 32,
    vocab_size: int = 64,
    first_seq_id: int = 0,
    row_group_size: int = 64,
    seed: int = 0,
) -> Path:
    """A token Parquet file as the tokenizer writes it: seq_id, tokens (S+1 uint16), source.

    Each row counts up from a random start with a random stride of 1-3 (mod V): a structure a tiny
    model learns in seconds. Token 0 of each row is its seq_id mod V, so tests can tell rows apart.
    """
    rng = np.random.default_rng(seed)
    seq_ids = np.arange(first_seq_id, first_seq_id + n_rows, dtype=np.int64)
    strides = rng.integers(1, 4, n_rows)
    tokens = (seq_ids[:, None] + strides[:, None] * np.arange(seq_len + 1)) % vocab_size
    offsets = pa.array(np.arange(n_rows + 1, dtype=np.int32) * (seq_len + 1))
    table = pa.table(
        {
            "seq_id": pa.array(seq_ids),
            "tokens": pa.ListArray.from_arrays(offsets, pa.array(tokens.ravel().astype(np.uint16))),
            "source": pa.array(["synthetic"] * n_rows),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture
def token_dir(tmp_path: Path) -> Path:
    """Three files of 160 rows in row groups of 64: 480 sequences of S = 32 tokens."""
    for i in range(3):
        write_tokens(tmp_path / "tokens" / f"{i}.parquet", 160, first_seq_id=1000 * i, seed=i)
    return tmp_path / "tokens"


@pytest.fixture(autouse=True)
def keep_thread_count():
    """fit(threads=1) sets PyTorch's thread count for the whole process: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def config(**overrides) -> TrainConfig:
    """Small steps on one thread: on a busy machine, more threads mostly wait for each other."""
    values = dict(
        steps=20, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=2, precision="fp32", threads=1
    )
    return TrainConfig(**(values | overrides))


# ---- TrainConfig ----------------------------------------------------------------------------


def test_config_reports_every_bad_field_by_name():
    with pytest.raises(ValueError) as error:
        TrainConfig(steps=10, warmup_steps=10, batch_size=6, grad_accum=4, precision="fp16")
    message = str(error.value)
    for expected in ("warmup_steps (10) must be < steps (10)", "grad_accum", "precision"):
        assert expected in message
    with pytest.raises(ValueError, match="exactly one of steps and max_tokens"):
        TrainConfig(steps=10, max_tokens=1000)
    with pytest.raises(ValueError, match="exactly one of steps and max_tokens"):
        TrainConfig()


def test_token_budget_buys_whole_steps_only():
    assert TrainConfig(max_tokens=1000, batch_size=4).total_steps(tokens_per_step=4 * 32) == 7
    with pytest.raises(ValueError, match="max_tokens"):
        TrainConfig(max_tokens=1000, batch_size=4, warmup_steps=7).total_steps(128)


# ---- schedules (App. A.1) -------------------------------------------------------------------


def test_cosine_warms_up_linearly_then_decays_to_min_lr():
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [learning_rate(step, cfg, "cosine", 100) for step in range(100)]
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(1e-4)
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=0.05)  # halfway


def test_constant_warms_up_then_holds():
    cfg = TrainConfig(steps=50, lr=1e-4, warmup_steps=5)
    lrs = [learning_rate(step, cfg, "constant", 50) for step in range(50)]
    assert lrs[4] == pytest.approx(1e-4) and lrs[0] == pytest.approx(2e-5)
    assert lrs[5:] == [1e-4] * 45
    no_warmup = TrainConfig(steps=50, lr=1e-4, warmup_steps=0)  # later EM rounds
    assert learning_rate(0, no_warmup, "constant", 50) == 1e-4


# ---- optimizer and step ---------------------------------------------------------------------


def test_weight_decay_applies_to_matrices_and_embeddings_only():
    model = LM(TINY)
    optimizer = model.configure_optimizer(1e-3, 0.1, (0.9, 0.99), "cpu")
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(
        p.dim() < 2 for p in plain["params"]
    )
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == (
        model.num_parameters()
    )
    assert optimizer.defaults["betas"] == (0.9, 0.99)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_two_accumulated_micro_batches_equal_one_batch_of_twice_the_size(device: str):
    torch.manual_seed(0)
    inputs = torch.randint(0, TINY.vocab_size, (8, 32), device=device)
    targets = torch.randint(0, TINY.vocab_size, (8, 32), device=device)
    results = []
    for micro_batches in (
        [(inputs, targets)],
        [(inputs[:4], targets[:4]), (inputs[4:], targets[4:])],
    ):
        torch.manual_seed(1)
        model = LM(TINY).to(device)
        # Plain SGD, whose step is linear in the gradient. AdamW's first step moves each weight
        # by lr · g / (|g| + 1e-8), about ±lr whatever |g| is: a gradient that cancels to ~1e-9
        # keeps a rounding error ~1e-11 from summing in another order (as other kernels, another
        # CPU's or CUDA's, do), and AdamW turns it into a weight difference of ~1e-5.
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        loss, grad_norm = train_step(
            model,
            optimizer,
            micro_batches,
            lr=1e-2,
            grad_clip=0.1,
            autocast=autocast_context(torch.device(device), "fp32"),
        )
        results.append((loss, grad_norm, [p.detach().clone() for p in model.parameters()]))
    (loss_a, norm_a, params_a), (loss_b, norm_b, params_b) = results
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5)
    assert norm_a.item() == pytest.approx(norm_b.item(), rel=1e-4)
    for a, b in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.manual_seed(1)
    initial = [p.detach() for p in LM(TINY).to(device).parameters()]
    assert max((a - p).abs().max() for a, p in zip(params_a, initial, strict=True)) > 1e-5


def test_cpu_precision_follows_the_processor():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_supports_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"


def test_compile_auto_compiles_on_cuda_and_on_the_cpu_only_for_runs_it_pays_for(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # The shipped demo's expert job (its steps after the shared trunk) on one thread would save
    # less than compiling costs; a run 20 times as long would save more, unless spread over 64
    # threads.
    demo = load_config(REPO / "config.yaml")
    steps, batch = demo["training"]["expert"]["steps"], demo["training"]["expert"]["batch_size"]
    job_steps = steps - demo["training"]["branch_steps"]
    expert = training_flops(model_config(demo, "expert", vocab_size=1024), job_steps, batch, 128)
    assert train_config(demo, "expert", steps=steps).compile == "auto"
    for precision in ("fp32", "bf16"):
        on, why = resolve_compile("auto", cpu, expert, threads=1, precision=precision)
        assert not on and "less than compiling costs" in why and f"eager in {precision}" in why
    on, why = resolve_compile("auto", cpu, 20 * expert, threads=1, precision="fp32")
    assert on and "more than compiling costs" in why
    # A run of 4 times the expert's FLOPs: compiling repays itself in bf16, not in fp32.
    assert not resolve_compile("auto", cpu, 4 * expert, threads=1, precision="fp32")[0]
    assert resolve_compile("auto", cpu, 4 * expert, threads=1, precision="bf16")[0]
    # 64 threads: too short
    assert not resolve_compile("auto", cpu, 20 * expert, threads=64, precision="bf16")[0]
    auto_on_cuda = resolve_compile("auto", cuda, 1, threads=1, precision="bf16")
    assert auto_on_cuda == (True, "auto: always on CUDA")
    assert resolve_compile(False, cuda, 1e20, threads=1, precision="bf16")[0] is False
    assert resolve_compile(True, cpu, 1, threads=1, precision="fp32")[0] is True
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    on, why = resolve_compile("auto", cpu, 20 * expert, threads=1, precision="fp32")
    assert not on and "no C++ compiler (no-such-c++-compiler)" in why
    with pytest.raises(ValueError, match="compile must be"):
        resolve_compile("yes", cpu, 1, threads=1, precision="fp32")


def test_fp32_attention_only_where_it_was_measured_faster():
    """On the CPU in bf16 with heads of at most 32; the step's precision everywhere else."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fp32_attention(cpu, "bf16", head_dim=32)
    assert fp32_attention(cpu, "bf16", head_dim=8)
    assert fp32_attention(cpu, "bf16", head_dim=FP32_ATTENTION_MAX_HEAD_DIM)
    assert not fp32_attention(cpu, "bf16", head_dim=64)
    assert not fp32_attention(cpu, "fp32", head_dim=32)  # already fp32
    assert not fp32_attention(cuda, "bf16", head_dim=32)


def test_the_loss_is_chunked_on_the_cpu_only():
    assert loss_rows(torch.device("cpu")) == CPU_LOSS_ROWS
    assert loss_rows(torch.device("cuda")) is None


# ---- fit ------------------------------------------------------------------------------------


def test_fit_learns_and_writes_its_results(token_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "expert"
    summary = fit(TINY, config(steps=60, log_every=5, ckpt_every=25), token_dir, out, role="expert")

    metrics = pq.read_table(out / "metrics.parquet")
    assert metrics.schema.equals(METRICS_SCHEMA)
    rows = metrics.to_pylist()
    assert [r["step"] for r in rows] == list(range(5, 61, 5))
    assert rows[-1]["loss"] < 0.4 * rows[0]["loss"]  # from ~ln 64 = 4.2 to about 1
    assert rows[-1]["tokens"] == 60 * 8 * 32 and rows[-1]["lr"] == pytest.approx(1e-3)
    assert all(r["flops"] > 0 and r["tokens_per_s"] > 0 for r in rows)

    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == [
        "finished",  # kept to look at, never resumed
        "step-00000025",
        "step-00000050",
    ]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["tokens"] == summary["tokens"] == 60 * 8 * 32
    assert on_disk["schedule"] == "cosine" and on_disk["precision"] == "fp32"
    for key in ("seconds", "tokens_per_s", "peak_memory_bytes", "train_config", "model_config"):
        assert key in on_disk
    assert on_disk["flops_counted"] == pytest.approx(on_disk["flops"], rel=0.05)  # Eq. 10
    header = capsys.readouterr().err.splitlines()[0]
    assert "expert" in header and "without embeddings" in header and "FLOPs" in header


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile's imports
def test_a_compiled_run_saves_the_plain_modules_names(
    token_dir: Path, tmp_path: Path, capsys, monkeypatch
):
    # Dynamo's graph run as it is, not code-generated by Inductor (40 s here): the wrapper, whose
    # state dict prefixes every name with `_orig_mod.`, is the same.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    out = tmp_path / "compiled"
    settings = config(steps=2, warmup_steps=1, ckpt_every=1, compile=True, precision="bf16")
    summary = fit(TINY, settings, token_dir, out, role="expert")
    log = capsys.readouterr().err
    assert summary["compiled"] and "torch.compile on (compile: true in the config)" in log
    assert "attention in fp32" in log  # CPU, bf16, heads of 16
    assert f"loss in chunks of {CPU_LOSS_ROWS} positions" in log  # through Dynamo too
    for weights in (out / "model.safetensors", out / "ckpt" / "step-00000001" / WEIGHTS):
        assert set(load_file(weights)) <= set(LM(TINY).state_dict())  # no `_orig_mod.` prefix
        load_model(LM(TINY), weights)  # strict: every name of the plain module, none extra


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_run_compiled_by_inductor_learns_as_the_eager_run_does(token_dir: Path, tmp_path: Path):
    """The real compiler, fp32 attention, the chunked loss and fused AdamW included, in bf16
    (emulated where the processor has no bf16): the same losses as eager, to bf16's precision."""
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"compiled-{compiled}"
        settings = config(steps=4, warmup_steps=1, log_every=1, compile=compiled, precision="bf16")
        fit(TINY, settings, token_dir, out, role="expert")
        losses[compiled] = pq.read_table(out / "metrics.parquet").column("loss").to_pylist()
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
    assert losses[True][-1] < losses[True][0]


def test_fit_honours_a_token_budget(token_dir: Path, tmp_path: Path):
    summary = fit(
        TINY,
        config(steps=None, max_tokens=5000, warmup_steps=0),
        token_dir,
        tmp_path / "out",
        role="dense",
    )
    assert summary["steps"] == 5000 // (8 * 32) == 19
    assert summary["tokens"] == 19 * 8 * 32 <= 5000


def test_router_trains_on_prefixes_from_given_weights(token_dir: Path, tmp_path: Path):
    start = tmp_path / "previous-round.safetensors"
    torch.manual_seed(123)
    save_model(LM(TINY), str(start))
    summary = fit(
        TINY,
        config(steps=2, lr=1e-12, min_lr=0.0, warmup_steps=0),
        token_dir,
        tmp_path / "router",
        role="router",
        init_from=start,
        prefix_len=8,
        weights_path=tmp_path / "routers" / "r1" / "e0.safetensors",
    )
    assert summary["schedule"] == "constant" and summary["seq_len"] == 8
    assert summary["tokens"] == 2 * 8 * 8
    before, after = LM(TINY), LM(TINY)
    load_model(before, start)
    assert not (tmp_path / "router" / "model.safetensors").exists()
    load_model(after, tmp_path / "routers" / "r1" / "e0.safetensors")
    for a, b in zip(before.parameters(), after.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # lr 1e-12: continued from, not re-initialised


# ---- resuming only the same run ------------------------------------------------------------


class Interrupted(Exception):
    pass


def interrupted_fit(monkeypatch, at_step: int, *args, **kwargs) -> None:
    """fit() stopped right after writing checkpoint `at_step`, as by a node failure."""
    save_checkpoint = smalltalk.train.save_checkpoint

    def save_then_stop(ckpt_dir, step, *rest, **options):
        path = save_checkpoint(ckpt_dir, step, *rest, **options)
        if step == at_step:
            raise Interrupted
        return path

    with monkeypatch.context() as patch, pytest.raises(Interrupted):
        patch.setattr(smalltalk.train, "save_checkpoint", save_then_stop)
        fit(*args, **kwargs)


def test_a_finished_training_run_again_trains_afresh(token_dir: Path, tmp_path: Path, capsys):
    """What `snakemake --forcerun train_expert` does to a finished expert: it deletes the
    outputs, not the checkpoints, and asks for the training again."""
    out = tmp_path / "out"
    fit(TINY, config(steps=10, ckpt_every=4), token_dir, out, role="expert")
    (out / "model.safetensors").unlink()
    capsys.readouterr()
    summary = fit(TINY, config(steps=10, ckpt_every=4), token_dir, out, role="expert")
    log = capsys.readouterr().err
    assert summary["resumed_from_step"] == 0 and "resumed from" not in log
    assert "not resuming" in log and "finished" in log


@pytest.mark.parametrize("change", ["nothing", "data", "seq_ids", "val", "lr"])
def test_an_interrupted_run_resumes_only_with_the_same_inputs_and_settings(
    change: str, token_dir: Path, tmp_path: Path, monkeypatch, capsys
):
    """The stale resume once seen: routers retrained, shards rewritten, and each expert still
    went on from its old checkpoint for its last steps. A changed run must start afresh and end
    exactly as if it had never been interrupted."""
    val = write_tokens(tmp_path / "val" / "0.parquet", 16, first_seq_id=9000, seed=9)
    run = dict(role="expert", seq_ids=np.arange(0, 2200, 2), val_files=[val], val_every=4)
    interrupted_fit(
        monkeypatch, 4, TINY, config(steps=10, ckpt_every=4), token_dir, tmp_path / "a", **run
    )

    settings = config(steps=10, ckpt_every=4, lr=2e-2 if change == "lr" else 1e-2)
    if change == "data":  # the same sequences, other tokens: as a shard rewritten
        write_tokens(token_dir / "2.parquet", 160, first_seq_id=2000, seed=7)
    elif change == "seq_ids":
        run["seq_ids"] = np.arange(1, 2200, 2)
    elif change == "val":
        write_tokens(val, 16, first_seq_id=9000, seed=8)
    capsys.readouterr()
    resumed = fit(TINY, settings, token_dir, tmp_path / "a", **run)
    log = capsys.readouterr().err
    if change == "nothing":
        assert resumed["resumed_from_step"] == 4 and "resuming from" in log
        return
    assert resumed["resumed_from_step"] == 0
    reason = "train_config.lr" if change == "lr" else f"inputs.{change} changed"
    assert "not resuming" in log and reason in log

    fit(TINY, settings, token_dir, tmp_path / "straight", **run)
    got = pq.read_table(tmp_path / "a" / "metrics.parquet").to_pydict()
    want = pq.read_table(tmp_path / "straight" / "metrics.parquet").to_pydict()
    assert got["step"] == want["step"] and got["loss"] == want["loss"]
    assert got["val_loss"] == want["val_loss"]
    trained = load_file(tmp_path / "a" / "model.safetensors")
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    assert all(torch.equal(trained[name], straight[name]) for name in straight)


def test_a_dense_run_branched_at_a_step_ends_exactly_as_one_never_stopped(
    token_dir: Path, tmp_path: Path
):
    """BTM's seed phase costs nothing extra: the dense baseline goes on from the shared trunk
    (weights, optimizer, data cursor, curve) and ends bit-identical to a run straight through."""
    val = write_tokens(tmp_path / "val" / "0.parquet", 16, first_seq_id=9000, seed=9)
    run = dict(role="dense", val_files=[val], val_every=4)
    trunk = fit(TINY, config(steps=12), token_dir, tmp_path / "trunk", stop_at=5, **run)
    assert trunk["tokens"] == 5 * 8 * 32 and trunk["steps"] == 12
    branch_point = tmp_path / "trunk" / "ckpt" / "step-00000005"
    branched = fit(
        TINY, config(steps=12), token_dir, tmp_path / "dense", branch_from=branch_point, **run
    )
    straight = fit(TINY, config(steps=12), token_dir, tmp_path / "straight", **run)
    assert branched["branched_from_step"] == 5 and branched["flops"] == straight["flops"]
    # The curve goes on from the trunk's, which adds a point at the branch step.
    got = pq.read_table(tmp_path / "dense" / "metrics.parquet").to_pandas().set_index("step")
    want = pq.read_table(tmp_path / "straight" / "metrics.parquet").to_pandas().set_index("step")
    assert list(got.index) == sorted([*want.index, 5])
    np.testing.assert_array_equal(got.loc[want.index, "val_loss"], want["val_loss"])
    trained = load_file(tmp_path / "dense" / "model.safetensors")
    reference = load_file(tmp_path / "straight" / "model.safetensors")
    assert all(torch.equal(trained[name], reference[name]) for name in reference)


def test_an_expert_branches_from_the_trunk_and_trains_only_the_remaining_steps(
    token_dir: Path, tmp_path: Path, capsys
):
    fit(TINY, config(steps=12), token_dir, tmp_path / "trunk", role="dense", stop_at=5)
    branch_point = tmp_path / "trunk" / "ckpt" / "step-00000005"
    shard = sorted(token_dir.glob("*.parquet"))[:1]  # other data: a fresh data cursor
    capsys.readouterr()
    expert = fit(
        TINY, config(steps=12), shard, tmp_path / "e0", role="expert", branch_from=branch_point
    )
    assert f"branching from {branch_point} at step 5" in capsys.readouterr().err
    assert expert["branched_from_step"] == 5 and expert["resumed_from_step"] == 5
    assert pq.read_table(tmp_path / "e0" / "metrics.parquet").column("step").to_pylist()[0] > 5
    # It went on from the trunk's weights: one step from them moves them only a little.
    one_step = fit(TINY, config(steps=6), shard, tmp_path / "one", role="expert")
    assert one_step["final_loss"] > expert["final_loss"]
    with pytest.raises(ValueError, match="does not fit a run of 20 steps"):
        fit(TINY, config(steps=20), shard, tmp_path / "e1", role="expert", branch_from=branch_point)


def test_a_fingerprint_follows_the_content_not_the_path_or_time(tmp_path: Path):
    original = write_tokens(tmp_path / "a" / "0.parquet", 50, seed=0)
    copy = tmp_path / "b" / "0.parquet"
    copy.parent.mkdir()
    copy.write_bytes(original.read_bytes())
    assert fingerprint([copy]) == fingerprint([original])
    write_tokens(copy, 50, seed=1)  # the same sequence ids and row count, other tokens
    assert fingerprint([copy]) != fingerprint([original])
    write_tokens(copy, 49, seed=0)  # one sequence fewer
    assert fingerprint([copy]) != fingerprint([original])
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"\0" * 100)
    before = fingerprint([weights])
    weights.write_bytes(b"\0" * 99 + b"\1")
    assert fingerprint([weights]) != before


def test_bf16_autocast_trains_on_cpu(token_dir: Path, tmp_path: Path):
    summary = fit(TINY, config(steps=3, precision="bf16"), token_dir, tmp_path / "o", role="expert")
    assert summary["precision"] == "bf16" and math.isfinite(summary["final_loss"])


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile's imports
def test_the_defaults_on_cuda_train_compiled_in_bf16_and_save_plain_weights(
    token_dir: Path, tmp_path: Path
):
    matmul_precision = torch.get_float32_matmul_precision()  # fit() allows TF32 process-wide
    try:
        summary = fit(
            TINY,
            config(steps=40, log_every=5, precision="auto", device="auto"),
            token_dir,
            tmp_path / "gpu",
            role="expert",
        )
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
    assert summary["device"].startswith("cuda") and summary["compiled"]
    assert summary["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    losses = pq.read_table(tmp_path / "gpu" / "metrics.parquet").column("loss").to_pylist()
    assert losses[-1] < 0.6 * losses[0]
    load_model(LM(TINY), tmp_path / "gpu" / "model.safetensors")  # the plain module's names


# ---- the data stream ------------------------------------------------------------------------


def first_tokens(stream: TokenStream, n_batches: int) -> list[list[int]]:
    """Token 0 of every row of the next n batches: the row's seq_id mod V (see write_tokens)."""
    batches = iter(stream)
    return [next(batches)[0][:, 0].tolist() for _ in range(n_batches)]


def test_an_epoch_visits_every_row_once_in_a_seeded_order(tmp_path: Path):
    for i in range(3):  # vocabulary 2^16, so token 0 is the seq_id itself
        write_tokens(tmp_path / f"{i}.parquet", 100, vocab_size=65536, first_seq_id=100 * i)
    stream = TokenStream(tmp_path, batch_size=10, seed=3, shuffle_buffer=40)
    epochs = first_tokens(stream, 60)
    first, second = sum(epochs[:30], []), sum(epochs[30:], [])
    assert sorted(first) == sorted(second) == list(range(300))
    assert first != second and first != sorted(first)
    again = TokenStream(sorted(tmp_path.glob("*.parquet"), reverse=True), batch_size=10, seed=3)
    again.shuffle_buffer = 40
    assert sum(first_tokens(again, 30), []) == first  # listing order does not matter


def test_stream_filters_seq_ids_and_cuts_prefixes(tmp_path: Path):
    write_tokens(tmp_path / "a.parquet", 200, vocab_size=65536)
    chosen = np.arange(0, 200, 7)
    stream = TokenStream(tmp_path, batch_size=4, seq_ids=chosen, prefix_len=5)
    inputs, targets = next(iter(stream))
    assert inputs.shape == targets.shape == (4, 5) and inputs.dtype == torch.int64
    torch.testing.assert_close(inputs[:, 1:], targets[:, :-1])
    seen = sum(first_tokens(stream, 2 * math.ceil(len(chosen) / 4)), [])
    assert set(seen) == set(chosen.tolist())
    with pytest.raises(ValueError, match="no token rows"):
        next(iter(TokenStream(tmp_path, batch_size=4, seq_ids=np.array([10**9]))))


@pytest.mark.parametrize("seq_ids", [None, np.arange(0, 480, 3)])
def test_stream_resumes_from_its_cursor(token_dir: Path, seq_ids):
    def stream():
        return TokenStream(token_dir, batch_size=7, seed=5, shuffle_buffer=50, seq_ids=seq_ids)

    reference = first_tokens(stream(), 100)  # several epochs, cursors mid-buffer and mid-group
    for k in (1, 13, 68, 71):
        interrupted = stream()
        first_tokens(interrupted, k)
        resumed = stream()
        resumed.load_state_dict(interrupted.state_dict())
        assert first_tokens(resumed, 100 - k) == reference[k:]


def test_data_parallel_ranks_split_the_global_batch(token_dir: Path):
    whole = next(iter(TokenStream(token_dir, batch_size=8, seed=1)))[0]
    shares = [
        next(iter(TokenStream(token_dir, batch_size=8, seed=1, rank=r, world_size=2)))[0]
        for r in range(2)
    ]
    torch.testing.assert_close(torch.stack(shares, dim=1).reshape(8, -1), whole)


def test_stream_reads_row_groups_never_whole_files(tmp_path: Path):
    # 4096 rows of 1025 uint16 tokens = 8 MiB of tokens, in row groups of 256 rows (0.5 MiB).
    write_tokens(tmp_path / "big.parquet", 4096, seq_len=1024, vocab_size=65536, row_group_size=256)
    pool = pa.proxy_memory_pool(pa.default_memory_pool())  # counts what Arrow allocates
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        stream = TokenStream(tmp_path, batch_size=32, shuffle_buffer=256, read_rows=128)
        rows = sum(len(batch) for batch in first_tokens(stream, 4096 // 32))
        del stream
    finally:
        gc.collect()  # free every buffer of `pool` while it is still the pool they came from
        pa.set_memory_pool(previous)
    assert rows == 4096
    assert pool.max_memory() < 3 * 2**20, pool.max_memory()  # a few row groups; whole: 15 MiB


def test_stream_rejects_rows_of_other_lengths(tmp_path: Path):
    write_tokens(tmp_path / "a.parquet", 10, seq_len=32)
    write_tokens(tmp_path / "b.parquet", 10, seq_len=16)
    stream = TokenStream(sorted(tmp_path.glob("*.parquet")), batch_size=20, shuffle_buffer=20)
    with pytest.raises(ValueError, match="S\\+1 = 33"):
        next(iter(stream))
