"""``wlcad batch merge DIR``: check that a sharded run's shard summaries cover its manifest exactly
once, then write the summary an unsharded run writes (:mod:`services.batch.shards` says how cases are
split).

What is checked, each failure an :class:`InputError` naming what to rerun: every shard 0 … N − 1 left
its summary (a missing one names its ``--shard K/N``); all shards ran the same command, settings and
manifest (by content digest: a manifest edited between shards is refused); each manifest case is in
exactly the shard that owns it, and no shard lists a case the manifest lacks.

The merged summary is built only from what the result depends on — the per-case outputs and rows, in
manifest order (``estimate``: ``summary.csv``) or sorted case order (``detect``: ``summary/summary.json``
and ``summary/froc.json``) — never from a run's history (which cases a rerun found done, timings), so
it is byte-identical to a fresh unsharded run's, whatever the split or the retries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from services.batch.shards import Shard, manifest_sha256, shard_of, shard_summaries
from services.core.errors import InputError

#: Where each command keeps its shard summaries, relative to the batch folder.
_SUMMARY_FOLDERS = {"estimate": ".", "detect": "summary"}
#: At most this many case ids in an error message.
_SHOWN = 5


@dataclass(frozen=True)
class MergeResult:
    command: str
    shards: int
    cases: int
    written: tuple[Path, ...]
    status: int


def _shown(cases: list[str]) -> str:
    more = f" and {len(cases) - _SHOWN} more" if len(cases) > _SHOWN else ""
    return ", ".join(repr(c) for c in cases[:_SHOWN]) + more


def _find(folder: Path) -> tuple[str, int, list[dict]]:
    """(command, N, the shard documents in shard order) of ``folder``, every shard present."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder", field="dir")
    found = {command: shard_summaries(folder / sub) for command, sub in _SUMMARY_FOLDERS.items()}
    found = {command: paths for command, paths in found.items() if paths}
    if not found:
        raise InputError(
            f"{folder} holds no shard summary (summary.shard-K-of-N.json): run the shards with "
            "--shard K/N into it first",
            field="dir",
        )
    if len(found) > 1:
        raise InputError(f"{folder} holds shards of both {' and '.join(sorted(found))}", field="dir")
    ((command, paths),) = found.items()
    counts = sorted({n for _, n in paths})
    if len(counts) > 1:
        raise InputError(
            f"{folder} holds shards of runs in {counts} shards; keep one run per folder", field="dir"
        )
    (count,) = counts
    missing = [Shard(k, count) for k in range(count) if (k, count) not in paths]
    if missing:
        raise InputError(
            f"{len(missing)} of {count} shards have not finished: "
            + ", ".join(f"{s.summary_name} (rerun --shard {s})" for s in missing),
            field="shard",
        )
    documents = []
    for k in range(count):
        path = paths[(k, count)]
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{path.name}: not readable JSON ({exc}); rerun --shard {k}/{count}", field="shard"
            ) from None
        if document.get("command") != command or (document.get("shard"), document.get("shards")) != (
            k,
            count,
        ):
            raise InputError(
                f"{path.name}: its content is not shard {k}/{count} of a {command} run", field="shard"
            )
        documents.append(document)
    return command, count, documents


def _manifest_cases(command: str, manifest: Path) -> set[str]:
    if command == "estimate":
        from services.core.manifest import read_lesions

        return {lesion.case_id for lesion in read_lesions(manifest)}
    from services.batch.detect import manifest_cases

    return manifest_cases(manifest).case_ids


def _check_cover(command: str, count: int, documents: list[dict], manifest: Path) -> None:
    settings = documents[0].get("settings")
    for document in documents[1:]:
        if document.get("settings") != settings:
            raise InputError(
                f"shard {document['shard']}/{count} ran with {document.get('settings')}, shard 0 with "
                f"{settings}: rerun the shards with the same options",
                field="shard",
            )
    digest = manifest_sha256(manifest)
    changed = [d["shard"] for d in documents if d.get("manifest_sha256") != digest]
    if changed:
        raise InputError(
            f"{manifest.name} differs from the manifest shard(s) {changed} ran on; rerun them",
            field="manifest",
        )
    expected = _manifest_cases(command, manifest)
    seen: dict[str, int] = {}
    for document in documents:
        k = document["shard"]
        for case in document["cases"]:
            if case in seen:
                raise InputError(f"case {case!r} is in shards {seen[case]} and {k}", field="shard")
            if shard_of(case, count) != k:
                raise InputError(
                    f"case {case!r} is in shard {k}, but belongs to shard {shard_of(case, count)}",
                    field="shard",
                )
            seen[case] = k
    uncovered = sorted(expected - set(seen))
    if uncovered:
        shards = sorted({shard_of(c, count) for c in uncovered})
        raise InputError(
            f"{len(uncovered)} manifest case(s) in no shard summary: {_shown(uncovered)} "
            f"(rerun shard(s) {', '.join(f'{k}/{count}' for k in shards)})",
            field="shard",
        )
    extra = sorted(set(seen) - expected)
    if extra:
        raise InputError(
            f"{len(extra)} case(s) of the shards are not in {manifest.name}: {_shown(extra)}",
            field="manifest",
        )


def merge(folder: Path, manifest: Path | None = None) -> MergeResult:
    """Check the shards of ``folder`` and write its merged summary (see the module's docstring).
    ``manifest`` defaults to the one the shards recorded.

    Raises:
        InputError: naming ``dir``, ``shard`` or ``manifest``.
    """
    folder = Path(folder)
    command, count, documents = _find(folder)
    recorded = {d.get("manifest") for d in documents}
    if manifest is None:
        if len(recorded) != 1 or not isinstance(next(iter(recorded)), str):
            raise InputError("the shards recorded different manifests: give --manifest", field="manifest")
        manifest = Path(next(iter(recorded)))
    if not manifest.is_file():
        raise InputError(f"{manifest} does not exist", field="manifest")
    _check_cover(command, count, documents, manifest)
    cases = sum(len(d["cases"]) for d in documents)
    if command == "estimate":
        from services.label_estimation.batch import write_merged_summary

        path = write_merged_summary(folder, documents)
        print(f"estimate: {cases} cases from {count} shards → {path}")
        return MergeResult(command, count, cases, (path,), 0)
    from services.batch.detect import write_merged

    written, status = write_merged(folder, manifest, documents)
    return MergeResult(command, count, cases, tuple(written), status)
