"""Everything checked before a job may start, in one place: the launcher runs it before any
rendezvous (a bad flag fails in a second on every node), and the job again in each worker (plain
torchrun users have no launcher).

Options and the data path (train/config.py), the run directory, and a ``--ckpt.dir`` in object
storage. Each problem is one line and an exit class: permanent (ConfigError, DataError,
RunDirError) or retryable (StorageError: a store that does not answer may come back).
"""

from __future__ import annotations

import math
import sys
import uuid
from pathlib import Path

from train import config
from train.ckpt import objstore
from train.config import Config
from train.errors import ConfigError, RunDirError, StorageError
from train.sampler import plan_batches


def check(
    argv: list[str] | None, run_dir: bool = True, ckpt_store: bool = True, world_sizes: tuple[int, ...] = ()
) -> Config:
    """The config of ``argv``, checked; ``run_dir`` / ``ckpt_store``: also check those (the job
    does each once per node / per job, not in every rank); ``world_sizes``: every size an elastic
    job may run at (the launcher knows them: a size that cannot split the batch would otherwise
    fail the job for good the day the cluster shrinks to it)."""
    cfg = config.parse(argv)
    check_world_sizes(cfg, world_sizes)
    if run_dir:
        check_run_dir(cfg.run_dir)
    if ckpt_store:
        check_ckpt_store(cfg)
    return cfg


def check_world_sizes(cfg: Config, sizes: tuple[int, ...]) -> None:
    failing = []
    for size in sizes:
        try:
            plan_batches(cfg.global_batch_size, size, cfg.micro_batch_size)
        except ConfigError:
            failing.append(size)
    if failing:
        fits = math.lcm(*sizes)
        raise ConfigError(
            f"--global-batch-size {cfg.global_batch_size} cannot be split over world size(s) "
            f"{', '.join(map(str, failing))}, which the elastic range allows; use a multiple of {fits}"
            + (
                f" with --micro-batch-size dividing {cfg.global_batch_size} / each size"
                if cfg.micro_batch_size
                else ""
            )
            + ", or narrow --nnodes"
        )


def check_run_dir(run_dir: str) -> None:
    path = Path(run_dir)
    probe = path / f".write-probe-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunDirError(
            f"run dir {run_dir!r} is not writable ({e.strerror}); pass a writable --run-dir"
        ) from None


def check_ckpt_store(cfg: Config) -> None:
    """A --ckpt.dir URL is checked now, not at the first save: one object written, read back and
    deleted. Bad credentials, a missing bucket, a missing extra: ConfigError (permanent). A store
    that does not answer: StorageError (retryable: an outage passes; a wrong endpoint does not)."""
    if not objstore.is_url(cfg.ckpt.dir):
        return
    url = cfg.ckpt.dir
    try:
        storage = objstore.FsspecStorage(url)
    except ImportError as e:
        raise ConfigError(f"--ckpt.dir {url} needs {e.name or 'fsspec'}: pip install 'ftjob[s3]'") from None
    except ValueError as e:  # an fsspec protocol it does not know
        raise ConfigError(f"--ckpt.dir {url}: {e}") from None
    try:
        storage.probe()
    except PermissionError as e:
        raise ConfigError(
            f"--ckpt.dir {url}: access refused ({objstore.first_line(e)}); check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE and the bucket's permissions"
        ) from None
    except FileNotFoundError as e:
        raise ConfigError(
            f"--ckpt.dir {url}: no such bucket ({objstore.first_line(e)}); create it or fix --ckpt.dir"
        ) from None
    except OSError as e:
        if "NoCredentialsError" in str(e):
            raise ConfigError(
                f"--ckpt.dir {url}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE)"
            ) from None
        raise StorageError(
            f"--ckpt.dir {url} is not reachable ({objstore.first_line(e)}); retrying, as an outage "
            "passes (if it persists, check the URL and AWS_ENDPOINT_URL)"
        ) from None


def guess_run_dir(argv: list[str] | None) -> str:
    """Where the run's record goes when the config itself did not parse."""
    args = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(args):
        if arg == "--run-dir" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--run-dir="):
            return arg.split("=", 1)[1]
    return Config().run_dir
