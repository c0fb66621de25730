"""One node's permanent failure, told to every other node through the rendezvous, so none waits for it.

A node whose job fails permanently (a bad flag, an incompatible checkpoint, a run dir it cannot
write) writes its verdict - code, one-line reason, node - into the rendezvous store and then closes
the rendezvous: torchrun agents waiting there, or re-joining after their workers lost this node's,
stop at once instead of waiting out join_timeout (600 s) for a node that will never come. Every
node's launcher watches for a verdict while its torchrun runs and, when one came, exits with that
code: the job fails once, with one class, on every node (a scheduler that takes the highest exit
code of all nodes, like srun, would otherwise see a retryable 145 and requeue a job that cannot run).

Anyone who can reach the rendezvous store can write there (see README, "Threat model"). With a
per-job secret (``FTJOB_JOB_SECRET``, the same on every node) a verdict carries an HMAC of it,
and one without a valid HMAC is ignored with one warning line: a forged verdict cannot end a job.

Best effort, with short timeouts: with c10d the store lives in one agent, and once that is gone
there is nobody to tell (its loss stops the other agents anyway). Rendezvous backends: c10d and
etcd-v2; static and the older etcd have no store this can use, and get no verdicts.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import socket
import sys
import threading
import time
from datetime import timedelta

from train.runtime import env

KEY = "ftjob.verdict"
POLL_S = 1.0
PUBLISH_WAIT_S = 2.5  # > POLL_S twice: every watcher reads the verdict before the close stops its torchrun
UNSIGNED = (
    "launch: warning: ignoring a verdict in the rendezvous store that this job's FTJOB_JOB_SECRET "
    "did not sign (forged, or another job's)"
)
STALE_S = 60  # a verdict older than this launch (with etcd, keys outlive jobs) belongs to another job


def _listening(endpoint: str, timeout_s: float) -> bool:
    """Whether a c10d store answers there. Checked first with a plain socket: a TCPStore client
    that finds nobody logs a warning with a C++ stack trace at every retry, into the job's log."""
    host, _, port = endpoint.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
            return True
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def _open(backend: str, endpoint: str, run_id: str, timeout_s: float, tls: dict[str, str] | None = None):
    """(rendezvous backend, store), or None where this backend has no store to share."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    if backend == "c10d" and not _listening(endpoint, timeout_s):
        raise ConnectionError(f"no c10d store at {endpoint}")

    params = RendezvousParameters(
        backend=backend,
        endpoint=endpoint,
        run_id=run_id,
        min_nodes=1,
        max_nodes=1,
        is_host="false",  # never host a c10d store: only join the one torchrun hosts
        read_timeout=str(max(1, round(timeout_s))),
        **(tls or {}),  # the same certificates as torchrun's own connection to etcd
    )
    if backend == "c10d":
        from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
    elif backend == "etcd-v2":
        from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import create_backend
    else:
        return None
    return create_backend(params)


def _key(run_id: str) -> str:
    return f"{KEY}.{run_id}"


def _mac(secret: bytes, payload: str) -> str:
    return hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()


def seal(verdict: dict, secret: bytes | None) -> str:
    """The value stored: the verdict, and its HMAC when the job has a secret."""
    payload = json.dumps(verdict)
    if secret is None:
        return payload
    return json.dumps({"payload": payload, "hmac": _mac(secret, payload)})


def unseal(raw: bytes | str, secret: bytes | None) -> dict | None:
    """The verdict in a stored value; None if it is not one, or (with a secret) not signed by it."""
    try:
        outer = json.loads(raw)
        if secret is None:
            return outer if isinstance(outer, dict) else None
        if not (
            isinstance(outer, dict) and hmac.compare_digest(_mac(secret, outer["payload"]), outer["hmac"])
        ):
            return None
        inner = json.loads(outer["payload"])
    except Exception:  # anything at all written there by anyone
        return None
    return inner if isinstance(inner, dict) else None


def publish(
    backend: str,
    endpoint: str,
    run_id: str,
    code: int,
    reason: str,
    timeout_s: float = 10,
    tls: dict[str, str] | None = None,
) -> bool:
    """Tell the other nodes, then close the rendezvous. False if the rendezvous could not be reached.
    ``tls``: etcd's TLS settings (command.TLS_KEYS) as torchrun was given them."""
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        DynamicRendezvousHandler,
        RendezvousTimeout,
    )

    try:
        opened = _open(backend, endpoint, run_id, timeout_s, tls)
        if opened is None:
            return False
        rdzv_backend, store = opened
        verdict = {"code": code, "reason": reason, "node": socket.gethostname(), "time": time.time()}
        store.set(_key(run_id), seal(verdict, env.job_secret()))
        time.sleep(PUBLISH_WAIT_S)
        handler = DynamicRendezvousHandler.from_backend(
            run_id, store, rdzv_backend, 1, 1, timeout=RendezvousTimeout(close=timedelta(seconds=timeout_s))
        )
        handler.set_closed()
        return True
    except Exception:  # the rendezvous is gone or unreachable: nothing to tell, nobody waits there
        return False


class Watcher:
    """Reads the rendezvous' verdict every POLL_S on a thread, while this node's torchrun runs."""

    def __init__(self, backend: str, endpoint: str, run_id: str, tls: dict[str, str] | None = None):
        self.backend, self.endpoint, self.run_id, self.tls = backend, endpoint, run_id, tls
        self.verdict: dict | None = None
        self._since = time.time() - STALE_S
        self._secret = env.job_secret()
        self._warned = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="verdict-watcher", daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        store = None
        while not self._done.wait(POLL_S) and self.verdict is None:
            try:
                if store is None:
                    opened = _open(self.backend, self.endpoint, self.run_id, POLL_S, self.tls)
                    if opened is None:
                        return
                    store = opened[1]
                if store.check([_key(self.run_id)]):
                    self.verdict = self._parse(store.get(_key(self.run_id)))
            except Exception:  # not up yet, or gone: try again (a new connection) next time
                store = None

    def _parse(self, raw: bytes) -> dict | None:
        verdict = unseal(raw, self._secret)
        if verdict is None and self._secret is not None:
            if not self._warned:
                print(UNSIGNED, file=sys.stderr, flush=True)
            self._warned = True
            return None
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            code = int(verdict["code"])  # type: ignore[index]
            if 1 <= code <= 127 and float(verdict["time"]) >= self._since:  # type: ignore[index]
                return {"code": code, "reason": str(verdict["reason"]), "node": str(verdict["node"])}  # type: ignore[index]
        return None
