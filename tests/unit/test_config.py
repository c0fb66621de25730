"""train.config: defaults, CLI overrides, config files, one-line errors, the resume fingerprint."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train import config
from train.config import Config, fingerprint, parse
from train.errors import EXIT_CONFIG, ConfigError, DataError
from train.observe import records

REPO = Path(__file__).resolve().parents[2]
MAIN = REPO / "train" / "main.py"


def config_error(argv: list[str]) -> str:
    """parse(argv) must fail with a ConfigError whose message is one non-empty line."""
    with pytest.raises(ConfigError) as info:
        parse(argv)
    message = str(info.value)
    assert message.strip(), "empty error message"
    assert "\n" not in message, f"error is not one line: {message!r}"
    assert "Traceback" not in message
    return message


# -- defaults and CLI overrides ------------------------------------------------------------------


def test_defaults_match_the_dataclass_defaults():
    cfg = parse([])
    assert cfg == Config()
    assert cfg.run_dir == "runs/default"
    assert cfg.max_steps == 300
    assert cfg.seed == 1337
    assert cfg.ckpt.interval == 50
    assert cfg.ckpt.keep == 3
    assert cfg.ckpt.async_save is True
    assert cfg.micro_batch_size is None
    assert cfg.data.path is None


def test_cli_overrides(tmp_path):
    run_dir = tmp_path / "run"
    cfg = parse(
        [
            "--ckpt.interval",
            "50",
            "--ckpt.keep",
            "2",
            "--run-dir",
            str(run_dir),
            "--max-steps",
            "17",
            "--seed",
            "7",
            "--global-batch-size",
            "24",
            "--micro-batch-size",
            "4",
            "--model.n-layer",
            "2",
            "--optim.lr",
            "0.01",
        ]
    )
    assert cfg.ckpt.interval == 50
    assert cfg.ckpt.keep == 2
    assert cfg.run_dir == str(run_dir)
    assert cfg.max_steps == 17
    assert cfg.seed == 7
    assert cfg.global_batch_size == 24
    assert cfg.micro_batch_size == 4
    assert cfg.model.n_layer == 2
    assert cfg.optim.lr == pytest.approx(0.01)
    # Untouched fields keep their defaults.
    assert cfg.model.n_head == Config().model.n_head
    assert cfg.ckpt.async_save is True


def test_ckpt_interval_zero_disables_periodic_saves():
    assert parse(["--ckpt.interval", "0"]).ckpt.interval == 0


@pytest.mark.parametrize(
    "value,expected",
    [("False", False), ("false", False), ("0", False), ("True", True), ("true", True), ("1", True)],
)
def test_ckpt_async_takes_a_value(value, expected):
    assert parse(["--ckpt.async", value]).ckpt.async_save is expected
    # The value form also works after other options.
    assert parse(["--max-steps", "3", "--ckpt.async", value]).ckpt.async_save is expected


def test_ckpt_async_false_overrides_the_config_file(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text("[ckpt]\nasync_save = true\nkeep = 2\n")
    cfg = parse(["--config", str(f), "--ckpt.async", "False"])
    assert cfg.ckpt.async_save is False
    assert cfg.ckpt.keep == 2


def test_later_cli_value_wins():
    assert parse(["--seed", "1", "--seed", "2"]).seed == 2


# -- config files ---------------------------------------------------------------------------------


def test_toml_config_file(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text(
        'max_steps = 11\nseed = 5\nrun_dir = "r1"\n[ckpt]\nkeep = 2\ninterval = 7\n[model]\nn_layer = 2\n'
    )
    cfg = parse(["--config", str(f)])
    assert (cfg.max_steps, cfg.seed, cfg.run_dir) == (11, 5, "r1")
    assert (cfg.ckpt.keep, cfg.ckpt.interval) == (2, 7)
    assert cfg.model.n_layer == 2
    # A partial section leaves the other fields of that section at their defaults.
    assert cfg.model.n_embd == Config().model.n_embd
    assert cfg.ckpt.async_save is True


def test_json_config_file(tmp_path):
    f = tmp_path / "run.json"
    raw = {"max-steps": 12, "ckpt": {"keep": 5, "async_save": False}, "optim": {"lr": 0.5}}
    f.write_text(json.dumps(raw))
    cfg = parse(["--config", str(f)])
    assert cfg.max_steps == 12
    assert cfg.ckpt.keep == 5
    assert cfg.ckpt.async_save is False
    assert cfg.optim.lr == pytest.approx(0.5)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_cli_overrides_config_file(tmp_path, suffix):
    f = tmp_path / f"run{suffix}"
    if suffix == ".toml":
        f.write_text("max_steps = 11\nseed = 5\n[ckpt]\nkeep = 2\ninterval = 7\n")
    else:
        f.write_text(json.dumps({"max_steps": 11, "seed": 5, "ckpt": {"keep": 2, "interval": 7}}))
    # --config may come after the overrides too; the CLI still wins.
    cfg = parse(["--ckpt.keep", "4", "--config", str(f), "--max-steps", "9"])
    assert cfg.max_steps == 9  # CLI
    assert cfg.ckpt.keep == 4  # CLI
    assert cfg.seed == 5  # file
    assert cfg.ckpt.interval == 7  # file, same section as a CLI override


def test_config_file_values_are_validated(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[ckpt]\nkeep = 0\n")
    assert "--ckpt.keep" in config_error(["--config", str(f)])


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    message = config_error(["--config", str(missing)])
    assert "nope.toml" in message and "not found" in message


def test_config_flag_without_path():
    assert "--config" in config_error(["--config"])


@pytest.mark.parametrize("suffix,text", [(".toml", "max_steps = [\n"), (".json", "{not json")])
def test_config_file_that_does_not_parse(tmp_path, suffix, text):
    f = tmp_path / f"broken{suffix}"
    f.write_text(text)
    message = config_error(["--config", str(f)])
    assert "does not parse" in message and f.name in message


@pytest.mark.parametrize(
    "suffix,text,key",
    [
        (".toml", "max_stepz = 3\n", "max_stepz"),
        (".toml", "[ckpt]\nintervall = 3\n", "intervall"),
        (".toml", "[model]\nn_layers = 3\n", "n_layers"),
        (".toml", "[nonsense]\na = 1\n", "nonsense"),
        (".json", '{"ckpt": {"intervall": 3}}', "intervall"),
    ],
)
def test_unknown_config_file_key(tmp_path, suffix, text, key):
    f = tmp_path / f"cfg{suffix}"
    f.write_text(text)
    message = config_error(["--config", str(f)])
    assert key in message
    assert "unknown" in message


def test_unknown_nested_config_key_names_its_section_and_suggests_the_fix(tmp_path):
    f = tmp_path / "cfg.toml"
    f.write_text("[ckpt]\nintervall = 3\n")
    message = config_error(["--config", str(f)])
    assert "ckpt." in message
    assert "interval" in message.replace("intervall", "")  # the suggestion


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_wrongly_typed_config_file_value_is_a_config_error(tmp_path):
    f = tmp_path / "cfg.toml"
    f.write_text('max_steps = "abc"\n')
    assert "max_steps" in config_error(["--config", str(f)]).replace("-", "_")


# -- invalid CLI input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--bogus", "1"], "--bogus"),
        (["--ckpt.intervall", "3"], "--ckpt.intervall"),
        (["--max_stepz", "3"], "--max_stepz"),
    ],
)
def test_unknown_cli_option(argv, needle):
    message = config_error(argv)
    assert needle in message
    assert "unknown" in message


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--max-steps", "abc"], "--max-steps"),
        (["--seed", "1.5"], "--seed"),
        (["--max-steps", "0"], "--max-steps"),
        (["--ckpt.keep", "0"], "--ckpt.keep"),
        (["--ckpt.interval", "-1"], "--ckpt.interval"),
        (["--model.n-embd", "130", "--model.n-head", "4"], "--model.n-embd"),
        (["--model.dropout", "1.0"], "--model.dropout"),
        (["--global-batch-size", "0"], "--global-batch-size"),
        (["--micro-batch-size", "0"], "--micro-batch-size"),
        (["--task", "not a task"], "--task"),
        (["--dist.backend", "mpi"], "--dist.backend"),
    ],
)
def test_invalid_value(argv, needle):
    assert needle in config_error(argv)


def test_nonexistent_data_path(tmp_path):
    missing = tmp_path / "no-such-corpus.txt"
    # A permanent, one-line error before any process group: ConfigError (exit 2) or DataError (exit 3).
    with pytest.raises((ConfigError, DataError)) as info:
        parse(["--data.path", str(missing)])
    message = str(info.value)
    assert "\n" not in message
    assert "--data.path" in message and "no-such-corpus.txt" in message


def test_existing_data_path_is_accepted(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\n")
    assert parse(["--data.path", str(corpus)]).data.path == str(corpus)


def test_validate_is_what_parse_uses():
    cfg = Config()
    cfg.ckpt.keep = 0
    with pytest.raises(ConfigError, match=r"--ckpt\.keep"):
        config.validate(cfg)
    config.validate(Config())  # defaults are valid


# -- fingerprint ----------------------------------------------------------------------------------


def _changed(**changes) -> Config:
    cfg = Config()
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = cfg
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, value)
    return cfg


def test_fingerprint_is_stable():
    assert fingerprint(Config()) == fingerprint(Config())
    assert fingerprint(Config()) == fingerprint(parse([]))
    fp = fingerprint(Config())
    assert isinstance(fp, str) and len(fp) == 16


@pytest.mark.parametrize(
    "changes",
    [
        {"model__n_layer": 2},
        {"model__n_embd": 64},
        {"model__n_head": 8},
        {"model__dropout": 0.0},
        {"data__seq_len": 64},
        {"data__path": "/some/other/corpus"},
        {"data__val_every": 10},
        {"task": "my.pkg:build"},
    ],
)
def test_fingerprint_changes_with_shape_or_data_meaning(changes):
    assert fingerprint(_changed(**changes)) != fingerprint(Config())


@pytest.mark.parametrize(
    "changes",
    [
        {"optim__lr": 1e-4},
        {"optim__warmup_steps": 0},
        {"max_steps": 5},
        {"seed": 1},
        {"run_dir": "elsewhere"},
        {"global_batch_size": 64},
        {"ckpt__interval": 1},
        {"ckpt__keep": 9},
        {"ckpt__async_save": False},
        {"dist__timeout_s": 5.0},
        {"watchdog__enabled": False},
        {"data__cache_dir": "/tmp/x"},
        {"log_interval": 1},
    ],
)
def test_fingerprint_ignores_settings_a_resume_may_change(changes):
    assert fingerprint(_changed(**changes)) == fingerprint(Config())


def test_fingerprint_via_parse():
    base = fingerprint(parse([]))
    assert fingerprint(parse(["--max-steps", "5", "--optim.lr", "0.1", "--ckpt.keep", "1"])) == base
    assert fingerprint(parse(["--data.seq-len", "32"])) != base
    assert fingerprint(parse(["--model.n-layer", "1"])) != base


def test_to_dict_is_json_serialisable():
    d = config.to_dict(Config())
    assert json.loads(json.dumps(d)) == d
    assert d == dataclasses.asdict(Config())


# -- the entry point, as a user runs it ------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    drop = {"FTJOB_FAULT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TORCHELASTIC")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_main_bad_value_exits_2_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(MAIN), "--run-dir", str(run_dir), "--max-steps", "abc"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=_clean_env(),
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == EXIT_CONFIG == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert "--max-steps" in lines[0]
    assert "Traceback" not in proc.stderr
    # It failed while parsing, before any training or process-group set-up: at most the records
    # of its ending may be left in the run dir, no training rows, no checkpoints.
    leftovers = {p.name for p in run_dir.iterdir()} if run_dir.exists() else set()
    assert leftovers <= {"exit_status.json", "metrics.jsonl"}, leftovers
    assert {r["kind"] for r in records.read(run_dir)} <= {"end"}
    assert elapsed < 30


def test_main_help_lists_the_main_options(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(MAIN), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**_clean_env(), "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    for option in ("--ckpt.interval", "--ckpt.keep", "--run-dir", "--max-steps", "--seed"):
        assert option in proc.stdout, option
    assert "Traceback" not in proc.stderr
    # It opens with what the job does for its user, not with how the parser works.
    assert "resumes from the newest" in " ".join(proc.stdout.split()[:80]), proc.stdout[:800]
    assert "tyro" not in proc.stdout
