"""Atomic writers: a failure, a full disk above all, leaves no file, final or temporary."""

from __future__ import annotations

import errno
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from conftest import fill

from smalltalk import checkpoint
from smalltalk.config import write_resolved_config
from smalltalk.files import (
    new_folders_removed_on_failure,
    write_atomically,
    write_parquet_atomically,
    write_text_atomically,
)
from smalltalk.report.style import new_figure, save
from smalltalk.report.tables import tables_html


def test_a_full_disk_names_the_file_being_written_and_leaves_no_temporary_file(
    tmp_path, monkeypatch
):
    def write_half_then_fail(self, data):
        with open(self, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")  # as Python raises it: no name

    monkeypatch.setattr(Path, "write_bytes", write_half_then_fail)
    out = tmp_path / "out" / "stats.json"
    with pytest.raises(OSError) as raised:
        write_text_atomically("x" * 1000, out)
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(out)
    assert list(out.parent.iterdir()) == []


def test_a_checkpoint_that_cannot_be_saved_leaves_no_temporary_directory(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint.save_checkpoint(tmp_path / "ckpt", 1, model, optimizer, {}, keep_last=1)
    assert list((tmp_path / "ckpt").iterdir()) == []


WRITERS = {
    "text": lambda out: write_text_atomically("x" * 100_000, out),
    "parquet": lambda out: write_parquet_atomically(pa.table({"x": range(100_000)}), out),
    "resolved config": lambda out: write_resolved_config({"x": "x" * 100_000}, out),
    "figure": lambda out: save(new_figure(6.0, 4.0), out),
    "table": lambda out: tables_html({}, out),
    "file-name writer (metrics)": lambda out: write_atomically(
        out, lambda tmp: tmp.write_bytes(b"x" * 10**5)
    ),
    "weights": lambda out: checkpoint.save_weights(torch.nn.Linear(200, 200), out),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_fails_on_a_really_full_disk_naming_the_file_and_leaving_none(
    small_disk, writer
):
    fill(small_disk)
    out = small_disk / "results" / "out"
    (small_disk / "results").mkdir()
    with pytest.raises(OSError) as raised:
        WRITERS[writer](out)
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(out)
    assert list(out.parent.iterdir()) == []


def test_a_failed_block_removes_the_empty_folders_it_made_and_no_other(tmp_path):
    (tmp_path / "there").mkdir()
    made = [tmp_path / "there" / "new", tmp_path / "a" / "b" / "c", tmp_path / "a" / "d"]
    with pytest.raises(OSError), new_folders_removed_on_failure(made):
        for folder in made:
            folder.mkdir(parents=True)
        (tmp_path / "a" / "d" / "theirs").write_text("another job's file")
        raise OSError(errno.ENOSPC, "No space left on device")
    left = sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*"))
    assert left == ["a", "a/d", "a/d/theirs", "there"]

    with new_folders_removed_on_failure(made):  # a block that succeeds keeps what it made
        for folder in made:
            folder.mkdir(parents=True, exist_ok=True)
    assert all(folder.is_dir() for folder in made)
