"""Pull a CIRCUS DB case, estimate voxel labels from its weak labels, post them as a new revision.

For each series of the case's latest revision that holds weak labels (:mod:`labels`), the volume is
fetched from CIRCUS RS and label estimation (:mod:`services.label_estimation`) runs on it; each mask
becomes a CIRCUS voxel label (its tight box and packed bits, :mod:`circus_label`) whose blob is stored
first, then one revision is posted with the series' labels: the reader's weak labels kept, the ones
wlcad wrote before replaced by the new ones.

The volume is placed in CIRCUS's own frame: axes along the stored volume, voxel ``i`` centred at
``(i + 0.5)·s`` mm, so a CIRCUS position *is* a world position of that volume and a mask's voxel box
is already a CIRCUS voxel label's ``origin``/``size``. CIRCUS RS gives no patient orientation, which
estimation does not need (it works in mm on the grid).

Idempotent: a rerun whose labels equal the latest revision's (same masks, so the same sha1s) posts
nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.circus_db.client import CircusDbClient
from services.circus_db.labels import SkippedLabel, weak_labels
from services.core.errors import InputError
from services.core.uids import check_uid
from services.core.version import software_version
from services.core.volume import Volume
from services.label_estimation.circus_label import circus_voxel_label
from services.label_estimation.pipeline import LabelEstimator

__all__ = ["WLCAD_LABEL_PREFIX", "SeriesSync", "SyncResult", "circus_volume", "sync_case"]

log = logging.getLogger(__name__)

#: Labels wlcad writes are named with this prefix; a later sync replaces exactly those.
WLCAD_LABEL_PREFIX = "wlcad:"
LABEL_COLOR = "#ff8000"
LABEL_ALPHA = 0.6


@dataclass(frozen=True)
class LesionSync:
    """One estimated lesion: where its weak label came from and how far to trust the mask."""

    lesion_id: int
    kind: str
    source_labels: tuple[int, ...]
    voxels: int
    qc_passed: bool
    blob_sha1: str | None


@dataclass(frozen=True)
class SeriesSync:
    """``series_index``: the series' place in the revision (its UID is not reported: it identifies a study)."""

    series_index: int
    lesions: tuple[LesionSync, ...] = ()
    skipped: tuple[SkippedLabel, ...] = ()
    replaced_labels: int = 0


@dataclass(frozen=True)
class SyncResult:
    case_id: str
    method: str
    revision_posted: bool
    series: tuple[SeriesSync, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "method": self.method,
            "revision_posted": self.revision_posted,
            "series": [
                {
                    "series_index": s.series_index,
                    "lesions": [
                        vars(lesion) | {"source_labels": list(lesion.source_labels)} for lesion in s.lesions
                    ],
                    "skipped": [vars(k) for k in s.skipped],
                    "replaced_labels": s.replaced_labels,
                }
                for s in self.series
            ],
        }


def circus_volume(array_zyx: np.ndarray, voxel_size_mm: tuple[float, float, float]) -> Volume:
    """The volume in CIRCUS's frame: voxel ``i`` at ``(i + 0.5)·s`` mm, axes along the stored array."""
    spacing = tuple(float(v) for v in voxel_size_mm)
    return Volume(np.asarray(array_zyx), spacing, origin=tuple(s / 2 for s in spacing))


def _is_wlcad(label: Any) -> bool:
    return isinstance(label, dict) and str(label.get("name") or "").startswith(WLCAD_LABEL_PREFIX)


def sync_case(
    client: CircusDbClient,
    case_id: str,
    *,
    method: str = "threshold",
    estimator: LabelEstimator | None = None,
    dry_run: bool = False,
    progress: Callable[[str], None] = lambda line: None,
) -> SyncResult:
    """Estimate the case's weak labels and post a revision with the voxel labels (unless unchanged
    or ``dry_run``). Raises :class:`InputError` for malformed labels, ``CircusDbError`` for CIRCUS."""
    estimator = estimator or LabelEstimator()
    case = client.get_case(case_id)
    latest = case["revisions"][-1]
    if not isinstance(latest, dict) or not isinstance(latest.get("series"), list):
        raise InputError("the latest revision has no series list", field="revision")
    new_series: list[dict[str, Any]] = []
    reports: list[SeriesSync] = []
    blobs: dict[str, bytes] = {}
    for index, entry in enumerate(latest["series"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("labels"), list):
            raise InputError("needs seriesUid and a labels list", field=f"series[{index}]")
        uid = check_uid(entry.get("seriesUid"), "seriesUid")
        readers = [label for label in entry["labels"] if not _is_wlcad(label)]
        replaced = len(entry["labels"]) - len(readers)
        partial = entry.get("partialVolumeDescriptor")
        metadata = None
        found = None
        if any(
            isinstance(label, dict) and label.get("type") in ("ellipsoid", "cuboid", "point", "ruler")
            for label in readers
        ):
            metadata = client.series_metadata(uid, partial)
            progress(f"series {index}: fetching {metadata.voxel_count_xyz} voxels")
            volume = circus_volume(client.series_volume(uid, metadata, partial), metadata.voxel_size_mm)
            try:
                found = weak_labels(readers, volume)
            except InputError as exc:
                raise InputError(exc.message, field=f"series[{index}].{exc.field}") from None
        if found is None or not found.lesions:
            reports.append(SeriesSync(index, (), found.skipped if found else (), 0))
            new_series.append(dict(entry))
            continue
        progress(f"series {index}: estimating {len(found.lesions)} lesion(s) ({method})")
        estimates = estimator.estimate(volume, [w.prompt for w in found.lesions], method)
        produced: list[dict[str, Any]] = []
        lesions: list[LesionSync] = []
        for weak, estimate in zip(found.lesions, estimates, strict=True):
            sha1 = None
            if estimate.mask.tight().voxel_count:
                label, packed = circus_voxel_label(estimate.mask)
                sha1 = label["data"]["voxels"]
                blobs[sha1] = packed
                label["name"] = f"{WLCAD_LABEL_PREFIX} {method} lesion {estimate.lesion_id}"
                label["data"] |= {"color": LABEL_COLOR, "alpha": LABEL_ALPHA}
                label["attributes"] = {}
                produced.append(label)
            lesions.append(
                LesionSync(
                    estimate.lesion_id,
                    weak.kind,
                    weak.source,
                    int(estimate.mask.tight().voxel_count),
                    bool(estimate.qc.passed),
                    sha1,
                )
            )
        reports.append(SeriesSync(index, tuple(lesions), found.skipped, replaced))
        new_series.append(dict(entry) | {"labels": readers + produced})
    unchanged = all(
        new["labels"] == old["labels"] for new, old in zip(new_series, latest["series"], strict=True)
    )
    result = SyncResult(case_id, method, False, tuple(reports))
    if unchanged or dry_run:
        progress(
            "nothing to post: the latest revision already holds these labels" if unchanged else "dry run"
        )
        return result
    for sha1, packed in blobs.items():
        if client.put_blob(packed) != sha1:  # the client hashes the bytes it sends
            raise RuntimeError("blob hash changed between packing and storing")
    revision = {
        "description": f"wlcad {software_version()} label estimation ({method}) from the weak labels",
        "attributes": latest.get("attributes") if isinstance(latest.get("attributes"), dict) else {},
        "status": latest.get("status") if isinstance(latest.get("status"), str) else "draft",
        "series": new_series,
    }
    client.post_revision(case_id, revision)
    log.info("case %s: revision posted with %d voxel label(s)", case_id, sum(len(s.lesions) for s in reports))
    return SyncResult(case_id, method, True, tuple(reports))
