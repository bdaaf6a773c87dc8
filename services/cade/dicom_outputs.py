"""DICOM outputs of a detection run that depend on the task: the SEG of the candidates' spheres.

One place for the CLI's ``wlcad pacs run`` and the Detection service, so both store the same SEG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.cade.pipeline import DetectionResult
from services.cade.tasks import CadeTask
from services.core.volume import Volume

__all__ = ["detection_seg_bytes", "sphere_label_map"]


def sphere_label_map(image: Volume, candidates) -> np.ndarray:
    """Each candidate's equivalent sphere (label = rank) on ``image``'s grid, at least its centre voxel;
    where two overlap the stronger (lower rank) keeps the voxel. Built box by box, never a world grid
    of the whole image (a 512×512×300 CT would need gigabytes)."""
    shape = image.array.shape
    labels = np.zeros(shape, dtype=np.uint8 if len(candidates) < 256 else np.uint16)
    spacing = np.asarray(image.spacing, dtype=np.float64)
    for rank, cand in enumerate(candidates, start=1):
        radius_mm = cand.diameter_mm / 2.0
        centre = np.asarray(cand.center_voxel, dtype=int)  # (i, j, k)
        reach = np.ceil(radius_mm / spacing).astype(int) + 1
        low = np.maximum(centre - reach, 0)
        high = np.minimum(centre + reach + 1, (shape[2], shape[1], shape[0]))
        kk, jj, ii = np.mgrid[low[2] : high[2], low[1] : high[1], low[0] : high[0]]
        world = image.index_to_world(np.stack([ii, jj, kk], axis=-1).astype(np.float64))
        inside = np.linalg.norm(world - np.asarray(cand.center_mm), axis=-1) <= radius_mm
        box = labels[low[2] : high[2], low[1] : high[1], low[0] : high[0]]
        box[inside & (box == 0)] = rank
        i, j, k = (int(v) for v in np.clip(centre, 0, np.array([shape[2], shape[1], shape[0]]) - 1))
        if labels[k, j, i] == 0:
            labels[k, j, i] = rank
    return labels


def detection_seg_bytes(result: DetectionResult, task: CadeTask, image: Volume, source: Path) -> bytes:
    """A SEG with one segment per candidate that keeps a voxel (label = rank), coded as the task's
    finding, referencing the DICOM headers in ``source``.

    Raises:
        InputError: from :func:`services.core.io.dicom_seg.seg_bytes` (no candidate, a source the SEG
            cannot reference).
    """
    from services.core.io.dicom_seg import SegLesion, seg_bytes
    from services.core.version import software_version

    labels = sphere_label_map(image, result.candidates)
    lesions = [
        SegLesion(rank, f"cade {task.name}", result.model_version, task.lesion_type)
        for rank in range(1, len(result.candidates) + 1)
        if (labels == rank).any()
    ]
    return seg_bytes(source, image, labels, lesions, software_version=software_version())
