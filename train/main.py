"""Entry point: ``torchrun --nproc_per_node=N train/main.py [options]`` or ``python train/main.py``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make the repository root importable
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from train import warmstart

    warmstart.handoff()  # a restart: fork a ready trainer instead of importing torch (returns if none)

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from train import config, dist, failures, warmstart
from train.errors import EXIT_PREEMPTED, PermanentError, StorageError
from train.metrics import setup_logging
from train.trainer import train

log = logging.getLogger("train")


@record
def main(argv: list[str] | None = None) -> int:
    setup_logging(int(os.environ.get("RANK", "0")))
    run_dir = None
    try:
        cfg = config.parse(argv)
        warm_ms = warmstart.warm_ms()
        if warm_ms:
            log.info("warm restart: trainer forked %s ms after the worker started", warm_ms)
        else:
            # With --compile a forked trainer recompiled far slower (16.9 s) than a fresh process
            # reading the compile cache (2.4 s): restarts are cold then.
            warmstart.start_zygote(cfg.dist.warm_restart and not cfg.compile)
        if os.environ.get("LOCAL_RANK", "0") == "0":  # each node may keep its own copy there
            failures.check_run_dir(cfg.run_dir)
        if os.environ.get("RANK", "0") == "0":  # the one rank that writes to a --ckpt.dir URL
            try:
                failures.check_ckpt_dir(cfg)
            except StorageError as e:  # one line; torchrun's restarts (or the scheduler) retry it
                log.error("%s [exit %d: retryable]", e, e.exit_code)
                failures.record_exit(cfg.run_dir, e.exit_code, str(e))
                return e.exit_code
        run_dir = cfg.run_dir
        if cfg.deterministic:
            # Before the first cuBLAS call; warn_only so a kernel without a deterministic variant
            # degrades bit-exactness with a warning instead of stopping the job.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            set_deterministic()
            # Filling every torch.empty() with NaN only catches reads of garbage (this job has
            # none) and costs ~3% of a CPU step.
            torch.utils.deterministic.fill_uninitialized_memory = False
        env = dist.setup(cfg.dist.backend, cfg.dist.init_timeout_s)
        try:
            code = train(cfg, env)
        finally:
            dist.teardown()
        reason = "preempted: saved, requeue to continue" if code == EXIT_PREEMPTED else "finished"
        failures.record_exit(run_dir, code, reason)
        return code
    except PermanentError as e:
        return failures.permanent(e, run_dir or failures.guess_run_dir(argv))
    except SystemExit:
        raise  # --help, or tyro's own exit
    except BaseException as e:  # every ending gets a status
        code, secondary = failures.crashed(e, run_dir or failures.guess_run_dir(argv))
        if secondary:
            # Another rank failed first. One line, and no torchrun error file: torchrun would take
            # this rank's (earlier-stamped) file for the root cause and hide, e.g., a peer's SIGKILL.
            log.error("%s; exit %d (retryable)", failures.one_line(e), code)
            return code
        e.ftjob_exit_code = code  # type: ignore[attr-defined]
        raise  # @record writes torchrun's error file with the traceback


def set_deterministic() -> None:
    """torch.use_deterministic_algorithms(True, warn_only=True) without its ``import
    torch._inductor`` (0.9 s of every start, restarts included), which it needs only to set a flag
    for torch.compile - not used here. If inductor is loaded anyway, its flag is set too."""
    torch._C._set_deterministic_algorithms(True, warn_only=True)
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.deterministic = True


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
