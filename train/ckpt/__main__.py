"""Checkpoint CLI: ``python -m train.ckpt ls|verify|inspect|export RUN_DIR``.

RUN_DIR is a run directory (holding ``checkpoints/``), a checkpoints directory itself, or a --ckpt.dir URL
(s3://bucket/prefix).
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Annotated

import tyro

from train.ckpt import export as exporting
from train.ckpt import manifest as mf
from train.ckpt import shards
from train.ckpt.codec import deserialize
from train.ckpt.manager import CheckpointManager
from train.ckpt.objstore import FsspecStorage, is_url
from train.ckpt.storage import LocalStorage

Dir = Annotated[str, tyro.conf.Positional]


class CliError(Exception):
    pass


def _manager(run_dir: str) -> CheckpointManager:
    if is_url(run_dir):  # a --ckpt.dir in object storage: the checkpoints' root itself
        return CheckpointManager(FsspecStorage(run_dir), keep=1)
    path = Path(run_dir)
    if not path.is_dir():
        raise CliError(f"{run_dir!r} is not a directory; pass a run dir (the --run-dir of a training run)")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    elif not any(mf.step_of(p.name) is not None for p in path.iterdir()):
        raise CliError(f"no checkpoints under {run_dir!r}; pass a run dir that holds checkpoints/")
    return CheckpointManager(LocalStorage(path), keep=1)


def _when(t: float | None) -> str:
    try:
        return datetime.datetime.fromtimestamp(t).isoformat(timespec="seconds") if t else "-"
    except (OverflowError, OSError, ValueError):  # a manifest's time is whatever its writer put
        return "-"


def ls(run_dir: Dir, /) -> int:
    """List checkpoints, newest first: step, size, time, valid or why not (sizes only; see verify)."""
    infos = _manager(run_dir).list(deep=False)
    print(f"{'step':>8}  {'size':>10}  {'time':19}  status")
    for i in infos:
        status = "ok" if i.valid else f"INVALID: {i.reason}"
        print(f"{i.step:>8}  {i.size / 1e6:>8.2f}MB  {_when(i.time):19}  {status}")
    return 0


def verify(run_dir: Dir, /) -> int:
    """Check every checkpoint's sizes and checksums and that its files deserialise. Exit 0 only if
    the newest one is valid."""
    infos = _manager(run_dir).list(deep=True)
    for i in infos:
        print(f"{i.name}: {'ok' if i.valid else 'INVALID: ' + i.reason}")
    if not infos:
        print("no checkpoints")
        return 1
    return 0 if infos[0].valid else 1


def inspect(run_dir: Dir, /, step: int | None = None) -> int:
    """Show a checkpoint's manifest and the config it was written with (default: newest valid)."""
    manager = _manager(run_dir)
    infos = [i for i in manager.list(deep=False) if step is None or i.step == step]
    chosen = next((i for i in infos if i.valid), None)
    if chosen is None:
        raise CliError(f"no valid checkpoint{f' at step {step}' if step is not None else ''} in {run_dir!r}")
    manifest, _ = manager.read_verified(chosen.name)
    config = manifest.pop("config", None)
    print(json.dumps(manifest, indent=2, sort_keys=True))
    if config is not None:
        print("config:")
        print(json.dumps(config, indent=2, sort_keys=True))
    return 0


def _model(manager: CheckpointManager, name: str, file: str) -> object:
    """A checkpoint's weights: its model file, or a sharded checkpoint's rows of them, joined."""
    manifest = manager.manifest(name)
    if not shards.is_sharded(manifest):
        return deserialize(file, manager.read_file(name, file))
    reader = shards.ShardReader(manager.storage, name, manifest)
    whole = {
        k: (0, shards.rows_of(spec["shape"]))
        for k, spec in reader.tensors.items()
        if k.startswith(shards.MODEL)
    }
    return {k[len(shards.MODEL) :]: t for k, t in reader.read_rows(whole).items()}


def export(
    run_dir: Dir,
    /,
    out: Path,
    step: int | None = None,
    format: exporting.Format = "safetensors",
    file: str = "model.safetensors",
    overwrite: bool = False,
) -> int:
    """Write a checkpoint's model (default: the newest valid one) for other tools, with plain
    parameter names: one safetensors file, or with --format dcp a torch.distributed.checkpoint
    directory that dcp.load (torchtitan, torchtune) reads. Only the model file is read (of a
    sharded checkpoint, the weights' rows in every shard file), checked against the manifest; an
    older checkpoint is used when a newer one does not verify (said on stderr)."""
    manager = _manager(run_dir)
    local = manager.storage.location("") if not is_url(run_dir) else None
    exporting.check_destination(out, Path(local) if local else None, overwrite)
    infos = [i for i in manager.list(deep=False) if step is None or i.step == step]
    if not infos:
        raise CliError(f"no checkpoint{f' of step {step}' if step is not None else ''} in {run_dir!r}")
    for info in infos:
        try:
            if not info.valid:
                raise mf.Problem(info.reason)
            tensors = exporting.plain_names(_model(manager, info.name, file))
        except (mf.Problem, OSError) as p:
            why = f"checkpoint {info.name} is not usable ({p})"
            if step is not None:
                raise CliError(f"{why}; pick another --step (see: python -m train.ckpt ls)") from None
            print(f"warning: {why}; trying the next older one", file=sys.stderr)
            continue
        except exporting.ExportError:
            raise
        except Exception as e:  # the model file does not deserialise (whatever a crafted one raises)
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CliError(f"checkpoint {info.name}: {file} does not deserialise ({why})") from None
        exporting.write(tensors, out, format)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        print(f"{out}: {len(tensors)} tensors, {size / 1e6:.1f} MB, from {info.name} ({format})")
        return 0
    raise CliError(f"no valid checkpoint in {run_dir!r} (see: python -m train.ckpt verify)")


def main(argv: list[str] | None = None) -> int:
    try:
        return tyro.extras.subcommand_cli_from_dict(
            {"ls": ls, "verify": verify, "inspect": inspect, "export": export}, args=argv, description=__doc__
        )
    except (CliError, mf.Problem, exporting.ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
