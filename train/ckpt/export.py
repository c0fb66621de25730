"""A checkpoint's model for other tools: ``python -m train.ckpt export``.

Two formats, both with plain parameter names (any ``module.`` or ``_orig_mod.`` a wrapper put in
front is taken off) and the tensors in name order, so the same weights always give the same
safetensors file, byte for byte:
- ``safetensors``: one file, what Hugging Face tools and ``safetensors.torch.load_file`` read;
- ``dcp``: a ``torch.distributed.checkpoint`` directory of the model's tensors under their names
  at the top level (torchtitan's model-only layout), which ``dcp.load`` - and so torchtitan and
  torchtune - read at any world size.

Only the checkpoint's model file is read (not the optimizer's, several times its size), and it is
checked against the manifest first. The output appears whole or not at all (written beside it,
then renamed), never inside the checkpoints' directory, and an existing one is replaced only when
asked.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Literal

import torch

from train.ckpt import manifest as mf
from train.ckpt.fs import fsync_path

Format = Literal["safetensors", "dcp"]
WRAPPERS = ("module.", "_orig_mod.")  # DDP's and torch.compile's prefixes


class ExportError(Exception):
    """Bad input: one line naming the problem and the fix."""


def plain_names(tensors: object) -> dict[str, torch.Tensor]:
    """The model's tensors under their plain names, sorted; ExportError if it is not a flat
    {name: tensor} dict or two names become one."""
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise ExportError("the model file is not a flat {name: tensor} dict; is --file the model's?")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        plain = name
        while plain.startswith(WRAPPERS):
            plain = plain.split(".", 1)[1]
        if plain in out:
            raise ExportError(f"{name!r} and another tensor both become {plain!r} without wrapper prefixes")
        out[plain] = tensors[name]
    return dict(sorted(out.items()))


def check_destination(out: Path, checkpoints: Path | None, overwrite: bool) -> None:
    """ExportError unless ``out`` may be written: not inside the checkpoints' directory (nothing
    there is ever written but by a commit), not an existing path unless ``overwrite``."""
    if checkpoints is not None:
        root, where = checkpoints.resolve(), out.resolve()
        if where == root or root in where.parents:
            raise ExportError(
                f"--out {out} is inside the checkpoints' directory {checkpoints}; write it elsewhere"
            )
        if where in root.parents:
            raise ExportError(
                f"--out {out} holds the checkpoints' directory {checkpoints}; write it elsewhere"
            )
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ExportError(f"--out {out} exists; remove it, choose another path or pass --overwrite")
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: its directory {out.parent} does not exist; create it first")


def write(tensors: dict[str, torch.Tensor], out: Path, fmt: Format) -> None:
    """``tensors`` (plain_names()) to ``out``, replacing whatever is there only once all is written."""
    tmp = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"
    try:
        if fmt == "safetensors":
            _write_file(tmp, mf.encode("model.safetensors", tensors))
        else:
            _write_dcp(tmp, tensors)
        _replace(tmp, out)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    fsync_path(out.parent)


def _write_file(path: Path, pieces: list) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        for piece in pieces:
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())


def _write_dcp(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    import torch.distributed.checkpoint as dcp

    path.mkdir(mode=0o755)
    # One process, no process group: DCP writes it as a world of one, which any world size loads.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save({k: v.contiguous() for k, v in tensors.items()}, checkpoint_id=str(path), no_dist=True)


def _replace(tmp: Path, out: Path) -> None:
    """``tmp`` to ``out``: a file over a file (or a link) in one rename; anything else in the way
    (a directory, a link where a directory goes) is moved aside first and removed only after."""
    if tmp.is_file() and (out.is_symlink() or not out.is_dir()):
        os.replace(tmp, out)
        return
    aside = None
    if out.exists() or out.is_symlink():
        aside = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.rename(out, aside)
    os.rename(tmp, out)
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)
