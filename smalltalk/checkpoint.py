"""Checkpoints that let a run go on exactly where it stopped, and weights files.

    out_dir/ckpt/step-00001200/
        model.safetensors   weights of the plain module (no `_orig_mod.` / `module.` prefixes)
        state.pt            step, optimizer, RNG states, data cursor, resolved configs

A checkpoint is written into a hidden temporary directory beside it and renamed into place in one
`os.replace`, so a crash never leaves a half-written `step-*` that looks complete (nanoGPT saves
over its only `ckpt.pt`). `state.pt` holds tensors and plain containers only and is read back with
`torch.load(weights_only=True)`, which cannot run code from the file: RNG states are converted to
tensors and tuples of ints on the way in and back on the way out.

A training that finished leaves `out_dir/ckpt/finished` beside its checkpoints: they are kept
to look at but never resumed, since running a finished job again means training it again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_file

from smalltalk.config import ModelConfig
from smalltalk.files import atomic_path, naming_a_full_disk
from smalltalk.model import LM, rotary_tables

CHECKPOINT_DIR = re.compile(r"step-(\d{8})")
# The fields of a ModelConfig that make a model what it is; no tensor's shape records n_head,
# seq_len or rope_base, so they are compared with the config the weights file records.
ARCHITECTURE = (
    "vocab_size",
    "seq_len",
    "n_layer",
    "n_head",
    "n_embd",
    "ffw_expansion",
    "rope_base",
)
TIED = ("lm_head.weight", "wte.weight")  # one tensor, stored under one of these names
WEIGHTS, STATE, FINISHED = "model.safetensors", "state.pt", "finished"
METADATA_KEY = "smalltalk"  # our header entry, the only one


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`),
    so saved names carry neither prefix and load into an uncompiled single-process model."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ---- weights --------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _distinct_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor (the tied embedding) once, under its first name
    in sorted order, as safetensors' save_model keeps it; loading ties it again."""
    tensors, seen = {}, set()
    for name, tensor in sorted(model.state_dict().items()):
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if view not in seen:
            seen.add(view)
            tensors[name] = tensor.contiguous()
    return tensors


def save_weights(model: torch.nn.Module, path: str | os.PathLike, metadata: dict | None = None):
    """Write weights as safetensors, atomically. The tied embedding is stored once; `metadata`
    (JSON-encoded into the header, e.g. the model config) makes the file self-describing.

    The same weights and metadata give the same bytes. safetensors writes the header's metadata
    from a randomly seeded hash map, so it must hold one entry: not save_model, which adds one
    per dropped tied name."""
    with atomic_path(path) as tmp:
        try:
            save_file(
                _distinct_tensors(unwrap(model)),
                str(tmp),
                metadata={METADATA_KEY: json.dumps(metadata or {})},
            )
        except SafetensorError as error:
            # An I/O error comes as text ("... (os error 28)"); a full disk must read as one.
            code = re.search(r"\(os error (\d+)\)", str(error))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1]))) from error
        _fsync(tmp)


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load safetensors weights into `model` in place; every name must match."""
    load_safetensors_model(
        unwrap(model), path, strict=True, device=str(next(model.parameters()).device)
    )


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored by `save_weights` (empty for files written otherwise)."""
    with safe_open(path, framework="pt") as weights:
        return json.loads((weights.metadata() or {}).get(METADATA_KEY, "{}"))


# ---- RNG states as tensors and plain tuples (what weights_only=True accepts) -----------------


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next)
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": numpy_state["state"]["pos"],
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {
                "key": numpy_state["key"].numpy().astype(np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        # The GPUs this process sees; a run resumed on fewer than it was saved on has no others.
        for index, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


# ---- checkpoints ----------------------------------------------------------------------------


def checkpoint_steps(ckpt_dir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints in `ckpt_dir`, ascending."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for entry in ckpt_dir.iterdir():
        match = CHECKPOINT_DIR.fullmatch(entry.name)
        if match and (entry / WEIGHTS).is_file() and (entry / STATE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"step-{step:08d}"


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    steps = checkpoint_steps(ckpt_dir)
    return checkpoint_path(ckpt_dir, steps[-1]) if steps else None


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`.

    `state` holds what else the run needs to go on (data cursor, configs, counters); it must be
    made of tensors, numbers, strings and containers of them. RNG states are added here.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".tmp-*"):  # left by a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    final = checkpoint_path(ckpt_dir, step)
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        save_weights(model, tmp / WEIGHTS)
        payload = {
            **state,
            "step": step,
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(),
        }
        with naming_a_full_disk(tmp / STATE):
            torch.save(payload, tmp / STATE)
        _fsync(tmp / STATE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # only when a run is resumed from an older copy of this same step
        shutil.rmtree(final)
    os.replace(tmp, final)

    for old in checkpoint_steps(ckpt_dir)[:-keep_last]:
        # Rename before deleting so a crash mid-delete leaves nothing named like a checkpoint.
        doomed = ckpt_dir / f".tmp-delete-{old:08d}"
        os.replace(checkpoint_path(ckpt_dir, old), doomed)
        shutil.rmtree(doomed)
    return final


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """Checkpoint `path`'s state (step, optimizer, RNG, data cursor, configs), restoring nothing:
    enough to decide whether to resume it."""
    return torch.load(Path(path) / STATE, map_location="cpu", weights_only=True)


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states from checkpoint `path` (its `state`, if already
    read); return the rest of its state (step, data cursor, configs ...)."""
    path = Path(path)
    load_weights(model, path / WEIGHTS)
    state = dict(read_state(path) if state is None else state)
    optimizer.load_state_dict(state.pop("optimizer"))  # moves the moments to the parameters' device
    set_rng_state(state.pop("rng"))
    return state


def mark_finished(ckpt_dir: str | os.PathLike, step: int) -> None:
    """Record that the training writing `ckpt_dir` finished (at `step`): never resume it."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_dir():
        tmp = ckpt_dir / f".tmp-{FINISHED}-{os.getpid()}"
        tmp.write_text(f"finished at step {step}; these checkpoints are not resumed\n")
        os.replace(tmp, ckpt_dir / FINISHED)


def is_finished(ckpt_dir: str | os.PathLike) -> bool:
    return (Path(ckpt_dir) / FINISHED).is_file()


def remove_checkpoints(ckpt_dir: str | os.PathLike) -> None:
    """Delete `ckpt_dir`, renamed first so that a crash mid-delete leaves no checkpoint behind."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists():
        doomed = ckpt_dir.with_name(f".{ckpt_dir.name}-delete-{os.getpid()}")
        os.replace(ckpt_dir, doomed)
        shutil.rmtree(doomed)


def resolve_device(device: str) -> str:
    """ "auto": CUDA when present, else the CPU; any other name as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_architecture(config: ModelConfig, weights: str | os.PathLike) -> None:
    """Refuse weights that are not those of `LM(config)`, reading the file's header only.

    A results directory's or an export's config.yaml is what builds each model: one that says
    `models.router.n_embd: 4000000` would have the model allocated (terabytes) before a weight
    is read, and one that says `seq_len: 65536` would serve past the context the weights
    learned. So every tensor's name and shape in the header are compared with those of the model
    `config` builds on the meta device (which allocates nothing), and the architecture the file
    records, where it does (training's `model_config` in the header, or the config.json of an
    export's Hugging Face folder beside it), field by field."""
    try:
        with safe_open(weights, framework="pt") as file:
            names = file.keys()  # a safe_open handle is no mapping: it cannot be iterated
            stored = {name: list(file.get_slice(name).get_shape()) for name in names}
            metadata = file.metadata() or {}
    except SafetensorError as error:  # cut short, empty, not safetensors
        raise ValueError(f"{weights}: not weights of this model ({error})") from None
    expected = _tensor_shapes(dataclasses.astuple(config))
    for name, shape in sorted(stored.items()):
        if name in expected and expected[name] != shape:
            raise ValueError(
                f"{weights}: tensor {name} is {shape} in the file but {expected[name]} in the "
                f"model the config describes ({_config_line(config)}); the config is not that "
                "of these weights"
            )
    missing = sorted(
        set(expected) - set(stored) - (set(TIED) if set(TIED) & set(stored) else set())
    )
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        lacks = f"lacks {_first(missing)} of" if missing else f"holds {_first(extra)} beyond"
        raise ValueError(
            f"{weights}: the file {lacks} the model the config describes "
            f"({_config_line(config)}); the config is not that of these weights"
        )
    recorded, where = _recorded_architecture(Path(weights), metadata)
    for field in ARCHITECTURE:
        if field in recorded and recorded[field] != getattr(config, field):
            raise ValueError(
                f"{weights}: these weights are of a model with {field} = {recorded[field]} "
                f"({where}), but the config gives {field} = {getattr(config, field)}"
            )


@functools.lru_cache(maxsize=8)
def _tensor_shapes(config_fields: tuple) -> dict[str, list[int]]:
    """The state dict's tensor shapes of `LM(ModelConfig(*config_fields))`, built on meta."""
    names = [field.name for field in dataclasses.fields(ModelConfig)]
    with torch.device("meta"):
        model = LM(ModelConfig(**dict(zip(names, config_fields, strict=True))))
    return {name: list(tensor.shape) for name, tensor in model.state_dict().items()}


def _recorded_architecture(weights: Path, metadata: dict[str, str]) -> tuple[dict, str]:
    """The ModelConfig fields a weights file records, and where: training writes them into the
    header (`save_weights`), an export into the config.json beside `model.safetensors`."""
    try:
        recorded = json.loads(metadata.get(METADATA_KEY, "{}")).get("model_config")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(
            f"{weights}: its header's '{METADATA_KEY}' entry is not a JSON object"
        ) from None
    if isinstance(recorded, dict):
        return recorded, "recorded in its header"
    beside = weights.with_name("config.json")
    if weights.name == WEIGHTS and beside.is_file():
        try:
            hf_config = json.loads(beside.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{beside}: not valid JSON ({error})") from None
        if isinstance(hf_config, dict) and hf_config.get("model_type") == "smalltalk":
            return hf_config, f"recorded in {beside}"
    return {}, ""


def _config_line(config: ModelConfig) -> str:
    return ", ".join(f"{field} = {getattr(config, field)}" for field in ARCHITECTURE[:-1])


def _first(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"tensor{'s' if len(names) > 1 else ''} " + ", ".join(names[:shown]) + more


def load_model(config: ModelConfig, weights: str | os.PathLike, device: str = "auto") -> LM:
    """`LM(config)` in eval mode on `device` with the weights of a safetensors file.

    The model is built on the meta device and materialised uninitialised, since the file
    overwrites every parameter: a 335M expert's random initialisation alone takes seconds.
    """
    device = resolve_device(device)
    check_architecture(config, weights)  # before a byte is allocated for the model
    with torch.device("meta"):
        model = LM(config)
    model = model.to_empty(device=device)
    model.lm_head.weight = model.wte.weight  # to_empty unties them; the file holds one copy
    cos, sin = rotary_tables(config.head_dim, config.seq_len, config.rope_base)
    model.rope_cos.copy_(cos)  # derived buffers are not in the file
    model.rope_sin.copy_(sin)
    try:
        load_weights(model, weights)
    except (SafetensorError, RuntimeError) as error:  # cut short, empty, or another model's
        raise ValueError(f"{weights}: not weights of this model ({error})") from None
    return model.eval()
