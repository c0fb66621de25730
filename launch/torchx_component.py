"""A TorchX component that runs the job through ftjob, on any TorchX scheduler.

    torchx run -s local_cwd launch/torchx_component.py:ftjob -j 2x2 -- --run-dir runs/exp1
    torchx run -s kubernetes launch/torchx_component.py:ftjob -j 2:4x8 --image ftjob:latest -- ...

TorchX's own ``dist.ddp`` fixes its command to plain torchrun, which exits 1 for every failure and
checks nothing before the rendezvous. This component runs ``ftjob`` on every node instead, so a
TorchX job gets what the other launchers get: the options checked in a second on every node (a bad
one exits 2 at once), torchrun's restarts with the stop signals handled, and the job's exit class
(launch/README.md). Import nothing of the project here: TorchX loads this file on the submitting
machine, which may have TorchX and not the job; its annotations are what TorchX's linter accepts.
"""

import re
import shlex
from typing import Dict, List, Optional  # noqa: UP035 (TorchX's linter reads these names, not | or dict[])

from torchx import specs

_J = re.compile(r"^(?:(\d+):)?(\d+)x(\d+)$")


class _Unquoted(str):
    """A command-line word left to the node's shell (it names an environment variable)."""


def ftjob(
    *job_args: str,
    j: str = "1x2",
    image: str = "ftjob:latest",
    name: str = "ftjob",
    h: Optional[str] = None,  # noqa: UP045
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,  # TorchX's name for it
    env: Optional[Dict[str, str]] = None,  # noqa: UP006, UP045
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,  # noqa: UP006, UP045
) -> specs.AppDef:
    """The job on NODES nodes of NPROC ranks each, every node started by ftjob.

    Args:
        job_args: options of train/main.py (`--run-dir runs/exp1 --max-steps 500`)
        j: [MIN_NODES:]NODESxNPROC, e.g. 2x8, or 2:4x8 for an elastic job of 2 to 4 nodes
        image: the image (docker/Dockerfile's); the working directory for local_cwd
        name: the application's name
        h: a registered named resource (takes precedence over cpu, gpu, memMB)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node, in MB
        env: environment of every node (FTJOB_JOB_SECRET for an authenticated verdict, NCCL_*, ...)
        max_retries: scheduler retries of the whole job; ftjob restarts failed workers itself
            (3 times by default) and a permanent error (exit 1-127) should not be retried
        rdzv_port: the rendezvous port on the first node, for several nodes
        mounts: mounts (type=bind,src=/host,dst=/job) where the scheduler supports them
    """
    match = _J.match(j)
    if not match:
        raise ValueError(f"-j {j!r}: expected [MIN_NODES:]NODESxNPROC, e.g. 2x8 or 2:4x8")
    low, nodes, nproc = int(match.group(1) or match.group(2)), int(match.group(2)), int(match.group(3))
    if not 1 <= low <= nodes or nproc < 1:
        raise ValueError(f"-j {j!r}: need 1 <= MIN_NODES <= NODES and NPROC >= 1")
    command = ["ftjob", f"--nnodes={low}:{nodes}" if low != nodes else f"--nnodes={nodes}"]
    command.append(f"--nproc-per-node={nproc}")
    if nodes > 1:
        # The scheduler names the first node's host in an environment variable; the shell reads it.
        endpoint = _Unquoted(f"--rdzv-endpoint=$${{{specs.macros.rank0_env}:=localhost}}:{rdzv_port}")
        command += [endpoint, f"--rdzv-id={specs.macros.app_id}"]
    command += ["--", *job_args]
    script = " ".join(w if isinstance(w, _Unquoted) else shlex.quote(w) for w in command)
    return specs.AppDef(
        name=name,
        roles=[
            specs.Role(
                name="ftjob",
                image=image,
                entrypoint="bash",
                args=["-c", script],
                min_replicas=low,
                num_replicas=nodes,
                resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h),
                env=dict(env or {}),
                port_map={"c10d": rdzv_port},
                max_retries=max_retries,
                mounts=specs.parse_mounts(mounts) if mounts else [],
            )
        ],
    )
