"""
Giving start-up's freed heap back to the operating system.

Start-up allocates far more than the daemon keeps: source and bytecode
loading, attrs generating every value class's methods, plugin discovery,
configuration and schema building.  CPython frees those objects, but glibc's
allocator keeps the pages it carved them from, so an idle daemon would carry
them as resident memory for its whole life.  :func:`trim_heap` asks glibc to
return every free page (``malloc_trim(0)``) once, when the daemon is ready.
On another C library it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable

from twisted.logger import Logger

log = Logger()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def trim_heap() -> bool:
    """
    Collect start-up's cyclic garbage, then return the allocator's free
    memory to the operating system; whether the C library could (``False``
    when it has no ``malloc_trim``).
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
