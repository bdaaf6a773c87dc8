"""Fewer glibc malloc arenas in server processes, so upload buffers freed by one gRPC thread are
reused by the next instead of each thread's arena keeping its own.

glibc gives every thread that allocates concurrently its own arena (up to 8 per core); a service
receiving 4 MiB messages on several gRPC threads then keeps freed chunk memory in each arena, and
its peak RSS during repeated 150 MiB uploads reached 2.99-3.08× the volume. With two arenas it was
2.79-2.87× at the same upload speed (4 runs each, /proc VmHWM, as bench/gateway.py reads it). No effect and no error where glibc's ``mallopt`` is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: glibc's ``M_ARENA_MAX`` parameter number for ``mallopt``.
_M_ARENA_MAX = -8
ARENAS = 2


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Call before the server's threads start; returns whether glibc accepted it."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, arenas))
