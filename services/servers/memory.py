"""Fewer glibc malloc arenas in server processes, so upload buffers freed by one gRPC thread are
reused by the next instead of each thread's arena keeping its own; and a way to hand freed memory
back to the system after a burst of streams.

glibc gives every thread that allocates concurrently its own arena (up to 8 per core); a service
receiving 4 MiB messages on several gRPC threads then keeps freed chunk memory in each arena, and
its peak RSS during repeated 150 MiB uploads reached 2.99-3.08× the volume. With two arenas it was
2.79-2.87× at the same upload speed (4 runs each, /proc VmHWM, as bench/gateway.py reads it). No effect and no error where glibc's ``mallopt`` is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: glibc's ``M_ARENA_MAX`` parameter number for ``mallopt``.
_M_ARENA_MAX = -8
ARENAS = 2


@functools.cache
def _glibc_function(name: str, argtypes: tuple, restype):
    """One glibc function, or None where there is no glibc (musl, macOS) or no such function."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        function = getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Call before the server's threads start; returns whether glibc accepted it."""
    mallopt = _glibc_function("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, arenas))


def trim_freed_memory() -> bool:
    """Return memory that glibc holds as free to the system (``malloc_trim(0)``); whether any was.

    glibc keeps freed blocks below each arena's top, so after a burst of streamed messages a
    process's RSS stays at the burst's peak although nothing uses it."""
    malloc_trim = _glibc_function("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
    return malloc_trim is not None and bool(malloc_trim(0))
