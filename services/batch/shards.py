"""Which shard of a batch a case belongs to, the lock a shard holds and the summary file it writes.

Every sharded command (``wlcad detect|estimate --manifest M --out DIR --shard K/N``) and ``wlcad batch
merge`` take the case → shard assignment from here, so they cannot disagree.

* **Assignment** by a hash of the case id, ``int(sha256(case_id)[:8], 16) % N``, not by manifest
  position: it is the same on every machine and in every run, whatever the manifest's row order, so
  a rerun of shard k (a retried pod) touches exactly the cases it touched before, and the lesions of
  one case (several rows) always land in one shard.
* **Locks**: a shard holds a *shared* ``flock`` on the output folder (shards run side by side; an
  unsharded batch, which holds it exclusively, cannot run among them) and an exclusive one on its own
  hidden lock file (two processes of one shard would delete each other's temporaries). The kernel
  drops both when the process dies, SIGKILL included.
* **Summary**: a shard writes only its own ``summary.shard-K-of-N.json`` (atomically, at its end),
  holding its case list and what the merge needs; never a file another shard writes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.atomic import write_bytes_atomically
from services.core.errors import InputError

FIELD = "shard"
#: ``summary.shard-K-of-N.json``: the one name pattern of a shard's summary.
SUMMARY_PATTERN = re.compile(r"summary\.shard-([0-9]+)-of-([0-9]+)\.json")
_SPEC = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*")


def shard_of(case_id: str, count: int) -> int:
    """The shard (0 … count − 1) that processes ``case_id``: stable across runs, machines and row order."""
    return int(hashlib.sha256(case_id.encode("utf-8")).hexdigest()[:8], 16) % count


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``--shard index/count``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise InputError(f"needs N ≥ 1 shards, got {self.count}", field=FIELD)
        if not 0 <= self.index < self.count:
            raise InputError(
                f"K must be in 0 … {self.count - 1} for N = {self.count}, got {self.index}", field=FIELD
            )

    def owns(self, case_id: str) -> bool:
        return shard_of(case_id, self.count) == self.index

    @property
    def summary_name(self) -> str:
        return f"summary.shard-{self.index}-of-{self.count}.json"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str | None) -> Shard | None:
    """``"K/N"`` (what ``--shard`` takes; a Job passes ``$JOB_COMPLETION_INDEX/N``) → :class:`Shard`;
    ``None`` → ``None`` (an unsharded run).

    Raises:
        InputError: naming ``shard`` when the text is not K/N with 0 ≤ K < N.
    """
    if text is None:
        return None
    match = _SPEC.fullmatch(text)
    if match is None:
        raise InputError(f"must be K/N (shard K of N, 0 ≤ K < N), got {text!r}", field=FIELD)
    return Shard(int(match.group(1)), int(match.group(2)))


def manifest_sha256(path: Path) -> str:
    """The manifest's content digest: the merge refuses shards that ran on another manifest."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shard_summaries(folder: Path) -> dict[tuple[int, int], Path]:
    """(K, N) → path of every ``summary.shard-K-of-N.json`` in ``folder`` (none when it does not exist)."""
    if not folder.is_dir():
        return {}
    found = {}
    for name in os.listdir(folder):
        match = SUMMARY_PATTERN.fullmatch(name)
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = folder / name
    return found


def refuse_other_counts(folder: Path, shard: Shard) -> None:
    """A shard of N must not join a folder holding shard summaries of another N: their case sets
    overlap, and the merge could not tell which run a case belongs to.

    Raises:
        InputError: naming ``shard``.
    """
    others = sorted({n for _, n in shard_summaries(folder) if n != shard.count})
    if others:
        raise InputError(
            f"{folder} holds the summaries of a run in {others[0]} shards; give --shard K/{others[0]} "
            "or another --out",
            field=FIELD,
        )


def write_shard_summary(folder: Path, shard: Shard, payload: dict[str, Any]) -> Path:
    """Write the shard's summary (atomic: present means the shard finished)."""
    document = {"shard": shard.index, "shards": shard.count, **payload}
    return write_bytes_atomically(
        folder / shard.summary_name, (json.dumps(document, indent=2) + "\n").encode()
    )


@contextmanager
def batch_lock(out: Path, shard: Shard | None, summaries: Path | None = None) -> Iterator[None]:
    """Hold the locks of a batch writing into ``out`` (an existing folder) for the block's duration.

    Unsharded: an exclusive ``flock`` on the folder. Sharded: a shared one on the folder, then (once
    :func:`refuse_other_counts` passed on the ``summaries`` folder, default ``out``) an exclusive one
    on the shard's hidden lock file ``.shard-K-of-N.lock`` (left behind, empty).

    Raises:
        InputError: naming ``out`` when another batch holds what this one needs, ``shard`` when
            ``summaries`` holds a run in another number of shards.
    """
    handles = [os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))]
    try:
        _lock(
            handles[0],
            fcntl.LOCK_EX if shard is None else fcntl.LOCK_SH,
            f"another batch is writing into {out}",
        )
        if shard is not None:
            refuse_other_counts(out if summaries is None else summaries, shard)
            lock_file = out / f".shard-{shard.index}-of-{shard.count}.lock"
            handles.append(os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666))
            _lock(handles[1], fcntl.LOCK_EX, f"another process is running shard {shard} into {out}")
        yield
    finally:
        for handle in handles:
            os.close(handle)


def _lock(handle: int, mode: int, message: str) -> None:
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InputError(f"{message}; wait for it to end", field="out") from None
