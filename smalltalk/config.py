"""The workflow configuration: one schema, checked the same way by Snakemake and the CLI.

`config.schema.yaml` (beside this file) types every key and gives its default; what JSON
Schema cannot say (fractions summing to 1, M < S) is checked here. All problems are
reported together, each naming its key, before any job starts.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators

from smalltalk.files import write_text_atomically

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
SPLITS = ("train", "val", "test")
ROLES = ("router", "expert", "dense")  # the kinds of model a run trains
DEFAULT_TOPK = 2  # experts mixed by the top-k ensemble when eval.topk is unset (or E, if fewer)


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem with its key."""


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _with_defaults(validator_class):
    """A validator that fills in schema defaults while it walks (the jsonschema FAQ recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


def _key(path) -> str:
    return ".".join(str(part) for part in path) or "(top level)"


def semantic_errors(config: dict[str, Any]) -> list[str]:
    """Checks that span several keys, which JSON Schema cannot express."""
    errors = [
        f"{_key(path)}: {value} is not a finite number"
        for path, value in _numbers(config)
        if not math.isfinite(value)
    ]
    results = config.get("results")
    if isinstance(results, str) and os.path.exists(results) and not os.path.isdir(results):
        errors.append(f"results: {results!r} is a file, not a directory for the run's results")
    errors += _split_errors(config.get("splits", {}))
    for role in ("router", "expert", "dense_large"):
        errors += _model_errors(config, role)
    errors += _routing_errors(config)
    errors += _branch_errors(config.get("training", {}))
    errors += _grow_errors(config)
    errors += _length_errors(config)
    return errors


def _split_errors(splits: dict[str, Any]) -> list[str]:
    if not all(isinstance(splits.get(name), int | float) for name in SPLITS):
        return []
    errors = []
    total = sum(splits[name] for name in SPLITS)
    if not math.isclose(total, 1.0, abs_tol=1e-9):
        errors.append(f"splits: fractions must sum to 1, got {total:g}")
    if splits["train"] <= 0:
        errors.append("splits.train: the train split must be non-empty (> 0)")
    return errors


def _routing_errors(config: dict[str, Any]) -> list[str]:
    errors = []
    routing = config.get("routing", {})
    steps = routing.get("steps_per_round")
    warmup = config.get("training", {}).get("router", {}).get("warmup_steps")
    if isinstance(steps, int) and isinstance(warmup, int) and warmup >= steps:
        errors.append(
            "training.router.warmup_steps: the warm-up (round 1 only) must be shorter than "
            f"routing.steps_per_round={steps}"
        )
    n_experts = routing.get("n_experts")
    topk = config.get("eval", {}).get("topk")
    if isinstance(n_experts, int) and isinstance(topk, int) and topk > n_experts:
        errors.append(f"eval.topk: {topk} experts to mix, but there are only E={n_experts}")
    block = routing.get("sequences_per_round")
    if (
        routing.get("method") == "smalltalk"
        and isinstance(n_experts, int)
        and isinstance(block, int)
        and n_experts >= 1
    ):
        # A balanced round gives an expert at most ceil(N / E) sequences, so the last one may be
        # left with only N - (E - 1) * ceil(N / E): a router with nothing to train on.
        fewest = block - (n_experts - 1) * -(-block // n_experts)
        if fewest < 1:
            errors.append(
                f"routing.sequences_per_round: N={block} sequences per round can leave one of "
                f"E={n_experts} routers with none to train on (at most ceil(N/E) each); use a "
                "multiple of E"
            )
    return errors


def _branch_errors(training: dict[str, Any]) -> list[str]:
    branch_steps, steps = training.get("branch_steps"), training.get("expert", {}).get("steps")
    if not (isinstance(branch_steps, int) and branch_steps > 0):
        return []
    errors = []
    if isinstance(steps, int) and branch_steps >= steps:
        errors.append(
            f"training.branch_steps: the shared steps ({branch_steps}) must be fewer than "
            f"training.expert.steps={steps}"
        )
    if training.get("dense_scale", "batch") != "batch":
        errors.append("training.branch_steps: branching needs training.dense_scale: batch")
    if training.get("dense_from"):
        errors.append("training.branch_steps: a shared dense_from baseline cannot branch")
    return errors


def _grow_errors(config: dict[str, Any]) -> list[str]:
    grow = config.get("grow") or []
    names = [entry.get("name") for entry in grow if isinstance(entry, dict)]
    errors = [
        f"grow: the name {name!r} is given more than once"
        for name in sorted({name for name in names if names.count(name) > 1})
    ]
    method = config.get("routing", {}).get("method", "smalltalk")
    if grow and method != "smalltalk":
        errors.append(
            f"grow: only a mixture routed by router LMs can grow (routing.method: smalltalk); "
            f"a fitted {method} router has no place for a new expert"
        )
    return errors


def _length_errors(config: dict[str, Any]) -> list[str]:
    """The routing prefix, the swept prefixes and the harness's questions fit a sequence."""
    errors = []
    seq_len = config.get("seq_len")
    for position, value in enumerate(config.get("eval", {}).get("prefix_lens", [])):
        if isinstance(seq_len, int) and isinstance(value, int) and value >= seq_len:
            errors.append(f"eval.prefix_lens.{position}: {value} must be shorter than seq_len")
    prefix_len = config.get("routing", {}).get("prefix_len")
    if isinstance(seq_len, int) and isinstance(prefix_len, int) and prefix_len >= seq_len:
        errors.append(
            f"routing.prefix_len: the routing prefix M={prefix_len} must be shorter than "
            f"seq_len S={seq_len}"
        )
    span = config.get("harness", {}).get("continuation_tokens")
    lengths = (seq_len, prefix_len, span)
    if all(isinstance(v, int) for v in lengths) and prefix_len + span > seq_len + 1:
        errors.append(
            f"harness.continuation_tokens: a question's M={prefix_len} tokens and its options' "
            f"{span} must fit in a sequence of S+1={seq_len + 1} tokens"
        )
    return errors


def _numbers(node, path=()):
    """(key path, value) of every float in the config: YAML reads .inf and .nan as numbers."""
    if isinstance(node, float):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _numbers(value, (*path, key))
    elif isinstance(node, list):
        for position, value in enumerate(node):
            yield from _numbers(value, (*path, position))


def _model_errors(config: dict[str, Any], role: str) -> list[str]:
    section = config.get("models", {}).get(role)
    if not isinstance(section, dict) or not isinstance(section.get("preset"), str):
        return []
    if section["preset"] not in PRESETS:
        return [
            f"models.{role}.preset: unknown preset {section['preset']!r}; one of {sorted(PRESETS)}"
        ]
    try:
        model_config(config, role, vocab_size=config.get("tokenizer", {}).get("vocab_size", 1024))
    except (ValueError, TypeError) as error:
        return [f"models.{role}: {error}"]
    return []


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` with defaults filled in; raises ConfigError listing every problem."""
    config = copy.deepcopy(config)
    validator = _with_defaults(Draft202012Validator)(load_schema())
    schema_errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    errors = [f"{_key(error.absolute_path)}: {error.message}" for error in schema_errors]
    # The checks across keys need the keys there and of the right type (not a section of null,
    # a string for a list); values out of range they can take, and are reported beside.
    if not any(error.validator in ("type", "required") for error in schema_errors):
        if config["eval"]["topk"] is None:
            config["eval"]["topk"] = min(DEFAULT_TOPK, config["routing"]["n_experts"])
        errors += semantic_errors(config)
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """Refuses a key given twice in one mapping, which plain YAML loading resolves silently."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_config(path: str | Path) -> dict[str, Any]:
    """One YAML config file as a mapping, not validated (it may be an overlay)."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as text:  # YAML's messages then name the file
            raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as error:  # a directory, no permission
        raise ConfigError(f"{path}: cannot read it: {error.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    return raw


def merge_configs(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`overlay` on top of `base`, mappings merged key by key, as Snakemake's --configfile does."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(*paths: str | Path) -> dict[str, Any]:
    """Read a YAML config file, and any overlays on top of it in order, and validate the result."""
    raw: dict[str, Any] = {}
    for path in paths:
        raw = merge_configs(raw, read_config(path))
    try:
        return validate_config(raw)
    except ConfigError as error:
        raise ConfigError(f"{' + '.join(map(str, paths))}: {error}") from None


@dataclass(kw_only=True, slots=True, frozen=True)
class DataConfig:
    """How corpus files become token sequences (stages 1-2)."""

    inputs: tuple[str, ...]
    """Glob patterns selecting the corpus files."""
    files_per_chunk: int
    """Input files per tokenize job."""
    text_field: str
    """Text field of plain JSON lines / Parquet inputs."""
    id_field: str
    """Document id field of plain JSON lines / Parquet inputs."""
    source_field: str
    """Source (domain) label field of plain JSON lines / Parquet inputs."""
    on_bad_record: str
    """'error' stops at the first bad record; 'skip' counts and drops it."""
    splits: dict[str, float]
    """Fractions of documents in train / val / test."""
    seq_len: int
    """Context length S; sequences hold S+1 tokens."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DataConfig:
        fields = config["fields"]
        return cls(
            inputs=tuple(config["inputs"]),
            files_per_chunk=config["files_per_chunk"],
            text_field=fields["text"],
            id_field=fields["id"],
            source_field=fields["source"],
            on_bad_record=config["on_bad_record"],
            splits={name: float(config["splits"][name]) for name in SPLITS},
            seq_len=config["seq_len"],
        )


@dataclass(kw_only=True, slots=True, frozen=True)
class TokenizerConfig:
    """SentencePiece training (stage 1)."""

    model: str | None
    """An existing .model to use instead of training one."""
    vocab_size: int
    """Vocabulary size V."""
    sample_bytes: int
    """Bytes of train-split text to train on."""
    sample_files: int
    """At most this many input files are read for the sample."""
    character_coverage: float
    """Characters outside this coverage are encoded as bytes."""
    seed: int
    """Seed of SentencePiece's own sampling."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TokenizerConfig:
        return cls(**config["tokenizer"], seed=config["seed"])


# ---- models and training, as the jobs receive them ------------------------------------------


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Architecture of one LM; the paper's symbols (App. A.2) are given for each field."""

    vocab_size: int = 32000
    """V: SentencePiece vocabulary size (App. A.1)."""
    seq_len: int = 1024
    """S: longest context the model accepts; all paper models use 1024 (§3.1)."""
    n_layer: int
    """L (experts, dense) or L_r (routers): number of Transformer blocks."""
    n_head: int
    """A or A_r: attention heads per block."""
    n_embd: int
    """H or H_r: hidden size."""
    ffw_expansion: int = 4
    """D_ff / H: the MLP's hidden width as a multiple of H (4 for every model in Table 1)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (0 disables it)."""
    rope_base: float = 10000.0
    """Base of the rotary frequencies (Su et al. 2024 use 10000)."""

    def __post_init__(self):
        errors = []
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "n_embd", "ffw_expansion"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                errors.append(f"{name} must be a positive integer, got {value!r}")
        if not errors and self.n_embd % self.n_head:
            errors.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        elif not errors and self.head_dim % 2:
            errors.append(
                f"n_embd / n_head = {self.head_dim} must be even: rotary embeddings rotate pairs"
            )
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if not self.rope_base > 1.0:
            errors.append(f"rope_base must be greater than 1, got {self.rope_base!r}")
        if errors:
            raise ValueError("invalid ModelConfig: " + "; ".join(errors))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def d_ff(self) -> int:
        """D_ff (App. A.2): the MLP's hidden width."""
        return self.ffw_expansion * self.n_embd

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        """A copy of `PRESETS[name]` with some fields replaced, e.g. `vocab_size=tokenizer_size`."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


# Table 1 of the paper, V = 32000 and S = 1024 (App. A.1, §3.1). The sizes in the names are the
# paper's counts, which we reproduce with tied embeddings, bias-free linear layers and RMSNorm gains
# (4.40M, 109.5M, 334.8M, 1.274B; see tests/test_model.py). Biases and LayerNorm shifts would add
# under 0.4% and round the same; untied embeddings would make the 4.4M router 7.5M. Table 1's 64M
# router (H = 416, 12 heads) is left out: 416 is not divisible by 12, and at 12 layers it would
# hold 38M parameters, so that row has a typo we cannot resolve.
PRESETS: dict[str, ModelConfig] = {
    "router-4.4m": ModelConfig(n_layer=12, n_head=12, n_embd=96),
    "router-110m": ModelConfig(n_layer=12, n_head=12, n_embd=768),
    "expert-335m": ModelConfig(n_layer=24, n_head=16, n_embd=1024),
    "expert-1.3b": ModelConfig(n_layer=24, n_head=16, n_embd=2048),
    # Laptop-CPU demos: override vocab_size with the tokenizer's and seq_len with the data's.
    "demo-router": ModelConfig(vocab_size=4096, seq_len=256, n_layer=2, n_head=2, n_embd=32),
    "demo-expert": ModelConfig(vocab_size=4096, seq_len=256, n_layer=4, n_head=4, n_embd=128),
    "tiny": ModelConfig(vocab_size=256, seq_len=64, n_layer=1, n_head=2, n_embd=32),
}


# The schema is the one source of defaults: a TrainConfig built in Python trains as the workflow
# does unless told otherwise.
TRAINING_DEFAULTS = {
    key: spec["default"]
    for key, spec in load_schema()["$defs"]["training"]["properties"].items()
    if "default" in spec
}


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """How one model is trained. The paper's values (App. A.1, Tables 1-2) are noted per field."""

    steps: int | None = None
    """Optimizer steps to train. Give exactly one of `steps` and `max_tokens`."""
    max_tokens: int | None = None
    """Token budget instead of `steps`: floor(max_tokens / tokens per step) steps, never more."""
    batch_size: int = TRAINING_DEFAULTS["batch_size"]
    """Sequences per optimizer step over all processes and micro-batches (Table 2: 32 routers,
    128 experts, 512-2048 dense)."""
    grad_accum: int = TRAINING_DEFAULTS["grad_accum"]
    """Micro-batches per optimizer step; a process holds batch_size / (grad_accum · world size)
    sequences at a time."""
    schedule: str = "auto"
    """'cosine': linear warm-up, then cosine decay to `min_lr` (experts, dense); 'constant':
    linear warm-up, then `lr` (routers, App. A.1); 'auto': chosen by the role."""
    lr: float = TRAINING_DEFAULTS["lr"]
    """Peak learning rate (experts 5e-4, routers 1e-4, §3.1)."""
    min_lr: float = TRAINING_DEFAULTS["min_lr"]
    """Learning rate the cosine schedule reaches at the last step."""
    warmup_steps: int = TRAINING_DEFAULTS["warmup_steps"]
    """Steps of linear warm-up (experts 3000, routers 1000). Routers continuing from the previous
    EM round warm up only in the first round: later rounds pass 0."""
    weight_decay: float = TRAINING_DEFAULTS["weight_decay"]
    """AdamW decoupled weight decay on matrices and embeddings, not on norm gains."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW (β1, β2)."""
    grad_clip: float = TRAINING_DEFAULTS["grad_clip"]
    """Largest global gradient L2 norm; larger gradients are scaled down. 0 disables clipping."""
    seed: int = 0
    """Seeds weight initialisation, data order and dropout."""
    shuffle_buffer: int = TRAINING_DEFAULTS["shuffle_buffer"]
    """Rows permuted together by the data stream (memory: rows · (S+1) tokens)."""
    ckpt_every: int = TRAINING_DEFAULTS["ckpt_every"]
    """Steps between checkpoints (K); 0 disables them."""
    keep_last: int = TRAINING_DEFAULTS["keep_last"]
    """Checkpoints kept (k); older ones are deleted."""
    log_every: int = TRAINING_DEFAULTS["log_every"]
    """Steps between rows of `metrics.parquet` (each costs one device sync)."""
    device: str = "auto"
    """'auto' (CUDA if present, else CPU), 'cpu' or 'cuda'."""
    precision: str = TRAINING_DEFAULTS["precision"]
    """'bf16' autocast, 'fp32', or 'auto': bf16 on CUDA and on CPUs with native bf16 dot
    products (AVX512-BF16, AMX), fp32 elsewhere. Weights and optimizer stay fp32 (App. A.1)."""
    compile: bool | str = TRAINING_DEFAULTS["compile"]
    """torch.compile the model: True, False, or 'auto': on CUDA always, on the CPU only for a run
    long enough to pay back the compile time (`smalltalk.runtime.resolve_compile`)."""
    threads: int | None = None
    """CPU threads for PyTorch's kernels (torch.set_num_threads); None keeps PyTorch's default."""

    def __post_init__(self):
        errors = []
        if (self.steps is None) == (self.max_tokens is None):
            errors.append("give exactly one of steps and max_tokens")
        for name in ("steps", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.append(f"{name} must be at least 1, got {value}")
        for name in ("batch_size", "grad_accum", "shuffle_buffer", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "ckpt_every", "weight_decay", "grad_clip", "min_lr"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.grad_accum >= 1 and self.batch_size % self.grad_accum:
            errors.append(f"batch_size {self.batch_size} is not divisible by grad_accum")
        if self.steps is not None and self.steps >= 1 and self.warmup_steps >= self.steps:
            errors.append(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        if not self.lr > 0:
            errors.append(f"lr must be positive, got {self.lr}")
        elif self.min_lr > self.lr:
            errors.append(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            errors.append(f"betas must be two numbers in [0, 1), got {self.betas}")
        choices = {
            "schedule": ("auto", "cosine", "constant"),
            "device": ("auto", "cpu", "cuda"),
            "precision": ("auto", "bf16", "fp32"),
            "compile": (True, False, "auto"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                errors.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.threads is not None and self.threads < 1:
            errors.append(f"threads must be at least 1 or None, got {self.threads}")
        if errors:
            raise ValueError("invalid TrainConfig: " + "; ".join(errors))

    def total_steps(self, tokens_per_step: int) -> int:
        """Optimizer steps of the run: `steps`, or as many whole steps as `max_tokens` pays for."""
        if self.steps is not None:
            return self.steps
        steps = self.max_tokens // tokens_per_step
        if steps <= self.warmup_steps:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) pays for {steps} steps of {tokens_per_step} "
                f"tokens: it must be more than warmup_steps ({self.warmup_steps})"
            )
        return steps


def resolved_config_text(config: dict[str, Any]) -> str:
    """The validated config (overrides included) as the YAML file that jobs read."""
    text = "# Resolved by the workflow from config.yaml and command-line overrides.\n"
    return text + yaml.safe_dump(config, sort_keys=False)


def write_resolved_config(config: dict[str, Any], path: str | Path) -> Path:
    """Write the resolved config for jobs to read; untouched if unchanged.

    Leaving an identical file alone keeps its mtime, so re-planning never looks like a change.
    """
    path = Path(path)
    text = resolved_config_text(config)
    if path.is_file() and path.read_text() == text:
        return path
    return write_text_atomically(text, path)


def model_config(config: dict[str, Any], role: str, *, vocab_size: int):
    """The ModelConfig of a role ('router', 'expert' or 'dense_large'; the dense baselines are
    experts): its preset, the config's overrides, V from the tokenizer and S from seq_len.
    `models.dense_large: null` is the expert at twice its width (the paper's 335M -> 1.3B)."""
    if role == "dense_large" and config["models"].get("dense_large") is None:
        expert = model_config(config, "expert", vocab_size=vocab_size)
        return dataclasses.replace(expert, n_embd=2 * expert.n_embd)
    section = dict(config["models"][role])
    preset = PRESETS[section.pop("preset")]
    return dataclasses.replace(preset, vocab_size=vocab_size, seq_len=config["seq_len"], **section)


def train_config(
    config: dict[str, Any],
    role: str,
    *,
    steps: int,
    seed_offset: int = 0,
    first_round: bool = True,
    threads: int | None = None,
):
    """The TrainConfig of a job. Routers warm up in EM round 1 only and then keep a constant
    learning rate (App. A.1); experts and the dense baseline warm up and decay (cosine)."""
    section = dict(config["training"]["router" if role == "router" else "expert"])
    section.pop("steps", None)
    if not first_round:
        section["warmup_steps"] = 0
    return TrainConfig(steps=steps, seed=config["seed"] + seed_offset, threads=threads, **section)


def router_train_prefix_len(config: dict[str, Any]) -> int | None:
    """Tokens of each sequence a router learns: the first M, which give the M-1 predictions it
    is scored on (Eq. 9), or all of them (None) with `routing.train_on: sequence`."""
    routing = config["routing"]
    return routing["prefix_len"] - 1 if routing["train_on"] == "prefix" else None


def eval_prefix_lens(config: dict[str, Any]) -> list[int]:
    """The routing prefixes M-hat swept at evaluation: the configured ones, or powers of two from
    8 below M; M itself always, since it is what the shards were routed with."""
    prefix_len = config["routing"]["prefix_len"]
    lengths = set(config["eval"]["prefix_lens"])
    if not lengths:
        lengths = {2**k for k in range(3, 16) if 2**k < prefix_len}
    return sorted(lengths | {prefix_len})
