"""Named points a checkpoint write passes, for whoever wants to act there (the job's fault
injection, a test). The package itself does nothing at them and imports nothing of its users:
they install their callbacks here (``install``), so ``train.ckpt`` works in any training loop.
"""

from __future__ import annotations

from collections.abc import Callable

POINTS = ("ckpt.file_written", "ckpt.before_rename", "ckpt.after_rename", "ckpt.list", "ckpt.file_read")

_on_point: Callable[[str], object] = lambda name: None  # noqa: E731
_on_context: Callable[..., object] = lambda **context: None  # noqa: E731


def install(on_point: Callable[[str], object], on_context: Callable[..., object]) -> None:
    """``on_point(name)`` at each of POINTS; ``on_context(save_step=N)`` when a save of step N starts."""
    global _on_point, _on_context
    _on_point, _on_context = on_point, on_context


def point(name: str) -> None:
    _on_point(name)


def context(**values: int) -> None:
    _on_context(**values)
