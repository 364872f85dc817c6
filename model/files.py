"""Files written so that a reader never sees half of one: sha256, atomic file and folder writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from model.errors import ModelError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write beside the destination, then rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_destination(out_dir: Path, force: bool) -> None:
    """Fail early (before any slow work) if out_dir cannot be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelError(f"{out_dir}: exists and is not a folder")
    if out_dir.exists() and not force:
        raise ModelError(f"{out_dir}: already exists (pass --force to replace it)")
    parent = out_dir.resolve().parent
    if not parent.is_dir():
        raise ModelError(f"{parent}: parent folder does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ModelError(f"{parent}: not writable")


@contextlib.contextmanager
def atomic_dir(out_dir: Path, force: bool) -> Iterator[Path]:
    """Yield a temp folder beside out_dir; on success it replaces out_dir, on failure it vanishes."""
    check_destination(out_dir, force)
    parent = out_dir.resolve().parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    except OSError as e:
        raise ModelError(f"{parent}: cannot create a folder there ({e.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the artifact should look like any folder
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=parent))
            os.replace(out_dir, old / "dir")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:  # disk full, permissions changed underneath us, ...
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"{out_dir}: cannot write the artifact ({e.strerror or type(e).__name__}"
                         + (f": {e.filename}" if e.filename else "") + ")") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
