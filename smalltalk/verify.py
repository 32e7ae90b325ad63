"""An export checked against its manifest: `export.json` records the sha256 of every file that
`smalltalk export` wrote, and this module compares each file with it.

    {name}: ok
    {name}: changed since the export (its sha256 is not the one export.json records)
    {name}: missing (export.json lists it)
    {name}: not listed in export.json

The last is said of a weights file (safetensors, `.npz`, a tokenizer model, ...) that the export
did not write, or of a file the mixture needs that the manifest does not list: either would be
read as part of the mixture without anything saying where it came from. Other unlisted files
(a `.gitattributes`, a download tool's cache) are nobody's business here.

`smalltalk.load` checks the files it reads (config, tokenizer, the routers and experts it serves,
the dense baseline) and every unlisted weights file before it reads any (`check_mixture`);
`smalltalk verify` checks every file listed (`check_export`). Expert weights zeroed or truncated
by a bad copy would otherwise serve garbage at perplexity V without a word. The digests catch
accidents, not tampering: export.json is not signed, so whoever can change the weights can
change it too. A results directory has no manifest and nothing to check.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from smalltalk.layout import EXPORT_MANIFEST, MixtureFiles

CHUNK_BYTES = 1 << 20  # read per step when hashing: a paper-scale expert is GBs
WEIGHTS_SUFFIXES = (".safetensors", ".npz", ".model", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
"""Files whose presence changes what a mixture (or transformers, in an expert's folder) loads."""

CHANGED = "changed since the export (its sha256 is not the one export.json records)"
MISSING = "missing (export.json lists it)"
UNLISTED = "not listed in export.json"
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileCheck:
    name: str
    """The file's path inside the export, as export.json spells it (`experts/e0/config.json`)."""
    problem: str | None
    """What is wrong with it, or None where it matches."""

    def line(self) -> str:
        return f"{self.name}: {self.problem or 'ok'}"


def sha256_of(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read a chunk at a time into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while size := file.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def listed_digests(root: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """export.json's `files`: {path inside the export: sha256}, checked to be one."""
    path = root / EXPORT_MANIFEST
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ValueError(f"{path}: lists no files with their sha256; nothing to check them by")
    for name, digest in files.items():
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or ".." in parts or not parts:
            raise ValueError(f"{path}: {name!r} is not a path inside the export")
        if not (isinstance(digest, str) and SHA256.fullmatch(digest)):
            raise ValueError(f"{path}: the sha256 of {name} is not 64 hex digits: {digest!r}")
    return files


def check_export(
    root: str | os.PathLike, manifest: dict[str, Any], names: Iterable[str] | None = None
) -> list[FileCheck]:
    """Each file of `names` (default: every file export.json lists) against its sha256, in
    order, then each weights file under `root` that export.json does not list."""
    root = Path(root)
    listed = listed_digests(root, manifest)
    checks = []
    for name in listed if names is None else names:
        path = root / name
        if name not in listed:
            problem = UNLISTED
        elif not path.is_file():
            problem = MISSING
        else:
            problem = None if sha256_of(path) == listed[name] else CHANGED
        checks.append(FileCheck(name, problem))
    checked = {check.name for check in checks}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if (
            path.suffix in WEIGHTS_SUFFIXES
            and name not in listed
            and name not in checked
            and path.is_file()
        ):
            checks.append(FileCheck(name, UNLISTED))
    return checks


def check_mixture(files: MixtureFiles, paths: Sequence[Path]) -> None:
    """Refuse an export whose `paths` (the files a mixture is about to read), or any weights file
    in it, fails `check_export`: a ValueError naming the first such file. A results directory
    (no manifest) passes unchecked."""
    if files.manifest is None:
        return
    names = [path.relative_to(files.root).as_posix() for path in paths]
    failed = [check for check in check_export(files.root, files.manifest, names) if check.problem]
    if failed:
        first = failed[0]
        more = f"; {len(failed) - 1} more files fail the check" if len(failed) > 1 else ""
        raise ValueError(
            f"{files.root / first.name}: {first.problem}{more} (`smalltalk verify {files.root}` "
            "lists every file; --no-verify, or verify=False, reads the export unchecked)"
        )


def mixture_paths(files: MixtureFiles, experts: Sequence[int], *, dense: bool) -> list[Path]:
    """What serving (or exporting again) `experts` of the mixture reads: its config, tokenizer,
    routers and experts, and the dense baseline's weights with `dense`."""
    paths = [files.root / "config.yaml", files.tokenizer, *files.routers(experts)]
    paths += [files.expert(e) for e in experts]
    return paths + ([files.dense] if dense else [])
