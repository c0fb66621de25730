"""``python -m train.report RUN_DIR [--json] [--plot out.png]``: the recovery report of a run
(train/observe/report.py)."""

import sys

from train.observe.report import cli

if __name__ == "__main__":
    sys.exit(cli())
