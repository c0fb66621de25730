"""What torchrun runs: ``torchrun --nproc_per_node=N train/main.py [options]`` (or ``python
train/main.py`` for one process). Check the config, set the process up, train, and end with an
exit code a scheduler can act on (train/errors.py) and a record of why (train/runtime/exits.py).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make the repository root importable
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from train.runtime import warmstart

    warmstart.handoff()  # a restart: fork a ready trainer instead of importing torch (returns if none)

from torch.distributed.elastic.multiprocessing.errors import record

from train import preflight
from train.observe.metrics import setup_logging
from train.runtime import determinism, dist, env, exits, faults, warmstart
from train.trainer import train


@record
def main(argv: list[str] | None = None) -> int:
    launch = env.launch()
    setup_logging(launch.rank)
    run_dir = None
    try:
        # The run dir once per node, the store once per job: each is one process's business.
        cfg = preflight.check(argv, run_dir=launch.local_rank == 0, ckpt_store=launch.rank == 0)
        run_dir = cfg.run_dir
        if env.fault_spec():
            faults.install(env.fault_spec())
        # With --compile a forked trainer recompiled far slower (16.9 s) than a fresh process
        # reading the compile cache (2.4 s): restarts are cold then.
        warmstart.on_start(cfg.dist.warm_restart and not cfg.compile)
        determinism.apply(cfg.deterministic)
        with dist.process_group(cfg.dist.backend, cfg.dist.init_timeout_s) as distributed:
            code = train(cfg, distributed)
        return exits.finished(run_dir, code)
    except BaseException as e:  # every ending gets a code and a record
        return exits.ended(e, run_dir or preflight.guess_run_dir(argv))


def exit_now(code: int) -> None:
    """Exit without Python's finalisation, which takes ~0.3-0.7 s with torch and gloo threads
    loaded: every restart waits for the old workers to be gone. Everything that matters (the
    checkpoint in flight, metrics, the process group) was closed by main()."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli() -> None:
    try:
        exit_code = main() or 0  # @record turns SystemExit(0), e.g. after --help, into None
    except SystemExit as e:
        exit_code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        sys.excepthook(*sys.exc_info())  # @record already wrote torchrun's error file
        exit_code = getattr(e, "ftjob_exit_code", 1)
    exit_now(exit_code)


if __name__ == "__main__":
    cli()
