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

__all__ = ["atomic_path", "atomic_directory", "write_atomic", "save_atomic", "copy_atomic", "yaml_load"]


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
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


class YAMLLoader(yaml.SafeLoader):
    """YAML with 1.2's floats: PyYAML alone reads `1e-3` (no dot) as a string."""


YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                 list("-+0123456789."))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=YAMLLoader)
