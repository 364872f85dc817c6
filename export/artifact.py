"""The export artifact: a folder with model.onnx (+ model.onnx.data past 2 GB), config.json and
the tokenizer files. config.json = {"model": GPTConfig dict, "tokenizer": spec, "export": {...},
"files": {name: sha256}}. Written atomically (built in a temp dir beside it, then renamed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import GPTConfig
from model.errors import ModelError
from model.tokenizer import Tokenizer, tokenizer_from_spec

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
CONFIG_FILE = "config.json"


@dataclass
class Artifact:
    path: Path
    config: GPTConfig
    tokenizer: Tokenizer
    export: dict[str, Any]
    files: dict[str, str]

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE


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


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_FILE).is_file() and (Path(path) / CONFIG_FILE).is_file()


def read_artifact(path: str | os.PathLike, verify: bool = True) -> Artifact:
    """Read config.json; with verify, every listed file must exist with its recorded sha256."""
    path = Path(path)
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    if not path.is_dir():
        raise ModelError(f"{path}: no such artifact folder")
    cfg_path = path / CONFIG_FILE
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{cfg_path}: not a readable artifact config ({type(e).__name__})") from None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("model", "tokenizer", "export", "files")):
        raise ModelError(f"{cfg_path}: not an export artifact config (needs model, tokenizer, export, files)")
    try:
        config = GPTConfig.from_dict(cfg["model"])
    except (TypeError, ValueError) as e:
        raise ModelError(f"{cfg_path}: bad model config ({e})") from None
    files = cfg["files"]
    if MODEL_FILE not in files:
        raise ModelError(f"{cfg_path}: {MODEL_FILE} is not listed under files")
    if verify:
        for name, want in files.items():
            f = path / name
            if not f.is_file():
                raise ModelError(f"{f}: artifact file missing")
            if sha256_file(f) != want:
                raise ModelError(f"{f}: sha256 does not match config.json (corrupt or modified file)")
    return Artifact(path, config, tokenizer_from_spec(cfg["tokenizer"], base_dir=path), cfg["export"], files)


def write_config(path: Path, config: GPTConfig, tokenizer: Tokenizer, export: dict[str, Any],
                 files: dict[str, str] | None = None) -> dict[str, str]:
    """Write config.json last; files (name -> sha256) defaults to hashing every other file in `path`."""
    if files is None:
        files = {f.name: sha256_file(f) for f in sorted(path.iterdir()) if f.is_file() and f.name != CONFIG_FILE}
    cfg = {"model": config.to_dict(), "tokenizer": tokenizer.spec, "export": export, "files": files}
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=1) + "\n")
    return files


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


def onnx_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The GPT parameters stored as initializers (PyTorch names and layouts) in an artifact's model.onnx."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as e:  # protobuf DecodeError, missing external data, ...
        raise ModelError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    from export.quantize import Q_SUFFIX

    if any(t.name.endswith(Q_SUFFIX) for t in model.graph.initializer):
        raise ModelError(f"{path}: a quantized artifact (int8/int4 weights) cannot be read back as the model's "
                         "weights; use the model it was exported from")
    return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer
            if t.name.startswith("transformer.")}
