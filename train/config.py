"""The one typed config tree, parsed from a config file and CLI overrides by tyro.

Validation happens here, before any process group exists, so bad input costs one line and no
rendezvous.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib.util
import io
import json
import re
import sys
import tomllib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from train.ckpt.objstore import check_url, is_url
from train.errors import ConfigError, DataError


@dataclass
class DataConfig:
    path: str | None = None
    """Text file or folder of text files to train on; default: this Python's standard library sources."""
    cache_dir: str = "~/.cache/ftjob"
    """Where prepared token files are kept (one per corpus, reused across runs)."""
    seq_len: int = 128
    """Context length in bytes (tokens)."""
    val_every: int = 20
    """Every N-th source file (in sorted order) goes to the validation split."""
    workers: int = 0
    """DataLoader worker processes preparing batches ahead (in the sampler's order: resume stays
    bit-exact); 0: the step loop prepares each batch itself."""


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""


@dataclass
class CkptConfig:
    dir: str = ""
    """Where durable checkpoints go: a directory, or an fsspec URL such as s3://bucket/prefix (needs
    the s3 extra; credentials and endpoint from the usual AWS_* variables or profile, never in the
    URL). Default: <run-dir>/checkpoints."""
    interval: int = 50
    """Save every N optimizer steps (and at the end). 0 disables periodic saves."""
    keep: int = 3
    """Keep the newest N valid checkpoints."""
    async_save: Annotated[bool, tyro.conf.arg(name="async")] = True
    """Serialise and commit in a background thread; the step loop only pays for a memory snapshot."""
    max_failures: int = 3
    """Consecutive failed saves (full disk, storage errors) after which the job stops; until then it
    keeps training and retries at the next interval."""
    save_timeout_s: float = 600.0
    """A save still running after this long, plus its bytes at --ckpt.slowest-mb-s, counts as hung
    storage: the attempt ends (exit 147, retryable) instead of waiting forever."""
    load_timeout_s: float = 1800.0
    """At resume, a rank's read of a checkpoint (or its send to the node's other ranks) still running
    after this long, plus the checkpoint's bytes at --ckpt.slowest-mb-s, counts as hung storage: the
    attempt ends (exit 147, retryable). Every other rank waits for the slowest reader in short polls,
    so a slow read costs only its own time, whatever --dist.init-timeout-s is."""
    slowest_mb_s: float = 25.0
    """The slowest storage (MB/s) a save or a resume's read is still waited for at: each limit above
    grows by the bytes at this rate (an 80 GB checkpoint: 3200 s more), so a bigger model never
    turns a slow store into a failure on every attempt. 0: the fixed timeouts alone."""
    local_interval: int = 0
    """Also save a node-local checkpoint every K steps between the durable ones (0: off): each node
    writes its own copy to --ckpt.local-dir, nothing crosses the network, only the newest is kept.
    Resume takes the newest valid checkpoint in either tier on any node."""
    local_dir: str = ""
    """Where node-local checkpoints go, in a directory named after the run: <dir>/<run id>. Default:
    /dev/shm/ftjob-<uid>/<run id> (a RAM disk: lost on reboot, counts as memory), or
    <run-dir>/local-checkpoints where there is no /dev/shm."""


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto: nccl on CUDA, else gloo."""
    init_timeout_s: float = 120.0
    """Bound on process-group set-up and the first collectives (torch's default is 30 min)."""
    timeout_s: float = 60.0
    """Collective timeout once the first step has completed."""
    warm_restart: bool = True
    """Restarted workers fork from a process that already imported torch (Linux, torchrun with
    --max-restarts >= 1): ~1.3 s less per restart here. See train/runtime/warmstart.py."""


@dataclass
class ParallelConfig:
    mode: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    """ddp: every rank holds the whole model. fsdp: FSDP2 shards parameters, gradients and optimizer
    state over all ranks (each transformer block and the root), and every rank saves only its own
    shards. hsdp: shards within groups of --parallel.shard-size ranks, replicated across groups."""
    shard_size: int = 0
    """hsdp: ranks a shard group spans (consecutive ranks); 0: the ranks of one node."""


@dataclass
class WatchdogConfig:
    enabled: bool = True
    timeout_s: float = 0.0
    """Exit a rank whose step makes no progress this long; 0: derive from observed step times."""
    min_timeout_s: float = 60.0
    """Floor of the derived timeout."""
    factor: float = 20.0
    """Derived timeout = factor x median step time (at least min_timeout_s)."""


@dataclass
class LogConfig:
    tensorboard: bool = False
    """Also write TensorBoard scalars to <run-dir>/tensorboard (needs the tensorboard extra);
    metrics.jsonl stays the record. A resumed run purges what it re-runs: no zig-zags."""


@dataclass
class Config:
    run_dir: str = "runs/default"
    """Directory for checkpoints, metrics.jsonl and the resolved config."""
    max_steps: int = 300
    """Optimizer steps to train in total (across restarts)."""
    seed: int = 1337
    global_batch_size: int = 32
    """Samples per optimizer step across all ranks."""
    micro_batch_size: int | None = None
    """Samples per rank per forward; default: global_batch_size / world_size (no accumulation)."""
    task: str = "train.lm:build"
    """module:function returning a train.task.Task (see README, 'Bring your own model')."""
    log_interval: int = 10
    eval_interval: int = 100
    """Validation every N steps (and at the end); 0 disables."""
    eval_batches: int = 8
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """bf16 / fp16: autocast for the forward (CPU too); fp16 adds a gradient scaler, saved with the
    checkpoints (a step it skips on inf/nan still consumes its batch). Weights and optimizer stay fp32."""
    compile: bool = False
    """torch.compile the (DDP-wrapped) model. Checkpoints keep plain parameter names: a compiled
    run resumes from an uncompiled one's checkpoints and vice versa. Compiled kernels are cached in
    <data.cache-dir>/inductor, so a restart recompiles from the cache; restarts are cold (a trainer
    forked by a warm restart recompiled far slower than a fresh process: 16.9 s vs 2.4 s)."""
    deterministic: bool = True
    """Deterministic kernels (matters on CUDA): required for bit-exact resume on GPUs; costs some speed."""
    sample_bytes: int = 200
    """Bytes of text rank 0 generates at the end (0: none)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    log: LogConfig = field(default_factory=LogConfig)


# Fields that decide tensor shapes or what a sample means: a checkpoint written under other values
# cannot be resumed bit-for-bit (or at all), so they are fingerprinted into every manifest.
FINGERPRINT_FIELDS = ("task", "model", "data.seq_len", "data.path", "data.val_every")


def fingerprint(cfg: Config) -> str:
    flat = to_dict(cfg)
    picked = {}
    for key in FINGERPRINT_FIELDS:
        value: Any = flat
        for part in key.split("."):
            value = value[part]
        picked[key] = value
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def ckpt_dir(cfg: Config) -> str:
    """The durable checkpoints' root: --ckpt.dir, or <run-dir>/checkpoints."""
    return cfg.ckpt.dir or str(Path(cfg.run_dir) / "checkpoints")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def validate(cfg: Config) -> None:
    checks = [
        (cfg.max_steps >= 1, "--max-steps must be >= 1"),
        (cfg.global_batch_size >= 1, "--global-batch-size must be >= 1"),
        (cfg.micro_batch_size is None or cfg.micro_batch_size >= 1, "--micro-batch-size must be >= 1"),
        (cfg.ckpt.interval >= 0, "--ckpt.interval must be >= 0 (0 disables periodic saves)"),
        (cfg.ckpt.keep >= 1, "--ckpt.keep must be >= 1 (the newest checkpoint is always kept)"),
        (cfg.ckpt.max_failures >= 1, "--ckpt.max-failures must be >= 1"),
        (cfg.ckpt.save_timeout_s > 0, "--ckpt.save-timeout-s must be > 0"),
        (cfg.ckpt.load_timeout_s > 0, "--ckpt.load-timeout-s must be > 0"),
        (cfg.ckpt.slowest_mb_s >= 0, "--ckpt.slowest-mb-s must be >= 0 (0: the timeouts alone)"),
        (cfg.ckpt.local_interval >= 0, "--ckpt.local-interval must be >= 0 (0: no node-local tier)"),
        (cfg.data.seq_len >= 1, "--data.seq-len must be >= 1"),
        (cfg.data.val_every >= 2, "--data.val-every must be >= 2"),
        (cfg.data.workers >= 0, "--data.workers must be >= 0 (0: no worker processes)"),
        (
            cfg.model.n_embd % max(cfg.model.n_head, 1) == 0,
            "--model.n-embd must be divisible by --model.n-head",
        ),
        (0.0 <= cfg.model.dropout < 1.0, "--model.dropout must be in [0, 1)"),
        (cfg.optim.lr > 0, "--optim.lr must be > 0"),
        (cfg.dist.init_timeout_s > 0 and cfg.dist.timeout_s > 0, "--dist timeouts must be > 0"),
        (cfg.parallel.shard_size >= 0, "--parallel.shard-size must be >= 0 (0: the ranks of a node)"),
        (
            re.fullmatch(r"[\w.]+:\w+", cfg.task) is not None,
            f"--task {cfg.task!r} must look like package.module:function",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if is_url(cfg.ckpt.dir) and (problem := check_url(cfg.ckpt.dir)):
        raise ConfigError(problem)
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "--log.tensorboard true needs the tensorboard package: pip install 'ftjob[tensorboard]'"
        )
    if cfg.data.path is not None and not Path(cfg.data.path).expanduser().exists():
        raise DataError(f"--data.path {cfg.data.path!r} does not exist; point it at a text file or folder")


def _load_file(path: str) -> Config:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} not found; pass an existing .toml or .json file")
    try:
        raw = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path!r} does not parse: {e}") from None
    return _from_dict(Config, raw, prefix="")


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """A config-file value against its field's type (the CLI path gets this from tyro)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return value
        if typing.get_origin(kind) is Literal and value in typing.get_args(kind):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind in (int, str, bool) and type(value) is kind:
            return value
    raise ConfigError(f"config key {key}: {value!r} is not a valid {_type_name(hint)}; fix the config file")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _fields(cls: type) -> Iterator[tuple[dataclasses.Field, str, Any]]:
    """(field, its CLI name - tyro aliases honoured, its type) for each field of one section."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        alias = next((m.name for m in getattr(hint, "__metadata__", ()) if getattr(m, "name", None)), None)
        yield f, alias or f.name, typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint


def _section(f: dataclasses.Field) -> type | None:
    return f.default_factory if dataclasses.is_dataclass(f.default_factory) else None  # type: ignore[return-value]


def _from_dict(cls: type, raw: dict, prefix: str) -> Any:
    known: dict[str, tuple[dataclasses.Field, Any]] = {}
    for f, name, kind in _fields(cls):
        known[f.name] = known[name] = (f, kind)  # CLI aliases work in files too
    kwargs = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            hint = difflib.get_close_matches(name, known, n=1)
            fix = f"did you mean {prefix}{hint[0]}?" if hint else f"valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {prefix}{key}; {fix}")
        f, kind = known[name]
        section = _section(f)
        if section is None:
            kwargs[f.name] = _check_type(value, kind, f"{prefix}{key}")
        elif isinstance(value, dict):
            kwargs[f.name] = _from_dict(section, value, prefix=f"{prefix}{f.name}.")
        else:
            raise ConfigError(f"config key {prefix}{key} must be a table/object of settings")
    return cls(**kwargs)


def _one_line(text: str) -> str:
    text = re.sub(r"[╭╮╯╰│─━┃┏┓┗┛]", " ", text)
    text = re.sub(r"For full helptext.*", "", text)
    return " ".join(text.split())


_TRUTHY = {"true": "True", "1": "True", "yes": "True", "false": "False", "0": "False", "no": "False"}


def _flags(cls: type, prefix: str = "") -> dict[str, Any]:
    """CLI flag -> field type, for every leaf of the config tree."""
    out: dict[str, Any] = {}
    for f, name, kind in _fields(cls):
        section = _section(f)
        if section is not None:
            out.update(_flags(section, f"{prefix}{name}."))
        else:
            out[f"--{prefix}{name}".replace("_", "-")] = kind
    return out


def _normalise_bools(argv: list[str]) -> list[str]:
    bools = {flag for flag, kind in _flags(Config).items() if kind is bool}
    out = list(argv)
    for i in range(1, len(out)):
        if out[i - 1] in bools and out[i].lower() in _TRUTHY:
            out[i] = _TRUTHY[out[i].lower()]
    return out


HELP = """Train with DDP under torchrun (or ftjob, launch/README.md). Checkpoints are written every
--ckpt.interval steps, atomically and in the background, and every start resumes from the newest
valid one on any node: a killed, restarted or requeued run ends bit for bit as an uninterrupted one.
A --config FILE (.toml or .json) is applied first, these options after. Exit codes: 0 done, 143
preempted and saved (requeue), 1-127 permanent (fix the input), 128-255 retryable."""

# Booleans take a value (`--ckpt.async false`), as scripts that template options expect.
_TYRO_CONF = (tyro.conf.FlagConversionOff,)


def parse(argv: list[str] | None = None) -> Config:
    """Config file (``--config F``) first, then CLI overrides; unknown keys are errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    default = Config()
    argv = [part for a in argv for part in (a.split("=", 1) if a.startswith("--config=") else [a])]
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a path to a .toml or .json file")
        default = _load_file(argv[i + 1])
        del argv[i : i + 2]
    argv = _normalise_bools(argv)
    if "-h" in argv or "--help" in argv:
        return tyro.cli(Config, args=argv, default=default, description=HELP, config=_TYRO_CONF)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cfg, unknown = tyro.cli(
                Config, args=argv, default=default, return_unknown_args=True, config=_TYRO_CONF
            )
    except SystemExit:
        raise ConfigError(_one_line(err.getvalue()) + "; see --help") from None
    if unknown:
        option = next((a for a in unknown if a.startswith("-")), unknown[0])
        hint = difflib.get_close_matches(option.split("=")[0], list(_flags(Config)), n=1)
        fix = f"did you mean {hint[0]}?" if hint else "see --help for the valid options"
        raise ConfigError(f"unknown option {option!r}; {fix}")
    validate(cfg)
    return cfg
