"""Large host buffers that are cheap to fill the first time.

A fresh 4 KiB page costs a fault on first touch (here, in a VM: ~3 us each, 1.5 s for 512 MB read
into new memory); a buffer of huge pages needs 512 times fewer. So buffers a checkpoint is read or
received into are private anonymous mappings advised as huge pages (where the kernel offers
transparent huge pages in madvise mode), and plain numpy memory otherwise.
"""

from __future__ import annotations

import contextlib
import mmap

import numpy as np

HUGE_PAGE = 2 << 20


def host_buffer(size: int) -> np.ndarray:
    """``size`` uninitialised, writable bytes; freed with the last reference to the array."""
    if size < HUGE_PAGE:
        return np.empty(size, dtype=np.uint8)
    # Private: a forked child (a DataLoader worker) must not share it.
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or no THP: plain pages
        area.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(area, dtype=np.uint8)
