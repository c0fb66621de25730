"""train/ckpt/README.md's example of the library in another training loop runs as written, and resumes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_library_example_runs_and_resumes(tmp_path: Path) -> None:
    readme = (REPO / "train" / "ckpt" / "README.md").read_text()
    section = readme[readme.index("## In your own loop") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(2):  # the second run finds the checkpoints of the first and resumes from them
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
    steps = sorted(p.name for p in (tmp_path / "runs" / "mine" / "checkpoints").glob("step_*"))
    assert steps == ["step_00000150", "step_00000200"]  # keep=2: the two newest of 50..200
