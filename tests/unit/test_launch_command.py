"""launch/command.py: which arguments are torchrun's, and the torchrun command the launcher runs."""

from __future__ import annotations

import pytest

from launch import command
from launch.supervise import QuietStop
from train import config

MAIN = command.train_script()


def test_leading_torchrun_options_are_torchruns_the_rest_the_jobs() -> None:
    argv = ["--nnodes=2", "--nproc-per-node", "4", "--standalone", "--max-steps", "5", "--seed", "1"]
    assert command.split(argv) == (["--nnodes=2", "--nproc-per-node", "4", "--standalone"],
                                   ["--max-steps", "5", "--seed", "1"])  # fmt: skip
    assert command.split(["--max-restarts=1", "--", "--nnodes", "x"]) == (
        ["--max-restarts=1"],
        ["--nnodes", "x"],
    )
    assert command.split(["--run-dir", "r"]) == ([], ["--run-dir", "r"])


def test_options_that_replace_the_script_or_lack_a_value_are_refused() -> None:
    with pytest.raises(command.UsageError, match="always runs train/main"):
        command.split(["--module", "x"])
    with pytest.raises(command.UsageError, match="needs a value"):
        command.split(["--nnodes"])


def test_no_job_option_is_also_a_torchrun_option() -> None:
    # Otherwise `ftjob --that-option ...` without `--` would mean something else than intended.
    torchrun = set(command._parser()._option_string_actions)
    assert not torchrun & set(config._flags(config.Config))


def test_one_node_gets_the_recovery_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PET_NNODES", "PET_RDZV_ENDPOINT", "PET_MAX_RESTARTS", "PET_RDZV_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    plan = command.plan(["--nproc-per-node=2"], ["--max-steps", "5"], torchrun=["torchrun"])
    signals = f"--signals-to-handle={command.SIGNALS}"
    assert plan.command == ["torchrun", "--nproc-per-node=2", "--max-restarts=3", signals, "--standalone",
                            "--local-addr=127.0.0.1", MAIN, "--max-steps", "5"]  # fmt: skip
    assert not plan.multi_node
    # What the user set stays as it is.
    plan = command.plan(["--max-restarts=0", "--signals-to-handle=SIGTERM"], [], torchrun=["t"])
    assert plan.command == ["t", "--max-restarts=0", "--signals-to-handle=SIGTERM", "--standalone",
                            "--local-addr=127.0.0.1", MAIN]  # fmt: skip


def test_pet_environment_as_a_pytorchjob_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Kubeflow's training operator sets PET_NNODES, PET_RDZV_ENDPOINT, PET_RDZV_BACKEND, ...
    monkeypatch.setenv("PET_NNODES", "2:4")
    monkeypatch.setenv("PET_RDZV_ENDPOINT", "job-master-0:23456")
    monkeypatch.setenv("PET_RDZV_BACKEND", "c10d")
    monkeypatch.setenv("PET_MAX_RESTARTS", "7")
    monkeypatch.setenv("PET_RDZV_CONF", "join_timeout=900")
    plan = command.plan([], [], torchrun=["t"])
    assert plan.multi_node and (plan.backend, plan.endpoint) == ("c10d", "job-master-0:23456")
    flags = plan.command[1 : plan.command.index(MAIN)]
    assert not any(f.startswith(("--max-restarts", "--rdzv-backend", "--standalone")) for f in flags)
    assert (
        f"--rdzv-conf={','.join(f'{k}={v}' for k, v in command.RDZV_CONF.items())},join_timeout=900" in flags
    )


def test_several_nodes_need_a_rendezvous_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PET_RDZV_ENDPOINT", raising=False)
    with pytest.raises(command.UsageError, match="--rdzv-endpoint"):
        command.plan(["--nnodes=2"], [])
    with pytest.raises(command.UsageError, match="key=value"):
        command.plan(["--nnodes=2", "--rdzv-endpoint=h:1", "--rdzv-conf=oops"], [])


# --- launch/supervise.py: what of torchrun's stderr is shown -----------------------------------------

STOPPED = (
    b"W1202 07:26:20 api.py:753] Received 15 death signal, shutting down workers\n"
    b"Traceback (most recent call last):\n"
    b'  File "/venv/bin/torchrun", line 8, in <module>\n'
    b"    sys.exit(main())\n"
    b"\n"
    b"The above exception was the direct cause of the following exception:\n"
    b"\n"
    b"Traceback (most recent call last):\n"
    b'  File "api.py", line 1, in _terminate\n'
    b"torch.distributed.elastic.multiprocessing.api.SignalException: Process 3600 got signal: 15\n"
)


def shown(chunks: list[bytes], quiet: bool) -> bytes:
    out: list[bytes] = []
    stream = QuietStop(out.append, lambda: quiet)
    for chunk in chunks:
        stream.feed(chunk)
    stream.close()
    return b"".join(out)


@pytest.mark.parametrize("cut", [1, 7, 40, 10_000])
def test_torchruns_traceback_is_dropped_only_when_the_job_stopped_it(cut: int) -> None:
    chunks = [STOPPED[i : i + cut] for i in range(0, len(STOPPED), cut)]
    assert shown(chunks, quiet=True) == STOPPED.split(b"Traceback")[0]  # the warning line stays
    assert shown(chunks, quiet=False) == STOPPED
    crash = STOPPED.replace(b"torch.distributed.elastic.multiprocessing.api.SignalException", b"ValueError")
    assert shown([crash], quiet=True) == crash  # any other traceback is shown


def test_a_progress_bar_is_not_held_back() -> None:
    out: list[bytes] = []
    stream = QuietStop(out.append, lambda: True)
    stream.feed(b"\r 10%|#    | 10/100")
    assert out == [b"\r 10%|#    | 10/100"]
    stream.feed(b"\r 20%|##   | 20/100\n[rank0] step 20\n")
    assert b"".join(out) == b"\r 10%|#    | 10/100\r 20%|##   | 20/100\n[rank0] step 20\n"


def test_cpp_store_warnings_are_dropped_only_after_a_permanent_error() -> None:
    warning = (
        b"[W1202 08:02:29.58 TCPStore.cpp:138] [c10d] recvValueWithTimeout failed on SocketImpl(fd=3)\n"
        b"Exception raised from recvBytes at Utils.hpp:787 (most recent call first):\n"
        b"frame #0: c10::Error::Error(c10::SourceLocation) + 0x9d\n"
        b"<omitting python frames>\n"
        b"frame #22: <unknown function> + 0x1098ec\n"
        b"\n"
    )
    after = b"W1202 08:02:29.78 api.py:1028] Sending process 19113 closing signal SIGTERM\n"
    assert shown([warning + after], quiet=True) == after
    assert shown([warning + after], quiet=False) == warning + after


def test_every_world_size_of_the_elastic_range_is_checked_before_the_rendezvous() -> None:
    from train import preflight
    from train.errors import ConfigError

    assert command._world_sizes("1:3", "4") == (4, 8, 12)
    assert command._world_sizes("2", "8") == (16,)
    assert command._world_sizes("1:2", "gpu") == ()  # known only on the node
    cfg = config.parse(["--global-batch-size", "24"])
    preflight.check_world_sizes(cfg, (4, 8, 12, 24))  # 24 splits over each
    with pytest.raises(
        ConfigError, match=r"world size\(s\) 16, which the elastic range allows; use a multiple of 48"
    ):
        preflight.check_world_sizes(cfg, (8, 16, 24))
    assert command.plan(["--nnodes=1:3", "--nproc-per-node=4", "--rdzv-endpoint=h:1"], []).world_sizes == (
        4,
        8,
        12,
    )


def test_etcds_tls_settings_reach_the_launchers_own_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PET_NNODES", "PET_RDZV_ENDPOINT", "PET_RDZV_BACKEND", "PET_RDZV_CONF"):
        monkeypatch.delenv(name, raising=False)
    conf = "protocol=https,ca_cert=/c/ca.pem,ssl_cert=/c/me.pem,ssl_cert_key=/c/me-key.pem,join_timeout=60"
    plan = command.plan(
        ["--nnodes=2", "--rdzv-backend=etcd-v2", "--rdzv-endpoint=etcd:2379", f"--rdzv-conf={conf}"],
        [],
        torchrun=["t"],
    )
    assert plan.tls == {"protocol": "https", "ca_cert": "/c/ca.pem", "ssl_cert": "/c/me.pem",
                        "ssl_cert_key": "/c/me-key.pem"}  # fmt: skip
    assert command.plan(["--nproc-per-node=2"], [], torchrun=["t"]).tls == {}
