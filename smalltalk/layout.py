"""Where a trained mixture's files are: one resolver for a results directory and its exports.

    {root}/config.yaml                      the run's resolved config (the workflow writes it)
    {root}/tokenizer/spm.model              or, in a results directory, `tokenizer.model`
    {root}/routers/final/e{e}.safetensors   router e (`routing.method: smalltalk`; grown ones too)
    {root}/routers/{method}.npz             the fitted router of a baseline method
    {root}/experts/e{e}/model.safetensors   expert e
    {root}/dense/model.safetensors          or, in a results directory, `training.dense_from`
    {root}/shards/expert={e}/*.parquet      EM expert e's training data (a results directory only)
    {root}/segmentation/check.json          the shards, each listed with its rows, found complete
    {root}/export.json                      an export only: which experts it holds, its files

`smalltalk export` copies each file of a results directory to the place this resolver gives it
in the export (`smalltalk.export`), so `smalltalk.load` reads both through the same code. An
export keeps the run's config as it was; the manifest tells the resolver that the files the
config points outside the directory (a shared tokenizer or dense baseline) are inside it now.
Everything here is data: YAML, JSON, safetensors, SentencePiece and `.npz` without pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smalltalk.config import load_config

EXPORT_MANIFEST = "export.json"


@dataclass(frozen=True)
class MixtureFiles:
    """The files of one trained mixture, from its resolved config (and manifest, if exported)."""

    root: Path
    config: dict[str, Any] = field(repr=False)
    manifest: dict[str, Any] | None = field(repr=False)
    """`export.json` of an export; None for a results directory."""
    tokenizer: Path
    dense: Path
    """The dense baseline's weights (an export holds them only if made with `--dense`)."""

    @property
    def exported(self) -> bool:
        return self.manifest is not None

    @property
    def n_experts(self) -> int:
        """Experts 0..E-1 of the run's EM, then one per `grow` entry: E + k in all."""
        return self.config["routing"]["n_experts"] + len(self.grown)

    @property
    def grown(self) -> tuple[str, ...]:
        """The names of the corpora added later (`grow`): experts E, E + 1, ..."""
        return tuple(entry["name"] for entry in self.config.get("grow") or [])

    @property
    def method(self) -> str:
        return self.config["routing"].get("method", "smalltalk")

    @property
    def available_experts(self) -> tuple[int, ...]:
        """The experts whose files are here: all E in a results directory, those exported."""
        if self.manifest is not None:
            return tuple(self.manifest["experts"])
        return tuple(range(self.n_experts))

    def expert(self, e: int) -> Path:
        return self.root / "experts" / f"e{e}" / "model.safetensors"

    def routers(self, experts: Iterable[int]) -> list[Path]:
        """The final routers of `experts`: one LM each, or the one fitted baseline for all."""
        if self.method == "smalltalk":
            return [self.root / "routers" / "final" / f"e{e}.safetensors" for e in experts]
        return [self.root / "routers" / f"{self.method}.npz"]

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def shard_check(self) -> Path:
        """The shard check's report, which lists every shard (`smalltalk.shard.checked_shards`)."""
        return self.root / "segmentation" / "check.json"


def mixture_files(root: str | os.PathLike) -> MixtureFiles:
    """Resolve the files of the mixture in `root`, a results directory or an export."""
    root = Path(root).resolve()  # later changes of directory do not matter
    config_path = root / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path}: not a trained results directory (the workflow writes its resolved "
            "config there)"
        )
    config = load_config(config_path)
    manifest = read_manifest(root)
    given_tokenizer = config["tokenizer"].get("model")
    dense_from = config["training"].get("dense_from")  # a baseline shared between runs
    if manifest is None and given_tokenizer:
        tokenizer = workflow_path(root, config, given_tokenizer)
    else:
        tokenizer = root / "tokenizer" / "spm.model"
    if manifest is None and dense_from:
        dense = workflow_path(root, config, dense_from) / "model.safetensors"
    else:
        dense = root / "dense" / "model.safetensors"
    return MixtureFiles(
        root=root, config=config, manifest=manifest, tokenizer=tokenizer, dense=dense
    )


def workflow_path(root: Path, config: dict[str, Any], given: str) -> Path:
    """A path from the config: relative ones are relative to the directory the workflow ran in,
    the one in which the `results` key names the results directory `root`."""
    path = Path(given)
    if path.is_absolute():
        return path
    candidates = [path, root / path]
    results = Path(config["results"])
    here = root.parts
    if not results.is_absolute() and here[len(here) - len(results.parts) :] == results.parts:
        candidates.insert(0, Path(*here[: len(here) - len(results.parts)]) / path)
    return next((c for c in candidates if c.exists()), candidates[0])


def read_manifest(root: Path) -> dict[str, Any] | None:
    """`root/export.json`, checked, or None where there is none (a results directory)."""
    path = root / EXPORT_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a SmallTalk export manifest ({error})") from None
    experts = manifest.get("experts") if isinstance(manifest, dict) else None
    if not (
        isinstance(experts, list)
        and experts
        and all(isinstance(e, int) and not isinstance(e, bool) for e in experts)
    ):
        raise ValueError(f"{path}: not a SmallTalk export manifest (no list of experts)")
    return manifest


def served_experts(
    requested: Sequence[int] | None, available: Sequence[int], n_experts: int
) -> tuple[int, ...]:
    """The experts to serve, ascending: `requested`, checked against the run's E and the experts
    whose files are here, or all `available` when None. Errors name every problem at once."""
    if requested is None:
        return tuple(sorted(available))
    requested = list(requested)
    if not requested:
        raise ValueError("experts: the list is empty; serve at least one expert")
    errors = []
    wrong = [e for e in requested if isinstance(e, bool) or not isinstance(e, int)]
    if wrong:
        raise ValueError(f"experts: not expert indices: {', '.join(map(repr, wrong))}")
    unknown = sorted({e for e in requested if not 0 <= e < n_experts})
    if unknown:
        listed = ", ".join(map(str, unknown))
        errors.append(f"no expert {listed} (this mixture has experts 0..{n_experts - 1})")
    absent = sorted({e for e in requested if 0 <= e < n_experts and e not in available})
    if absent:
        errors.append(
            f"expert {', '.join(map(str, absent))} not here (this export holds experts "
            f"{', '.join(map(str, sorted(available)))})"
        )
    repeated = sorted({e for e in requested if requested.count(e) > 1})
    if repeated:
        errors.append(f"expert {', '.join(map(str, repeated))} given more than once")
    if errors:
        raise ValueError("experts: " + "; ".join(errors))
    return tuple(sorted(requested))


def final_router_paths(results: str, method: str, n_experts: int) -> list[str]:
    """A run's final routers: the E router LMs of the round that ended EM, copied where they
    do not depend on that round, or the fitted baseline."""
    if method == "smalltalk":
        return [
            os.path.join(results, "routers", "final", f"e{e}.safetensors") for e in range(n_experts)
        ]
    return [os.path.join(results, "routers", f"{method}.npz")]
