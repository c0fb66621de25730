"""Helper of launch/local.sh: find and read the job's ``<run-dir>/exit_status.json``.

torchrun exits 1 whatever its workers did, so the job records how it ended in that file
({"code": N, "reason": "...", ...}, see train/failures.py) and the launcher exits with that code.
Standard library only and no torch import: it runs in a few milliseconds.

    python launch/exit_status.py clear [JOB ARGS...]        remove a previous run's status file
    python launch/exit_status.py read START [JOB ARGS...]   print "CODE<TAB>REASON" or nothing

The run dir is found the way the job finds it: the last ``--run-dir`` on the command line, else
``run_dir`` in the ``--config`` file, else the default. A job whose config did not parse writes where
train.failures.guess_run_dir points (command line or default, no config file), so ``read`` looks
there too, trusting that file only if it was written after START (the launch time, epoch seconds).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import tomllib
from pathlib import Path

STATUS_FILE = "exit_status.json"
DEFAULT_RUN_DIR = "runs/default"  # train.config.Config.run_dir (a unit test keeps the two equal)
CLOCK_SLACK_S = 2.0  # a fallback file may come from another node whose clock is a little behind


def _cli_value(args: list[str], names: tuple[str, ...]) -> str | None:
    value = None
    for i, arg in enumerate(args):
        if arg in names and i + 1 < len(args):
            value = args[i + 1]
        for name in names:
            if arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value


def _config_run_dir(path: str) -> str | None:
    try:
        text = Path(path).read_text()
        raw = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except (OSError, ValueError):
        return None  # the job reports a bad config file itself
    if not isinstance(raw, dict):
        return None
    value = raw.get("run_dir", raw.get("run-dir"))
    return value if isinstance(value, str) else None


def run_dirs(args: list[str]) -> list[str]:
    """[where a parsed config puts the run, where a job that could not parse it reports], deduplicated."""
    cli = _cli_value(args, ("--run-dir", "--run_dir"))
    config = _cli_value(args, ("--config",))
    primary = cli or (config and _config_run_dir(config)) or DEFAULT_RUN_DIR
    fallback = cli or DEFAULT_RUN_DIR
    return [primary] if fallback == primary else [primary, fallback]


def _read(path: Path, not_before: float | None) -> tuple[int, str] | None:
    try:
        data = json.loads(path.read_text())
        code = int(data["code"])
        written = float(data.get("time", path.stat().st_mtime))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not 0 <= code <= 255 or (not_before is not None and written < not_before - CLOCK_SLACK_S):
        return None
    return code, " ".join(str(data.get("reason", "")).split())


def read(start: float, args: list[str]) -> tuple[int, str] | None:
    primary, *fallback = run_dirs(args)
    found = _read(Path(primary) / STATUS_FILE, None)  # cleared before the launch: anything here is new
    for run_dir in fallback:
        found = found or _read(Path(run_dir) / STATUS_FILE, start)
    return found


def clear(args: list[str]) -> None:
    with contextlib.suppress(OSError):  # an unwritable run dir: the job itself reports it (exit 5)
        (Path(run_dirs(args)[0]) / STATUS_FILE).unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["clear"]:
        clear(argv[1:])
        return 0
    if argv[:1] == ["read"] and len(argv) >= 2:
        try:
            start = float(argv[1].replace(",", "."))  # $EPOCHREALTIME uses the locale's decimal mark
        except ValueError:
            start = time.time()
        found = read(start, argv[2:])
        if found:
            print(f"{found[0]}\t{found[1]}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
