"""Give freed heap memory back to the OS, so that a long run's RSS shows its live memory.

glibc keeps freed heap memory that lies below live allocations. A training step allocates
and frees tensors of many sizes (activations, gradients, a packed row's pixels), and the
next steps do not reuse every freed hole, so the process's RSS climbed by 15-20 MiB per
1,000 steps of the tiny VLM while the live tensors stayed constant (3,550 tensors, ~80 MiB
of storage at steps 100 through 600; RSS after ``malloc_trim(0)`` flat at 510-519 MiB).
A save frees a whole transient copy of the model and optimizer state at once, which showed
as a few MiB of RSS per save (tests/unit/test_checkpoint_memory.py).

``malloc_trim(0)`` returns free pages anywhere in the heap; it returns only memory that is
already free, so a real leak still shows. It costs about 3 ms, and up to ~75 ms when much
was freed, so the trainer calls it after each save and at each logging interval, not per
step. Python and torch have no call for this; hence ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (musl, macOS: no such call)."""
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def release_freed_memory() -> bool:
    """Return freed heap memory to the OS; False where the C library has no such call."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
