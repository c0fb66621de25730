"""Deterministic kernels (``--deterministic true``): what bit-exact resume on GPUs needs."""

from __future__ import annotations

import os
import sys

import torch


def apply(enabled: bool) -> None:
    if not enabled:
        return
    # Before the first cuBLAS call; warn_only so a kernel without a deterministic variant degrades
    # bit-exactness with a warning instead of stopping the job.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_deterministic()
    # Filling every torch.empty() with NaN only catches reads of garbage (this job has none) and
    # costs ~3% of a CPU step.
    torch.utils.deterministic.fill_uninitialized_memory = False


def set_deterministic() -> None:
    """torch.use_deterministic_algorithms(True, warn_only=True) without its ``import
    torch._inductor`` (0.9 s of every start, restarts included), which it needs only to set a flag
    for torch.compile. If inductor is loaded anyway (--compile), its flag is set too."""
    torch._C._set_deterministic_algorithms(True, warn_only=True)
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.deterministic = True
