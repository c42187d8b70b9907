"""Files below every format: written whole or not at all, and config.json read with errors that name the file.

    atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    with atomic_folder(out) as tmp:                  # fill tmp; it becomes `out` only when the block succeeds
        save_model(model, tmp)

A file is written to a fresh temporary name beside it, flushed to disk and renamed over the target, so a reader
sees the old file or the new one, never half of one, and a failed write leaves no temporary behind. Written files
get the permissions of any file created in that folder (0o666, or 0o777 with ``mode=``, less the umask), whatever
the writer does: safetensors' ``save_file``, for one, creates its files 0600.

Used by r1kit.checkpoint and r1kit.quant.checkpoint (CheckpointError, read_config_json), training checkpoints
and the tokenizer (r1kit.train), the compiled kernels (r1kit.kernels) and ``r1kit quantize``. Imports nothing
from r1kit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not match its config. The message names it."""


def read_config_json(folder: str | Path) -> dict[str, Any]:
    """The config.json object of a checkpoint folder; CheckpointError naming the file when it is missing, is not
    JSON or is not an object."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: not found; a checkpoint folder needs config.json")
    try:
        hf = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return hf


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(file: Path, write: Callable[[Path], Any], mode: int = 0o666) -> None:
    """write(tmp) to a new temporary file beside `file`, then fsync it and rename it over `file`.

    The result has `mode` less the umask, as a file created normally in that folder would.
    """
    tmp = _temp_beside(file)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))  # the kernel applies the umask
    try:
        wanted = os.stat(tmp).st_mode & 0o777
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if os.stat(tmp).st_mode & 0o777 != wanted:  # the writer made its own file (safetensors: 0600)
            os.chmod(tmp, wanted)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a new empty folder beside `folder` to fill; when the block succeeds it is renamed to `folder`
    (an existing `folder` is moved aside first and deleted after), when it fails it is deleted."""
    tmp, old = _temp_beside(folder), _temp_beside(folder)
    tmp.mkdir()
    try:
        yield tmp
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
