"""Entry point: ``torchrun --nproc_per_node=N train/main.py [options]`` or ``python train/main.py``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch.distributed.elastic.multiprocessing.errors import record

from train import config, dist, failures
from train.errors import PermanentError
from train.metrics import setup_logging
from train.trainer import train

log = logging.getLogger("train")


@record
def main(argv: list[str] | None = None) -> int:
    setup_logging(int(os.environ.get("RANK", "0")))
    try:
        cfg = config.parse(argv)
        failures.check_run_dir(cfg.run_dir)
        env = dist.setup(cfg.dist.backend, cfg.dist.init_timeout_s)
        try:
            return train(cfg, env)
        finally:
            dist.teardown()
    except PermanentError as e:
        return failures.permanent(e)


if __name__ == "__main__":
    sys.exit(main())
