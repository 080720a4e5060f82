"""Crash-safe files: a crash or a full disk at any byte leaves the old or the new version,
never a mix. Used by every writer of the project (run folders, checkpoints, label outputs).

- a whole file that is read back (config.yaml, the summaries, checkpoints/latest,
  trainer_state.json, processes.json, chain.json, label and pairs outputs, Parquet files) is
  written to a hidden temp file beside it, fsynced and renamed over it (`atomic_write_*`,
  `atomic_path`);
- a folder (a checkpoint, a `label`/`sft`/`train-rm` output) is written under a hidden temp
  name, fsynced file by file and renamed (`publish_dir`);
- an append-only file (metrics.jsonl, winrate.jsonl) gets one fsynced line per record; on
  reading (`read_jsonl`), a torn last line (the crash came while it was written) is ignored and
  reported, and a damaged line elsewhere is an error naming the file and line.

A base module: it imports only `rlaif_ray.config` (for the error type).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from rlaif_ray.config import ConfigError


class RunStateError(ConfigError):
    """A run folder that cannot be written or resumed as asked: the message names the file
    and the fix (the CLI prints it as one `error:` line, exit 2)."""


PARTIAL = ".partial-"  # in every temp name (hidden: a leading "."; Parquet readers skip such files)


_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.EBADF, errno.EISDIR, errno.EACCES, errno.EPERM,
                          getattr(errno, "ENOTSUP", errno.EINVAL)}


def temp_path(path: str | Path) -> Path:
    """A hidden, unique temp name beside `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    return path.parent / f".{path.name}{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in `path` durable (no-op where folders cannot be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        if err.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and folder under `path` (its own entry included)."""
    path = Path(path)
    for root, _dirs, files in os.walk(path):
        for f in files:
            fsync_file(Path(root) / f)
        fsync_dir(root)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, rename it over `path`: a crash (or
    ENOSPC) at any byte leaves the old file (or none) or the new one, never a torn one."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent))


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """For files a library writes (Parquet): yields a temp path beside `path`; when the block
    ends without an error the file is fsynced and renamed over `path`, else removed."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(path.parent)


def publish_dir(tmp: str | Path, final: str | Path) -> None:
    """A folder written under a temp name becomes `final` complete or not at all: every file
    fsynced, then one rename. An existing `final` (an empty folder, or a checkpoint of the same
    step left by a dead driver) is moved aside first and removed after."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = None
    if final.exists() or final.is_symlink():
        old = temp_path(final)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        _remove(old)


def move_aside(path: str | Path) -> Path:
    """`--overwrite`: rename an existing output to PATH.replaced-TIMESTAMP beside it (nothing
    is deleted); returns the new name."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = path.with_name(f"{path.name}.replaced-{stamp}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.replaced-{stamp}-{n}")
        n += 1
    os.replace(path, dest)
    fsync_dir(path.parent)
    return dest


def remove_partials(folder: str | Path) -> list[Path]:
    """Delete the temp files and folders a crash left in `folder` (not recursive)."""
    folder = Path(folder)
    found = [p for p in folder.glob(f".*{PARTIAL}*")] if folder.is_dir() else []
    for p in found:
        _remove(p)
    return found


def append_line(path: str | Path, row: dict) -> None:
    """One JSON line, written and fsynced before the run goes on (a checkpoint taken after it
    never points past a lost line)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path, require: tuple[str, ...] = (), on_torn=None) -> list[dict]:
    """The records of an append-only JSONL file. A last line that does not parse (no newline
    after it: the write was cut by a crash or a full disk) is ignored and reported through
    `on_torn(message)`; a damaged line anywhere else raises RunStateError naming the file and
    the line (that is not what a crash leaves: the file was edited or the disk is bad)."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    rows: list[dict] = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in require if not isinstance(row.get(k), int) or isinstance(row.get(k), bool)]
            if missing:
                raise ValueError(f"no integer {', '.join(missing)}")
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError included
            if i == len(lines) - 1:  # unterminated: the tail of a write that was cut
                if on_torn is not None:
                    on_torn(f"{path}: ignored a torn last line ({len(raw)} bytes, from a write that was cut "
                            "by a crash or a full disk)")
                continue
            raise RunStateError(f"{path}: line {i + 1} is damaged ({str(err)[:120]}); only a torn last line is "
                                "expected after a crash: remove or repair that line") from None
        rows.append(row)
    return rows
