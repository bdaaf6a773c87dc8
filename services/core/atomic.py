"""Write files so that readers never see a partial one: a temporary file beside the target, renamed
into place only when complete (``os.replace`` is atomic on one file system), deleted on failure.

Every writer in wlcad goes through :func:`atomic_output`; a resumed batch can then trust that any
file it finds is whole.

Permissions: the result must be readable by whoever could read a file the user wrote with ``open()``
— ``0o666 & ~umask`` (or what the folder's default ACL says). ``tempfile.mkstemp`` always creates
``0o600``, which made every mask, SEG and report unreadable to colleagues. Reading the umask to fix
the mode afterwards is racy (``os.umask`` can only be read by setting it, process-wide, under other
threads' feet), and ``/proc/self/status`` exists on Linux only and ignores default ACLs. So the
temporary file is created the way ``open()`` creates one — ``os.open(O_CREAT | O_EXCL, 0o666)`` — and
the kernel applies the umask (or the default ACL) at creation, atomically, with nothing to read. The
rename keeps the inode, so the target gets exactly that mode.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# O_EXCL: never open a file someone else created under our name (a symlink included, with O_NOFOLLOW).
_CREATE_FLAGS = (
    os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)
_ATTEMPTS = 100
_TOKEN_HEX = 6  # bytes of randomness in a temporary name: 12 hex digits


def temporary_name_pattern(target_name: str, suffix: str = "") -> str:
    """The regular expression (for ``re.fullmatch``) of the temporary names :func:`atomic_output`
    gives ``target_name`` (itself a regular expression), so a cleaner removes exactly wlcad's own
    leftovers of a killed writer and nothing that merely looks alike."""
    return rf"\.{target_name}\.[0-9a-f]{{{2 * _TOKEN_HEX}}}{re.escape(suffix)}"


def _create_temporary(folder: Path, prefix: str, suffix: str) -> Path:
    """Create an empty, new file in ``folder`` with the mode ``open()`` would give it (``0o666`` less
    the umask, applied by the kernel) and return its path; like ``mkstemp`` apart from the mode."""
    for _ in range(_ATTEMPTS):
        candidate = folder / f"{prefix}{secrets.token_hex(_TOKEN_HEX)}{suffix}"
        try:
            handle = os.open(candidate, _CREATE_FLAGS, 0o666)
        except FileExistsError:
            continue
        os.close(handle)
        return candidate
    raise FileExistsError(f"no unused temporary name for {prefix}*{suffix} in {folder}")


@contextmanager
def atomic_output(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (ending in ``suffix``, for writers that infer the format
    from it); on normal exit it replaces ``path``, on any exception it is removed.

    The temporary file already exists (empty) when yielded, so writers that open it for writing keep
    its mode; it lies in the target's folder so that the final ``os.replace`` never crosses file systems.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_temporary(target.parent, f".{target.name}.", suffix)
    try:
        yield temporary
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_output` (whole file or none, umask honoured)."""
    with atomic_output(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)
