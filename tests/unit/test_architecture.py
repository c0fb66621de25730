"""The shape of the code, checked: folders by concern, no import circles, short functions, a
library that knows nothing of the job, fault injection only where the entry point installs it."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from train.errors import ConfigError
from train.runtime import faults

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("train", "launch")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of ours that ``name`` imports, anywhere in it (functions and TYPE_CHECKING too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(f"{target}."):
                out.add(target)
    return out


def test_no_import_circle_in_train_or_launch() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_train_shows_its_architecture_in_folders() -> None:
    top = sorted(p.name for p in (REPO / "train").glob("*.py"))
    assert len(top) <= 16, top
    folders = {p.name for p in (REPO / "train").iterdir() if (p / "__init__.py").exists()}
    assert {"ckpt", "checkpointing", "runtime", "observe", "lm"} <= folders


def test_no_function_over_100_lines() -> None:
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > 100:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, long


def test_no_module_over_400_lines() -> None:
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long


def test_importing_fault_injection_installs_nothing() -> None:
    code = (
        "from train.ckpt import hooks; before = (hooks._on_point, hooks._on_context); "
        "import train.runtime.faults, train.main; "
        "assert (hooks._on_point, hooks._on_context) == before, 'importing installed hooks'; print('ok')"
    )
    env = {**os.environ, "FTJOB_FAULT": "kill:point=ckpt.file_written", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("crahs:step=3", "unknown fault kind 'crahs'"),
        ("crash:stpe=3", "crash takes no 'stpe=3'"),
        ("crash:step", "crash takes no 'step'"),
        ("slow_write:point=x", "slow_write takes no 'point=x'"),
    ],
)
def test_a_misspelt_fault_is_a_config_error(spec: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as caught:
        faults.parse(spec)
    assert caught.value.exit_code == 2


def test_faults_parse_every_documented_example() -> None:
    doc = faults.__doc__ or ""
    tokens = [line.split()[0] for line in doc.splitlines() if line.startswith("  ") and line.strip()]
    examples = [t for t in tokens if re.fullmatch(r"[a-z_]+(:[a-z_]+=[^:\s]+)+", t)]
    assert len(examples) >= 8
    for spec in examples:
        assert faults.parse(spec)[0]["kind"] == spec.split(":")[0]


def test_an_idle_crash_fires_at_the_first_step_from_its_own_that_no_save_runs_at(monkeypatch) -> None:
    for var in ("RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    (idle,) = faults.parse("crash:step=25:rank=0:idle=1")
    assert not faults._due(idle, 24, saving=False)  # never before its step
    assert not faults._due(idle, 25, saving=True)  # not while a save runs on some rank
    assert faults._due(idle, 27, saving=False)
    assert not faults._due(faults.parse("crash:step=25:rank=1:idle=1")[0], 27, saving=False)  # another rank's
    (plain,) = faults.parse("crash:step=25")
    assert faults._due(plain, 25, saving=True) and not faults._due(plain, 26, saving=False)


def test_a_misspelt_fault_stops_the_job_with_one_line(tmp_path: Path, corpus: Path) -> None:
    from conftest import MAIN, tiny_args

    env = {**os.environ, "FTJOB_FAULT": "crash:setp=3"}
    done = subprocess.run(
        [sys.executable, MAIN, *tiny_args(tmp_path / "run", corpus)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "FTJOB_FAULT" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
