"""Files written so that none is ever half-written, and YAML values read the way recipes mean them."""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

__all__ = ["atomic_path", "atomic_directory", "write_atomic", "save_atomic", "copy_atomic", "save_figure",
           "remove_stale_temporaries", "yaml_load"]


# The names atomic_path and atomic_directory give their temporaries: ".NAME.PID.tmp.SUFFIX" and ".NAME.tmp.RANDOM".
TEMPORARY_NAME = re.compile(r"^\..+\.(\d+\.tmp(\.[^.]+)?|tmp\.\w+)$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix, for writers that go by it): renamed onto `path` when the block
    succeeds, removed when it fails, so `path` is either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """An empty temporary directory next to `target`; on success its files move into `target`, each by an atomic
    rename, and on failure nothing of it is left."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory: choose a directory path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            # Replace our files only: the directory may hold other things (logs, plots) that are not ours to delete.
            for f in tmp.iterdir():
                os.replace(f, target / f.name)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save`, atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def save_figure(figure: Any, path: str | os.PathLike, dpi: int) -> None:
    """A matplotlib figure written atomically, in the format its suffix names (PNG without one)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that a killed writer left in `directory` (a SIGKILL skips the clean-up of
    atomic_path and atomic_directory); returns them. Only for a directory no one else is writing to."""
    stale = sorted(p for p in Path(directory).iterdir() if TEMPORARY_NAME.match(p.name))
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


class YAMLLoader(yaml.SafeLoader):
    """YAML with 1.2's floats: PyYAML alone reads `1e-3` (no dot) as a string."""


YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                 list("-+0123456789."))


def yaml_load(text: str, source: str | os.PathLike | None = None) -> Any:
    """`text` as YAML; a syntax error is a ValueError naming `source` (the file, or the override) and the place."""
    try:
        return yaml.load(text, Loader=YAMLLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{source or 'YAML'}{where}: not valid YAML ({problem})") from None
