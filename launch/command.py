"""The torchrun command line of one node: torchrun's own flags and PET_* environment, as a scheduler
sets them, with the settings this job's recovery relies on filled in wherever the user left them unset.

    ftjob [torchrun options] [--] [train/main.py options]

Leading arguments that are torchrun options are torchrun's (``--nnodes=2 --nproc-per-node 4``);
everything from the first other argument on (or after ``--``) is the training job's.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

# What a lost node costs depends on these (torchrun's defaults: 5 s x 3 keep-alives, a 30 s last call).
# keep_alive_*: a node that stopped answering is declared dead after ~3 s, not 15 s. last_call_timeout:
# once the minimum of nodes is there, wait 1 s (not 30) for more before training at that size.
# etcd-v2's TLS settings: the launcher's own connection to the store (verdict.py) uses them too.
TLS_KEYS = ("protocol", "ca_cert", "ssl_cert", "ssl_cert_key")
RDZV_CONF = {"keep_alive_interval": "1", "keep_alive_max_attempt": "3", "last_call_timeout": "1"}
SIGNALS = "SIGTERM,SIGINT,SIGUSR1,SIGUSR2"  # torchrun's default lacks USR1/USR2 (Slurm, Kubeflow)
MAX_RESTARTS = 3  # worker-group restarts on this node before torchrun gives up (its default: 0)
# Options that replace what torchrun runs: this launcher always runs train/main.py.
_NOT_HERE = ("--module", "-m", "--no-python", "--no_python", "--run-path", "--run_path")


class UsageError(ValueError):
    """A launcher argument that cannot work; the message says which and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Plan:
    command: list[str]
    multi_node: bool
    backend: str  # "" when standalone
    endpoint: str  # host:port of the rendezvous, "" when standalone
    run_id: str
    world_sizes: tuple[int, ...] = ()  # every size the elastic range allows (empty: not known here)
    tls: dict[str, str] = dataclasses.field(default_factory=dict)  # etcd's TLS settings in --rdzv-conf


def _parser() -> argparse.ArgumentParser:
    from torch.distributed.run import get_args_parser  # reads PET_* defaults as it is built

    return get_args_parser()


def split(argv: list[str], parser: argparse.ArgumentParser | None = None) -> tuple[list[str], list[str]]:
    """(torchrun's arguments, the training job's)."""
    parser = parser or _parser()
    actions = parser._option_string_actions  # argparse's own table: name -> action
    ours: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return ours, argv[i + 1 :]
        name = arg.split("=", 1)[0]
        if name in _NOT_HERE:
            raise UsageError(f"{name} is not for ftjob, which always runs train/main.py; drop it")
        action = actions.get(name) if arg.startswith("-") else None
        if action is None:
            break
        takes_value = action.nargs != 0 and "=" not in arg
        if takes_value and i + 1 >= len(argv):
            raise UsageError(f"torchrun option {name} needs a value")
        ours += argv[i : i + 1 + takes_value]
        i += 1 + takes_value
    return ours, argv[i:]


def train_script() -> str:
    spec = importlib.util.find_spec("train")
    assert spec is not None and spec.origin is not None
    return str(Path(spec.origin).parent / "main.py")


def _conf(text: str) -> dict[str, str]:
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise UsageError(f"--rdzv-conf {text!r} is not key=value[,key=value...]")
    return {k.strip(): v.strip() for k, v in pairs}


def _given(flag_dest: str, torchrun_args: list[str], parser: argparse.ArgumentParser) -> bool:
    """Whether the user set this option: as a flag, or in torchrun's PET_* environment."""
    if f"PET_{flag_dest.upper()}" in os.environ:
        return True
    names = {s for a in parser._actions if a.dest == flag_dest for s in a.option_strings}
    return any(arg.split("=", 1)[0] in names for arg in torchrun_args)


def plan(torchrun_args: list[str], train_args: list[str], torchrun: list[str] | None = None) -> Plan:
    """What to run; torchrun's PET_* environment is read as torchrun reads it."""
    parser = _parser()
    script = train_script()
    try:
        args = parser.parse_args([*torchrun_args, script])
    except SystemExit:
        raise UsageError("torchrun options above are not valid; see `torchrun --help`") from None
    added = []
    if not _given("max_restarts", torchrun_args, parser):
        added.append(f"--max-restarts={MAX_RESTARTS}")
    if not _given("signals_to_handle", torchrun_args, parser):
        added.append(f"--signals-to-handle={SIGNALS}")
    nnodes = str(args.nnodes)
    multi_node = not args.standalone and (
        nnodes not in ("1", "1:1") or bool(args.rdzv_endpoint) or args.rdzv_backend != "static"
    )
    backend = endpoint = ""
    tls: dict[str, str] = {}
    if multi_node:
        backend = args.rdzv_backend
        if not _given("rdzv_backend", torchrun_args, parser):
            backend = "c10d"  # torchrun's "static" needs a fixed master address
            added.append(f"--rdzv-backend={backend}")
        endpoint = args.rdzv_endpoint
        if not endpoint:
            raise UsageError(
                f"{nnodes} nodes need a rendezvous: pass --rdzv-endpoint=HOST:PORT (or PET_RDZV_ENDPOINT)"
            )
        conf = {**RDZV_CONF, **_conf(args.rdzv_conf)}
        tls = {k: v for k, v in conf.items() if k in TLS_KEYS}
        added.append("--rdzv-conf=" + ",".join(f"{k}={v}" for k, v in conf.items()))
    elif not args.standalone and not _given("rdzv_endpoint", torchrun_args, parser):
        added.append("--standalone")  # a free port of its own: two jobs on one box never collide
    if not multi_node and not _given("local_addr", torchrun_args, parser):
        # One node talks to itself over loopback: no need for its hostname to resolve (a container
        # with --network none, a host missing from DNS) and nothing offered beyond this machine.
        added.append("--local-addr=127.0.0.1")
    exe = torchrun or [sys.executable, "-m", "torch.distributed.run"]
    return Plan(
        command=[*exe, *torchrun_args, *added, script, *train_args],
        multi_node=multi_node,
        backend=backend,
        endpoint=endpoint,
        run_id=str(args.rdzv_id),
        world_sizes=_world_sizes(nnodes, str(args.nproc_per_node)),
        tls=tls,
    )


def _world_sizes(nnodes: str, nproc: str) -> tuple[int, ...]:
    """Every world size --nnodes MIN[:MAX] x --nproc-per-node allows ("gpu", "auto": not known)."""
    low, _, high = nnodes.partition(":")
    if not (low.isdigit() and (high or low).isdigit() and nproc.isdigit()):
        return ()
    return tuple(n * int(nproc) for n in range(int(low), int(high or low) + 1))
