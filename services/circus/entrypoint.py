"""Run one plug-in over a CIRCUS CS input folder and write ``results.json`` (and its attachments)
atomically.

The Docker plug-in (``wlcad circus run-plugin``) and the remote endpoint both call :func:`run_plugin`.
Every input volume is read and checked before the model runs, each output file is written through
:mod:`services.core.atomic`, and ``results.json`` is written last: CIRCUS (and any caller) can take
its presence as "the run finished"; after a failure there is none, and the attachments this run had
written (overlays, the anomaly figure) are removed again. Inference is always embedded (ONNX Runtime in this process): a plug-in
container runs with no network, so a ``$WLCAD_INFERENCE`` naming a Triton server must not apply.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.circus.plugin import (
    ANOMALY_FIGURE,
    RESULTS_FILE,
    AnomalyResult,
    Capability,
    LesionCandidate,
    PluginKind,
    PluginResults,
    ResultImage,
    VolumeOverlay,
    pack_overlay,
)
from services.core.errors import InputError
from services.core.version import software_version
from services.core.volume import Volume

log = logging.getLogger(__name__)

__all__ = ["input_volume_ids", "read_inputs", "run_on_volumes", "run_plugin", "write_results"]

#: Inference inside a plug-in: never a remote backend (see the module docstring).
INFERENCE = "embedded"
#: The label-estimation method of the VolumeOverlay plug-in (the shipped U-Net, as ``wlcad estimate``).
DEFAULT_METHOD = "unet"
#: At most this many input volumes per job (CIRCUS jobs take one to a few series).
MAX_VOLUMES = 16
_MHD = re.compile(r"^(\d{1,3})\.mhd$")

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def input_volume_ids(folder: Path) -> list[int]:
    """The volume ids present (``0.mhd``, ``1.mhd``, …): they must run 0..n-1 without a gap."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder", field="circus.in")
    ids = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _MHD.match(p.name)))
    if not ids:
        raise InputError("holds no 0.mhd (CIRCUS input volumes are N.mhd, N.raw, N.json)", field="circus.in")
    if ids != list(range(len(ids))):
        raise InputError(f"volume ids must run 0..n-1, got {ids[:8]}", field="circus.in")
    if len(ids) > MAX_VOLUMES:
        raise InputError(f"holds {len(ids)} volumes; at most {MAX_VOLUMES}", field="circus.in")
    return ids


def _check_tag_dump(path: Path) -> None:
    """``N.json`` must be the CIRCUS tag dump ``{"common": {...}, "unique": [...]}``. The reader
    tolerates other JSON (and then assumes an axial, origin-less volume); a plug-in must not guess
    the geometry of a file that is not what CIRCUS writes."""
    name = f"{path.name}"
    try:
        dump = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{name} is missing", field="image") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{name} is not valid JSON ({type(exc).__name__})", field="image") from None
    if not isinstance(dump, dict):
        raise InputError(f"{name} is not a JSON object with 'common' and 'unique'", field="image")
    if not isinstance(dump.get("common", {}), dict):
        raise InputError(f"{name}: 'common' must be an object", field="image")
    unique = dump.get("unique", [])
    if not isinstance(unique, list) or not all(isinstance(u, dict) for u in unique):
        raise InputError(f"{name}: 'unique' must be a list of objects, one per slice", field="image")


def read_inputs(folder: Path) -> list[Volume]:
    """Every input volume, checked (an :class:`InputError` naming the file on the first bad one)."""
    from services.core.io.circus import read_circus_input

    volumes = []
    for volume_id in input_volume_ids(folder):
        _check_tag_dump(folder / f"{volume_id}.json")
        volumes.append(read_circus_input(folder, volume_id))
    return volumes


def _sphere_volume_mm3(diameter_mm: float) -> float:
    return math.pi / 6.0 * diameter_mm**3


@dataclass(frozen=True)
class _Found:
    volume_id: int
    confidence: float
    center_mm: tuple[float, float, float]
    center_voxel: tuple[int, int, int]
    diameter_mm: float


def _detect(
    capability: Capability, volumes: list[Volume], repository: Path | None, progress: Progress
) -> tuple[list[_Found], dict]:
    from services.cade.cutoff import detect_at
    from services.cade.model import CadeModel
    from services.cade.tasks import task_named

    task = task_named(capability.task)
    found: list[_Found] = []
    with CadeModel(task, INFERENCE, repository) as model:
        threshold = model.default_threshold()
        for volume_id, volume in enumerate(volumes):
            progress(f"volume {volume_id}: detecting ({task.name})")
            result = detect_at(model, volume, threshold)
            found += [
                _Found(
                    volume_id,
                    c.confidence,
                    c.center_mm,
                    tuple(int(v) for v in volume.world_to_nearest_index(c.center_mm)),
                    c.diameter_mm,
                )
                for c in result.candidates
            ]
            progress(f"volume {volume_id}: {len(result.candidates)} candidate(s)")
        info = {"task": task.name, "model": model.version, "threshold": threshold}
    found.sort(key=lambda f: (-f.confidence, f.volume_id, f.center_voxel))
    return found, info


def _overlays(
    volumes: list[Volume], found: list[_Found], method: str, repository: Path | None, progress: Progress
) -> tuple[list[VolumeOverlay], dict]:
    """Each candidate's estimated mask (prompt: its centre and diameter) as an overlay box."""
    from services.core.lesion_prompt import MIN_DIAMETER_MM, LesionPrompt
    from services.label_estimation.pipeline import LabelEstimator

    model = None
    if method == "unet":
        from services.label_estimation.model import UnetModel

        model = UnetModel(INFERENCE, repository)
    overlays: list[VolumeOverlay] = []
    try:
        estimator = LabelEstimator(model)
        for volume_id, volume in enumerate(volumes):
            mine = [(rank, f) for rank, f in enumerate(found, start=1) if f.volume_id == volume_id]
            if not mine:
                continue
            progress(f"volume {volume_id}: estimating {len(mine)} mask(s) ({method})")
            prompts = [
                LesionPrompt(f.center_mm, max(f.diameter_mm, MIN_DIAMETER_MM), lesion_id=rank)
                for rank, f in mine
            ]
            for estimate in estimator.estimate(volume, prompts, method):
                tight = estimate.mask.tight()
                if not tight.voxel_count:
                    continue
                overlays.append(
                    VolumeOverlay(
                        f"lesion{estimate.lesion_id}",
                        volume_id,
                        tuple(tight.start_xyz),
                        tight.size_xyz,
                        pack_overlay(tight.mask_zyx),
                    )
                )
        info = {"labelMethod": method, "labelModel": model.version if model else None}
    finally:
        if model is not None:
            model.close()
    return overlays, info


def run_plugin(
    capability: Capability,
    in_dir: Path,
    *,
    repository: Path | None = None,
    method: str = DEFAULT_METHOD,
    progress: Progress = _quiet,
) -> PluginResults:
    """The plug-in's results for the volumes in ``in_dir`` (nothing is written here)."""
    volumes = read_inputs(in_dir)
    progress(f"{len(volumes)} volume(s) read")
    return run_on_volumes(capability, volumes, repository=repository, method=method, progress=progress)


def _score(
    capability: Capability, volumes: list[Volume], repository: Path | None, progress: Progress
) -> PluginResults:
    """One image's anomaly score (the model ``wlcad score`` would pick: two-flow if shipped) and the
    figure ``wlcad score --overlay`` draws, as the Gallery image."""
    import numpy as np

    from services.anomaly.figure import render_score_figure
    from services.anomaly.tasks import anomaly_task
    from services.batch.score import open_scorer, score_document

    if len(volumes) != 1:
        raise InputError(
            f"an anomaly plug-in scores one image per job; got {len(volumes)} volumes", field="circus.in"
        )
    [volume] = volumes
    task = anomaly_task(capability.task)
    with open_scorer(task, None, repository, INFERENCE) as scorer:
        progress(f"volume 0: scoring ({task.name}, {scorer.model})")
        result, score_map = scorer.score_with_map(volume)
        normals = len(scorer.calibration.normal_scores)
    document = score_document(result, task)
    progress("volume 0: drawing the anomaly map")
    on_image = score_map.resample(reference=volume, output_dtype=np.float32)
    figure = ResultImage(ANOMALY_FIGURE, render_score_figure(volume, on_image, document, normals))
    anomaly = AnomalyResult(
        volume_id=0,
        score=document["score"],
        units=document["units"],
        percentile_among_normals=document["percentile_among_normals"],
        z=document["z"],
        model_version=document["model_version"],
        calibration_normals=normals,
    )
    metadata = {
        "software": "wlcad",
        "softwareVersion": software_version(),
        "plugin": capability.plugin_name,
        "task": task.name,
        "model": document["model_version"],
        "components": document["components"],
        "volumes": 1,
        "note": "An anomaly score for a reader to weigh; not a diagnosis.",
    }
    return PluginResults((), (), metadata, anomaly=anomaly, images=(figure,))


def run_on_volumes(
    capability: Capability,
    volumes: list[Volume],
    *,
    repository: Path | None = None,
    method: str = DEFAULT_METHOD,
    progress: Progress = _quiet,
) -> PluginResults:
    """:func:`run_plugin` on volumes already read (the remote endpoint checks them before it answers)."""
    if capability.kind is PluginKind.ANOMALY:
        return _score(capability, volumes, repository, progress)
    found, info = _detect(capability, volumes, repository, progress)
    overlays: list[VolumeOverlay] = []
    if capability.overlays:
        overlays, label_info = _overlays(volumes, found, method, repository, progress)
        info.update(label_info)
    candidates = tuple(
        LesionCandidate(rank, f.confidence, f.volume_id, f.center_voxel, _sphere_volume_mm3(f.diameter_mm))
        for rank, f in enumerate(found, start=1)
    )
    metadata = {
        "software": "wlcad",
        "softwareVersion": software_version(),
        "plugin": capability.plugin_name,
        **info,
        "volumes": len(volumes),
        "candidates": len(candidates),
        "diameters_mm": [round(f.diameter_mm, 2) for f in found],
        "note": "Candidates for a reader to review; not a diagnosis.",
    }
    return PluginResults(candidates, tuple(overlays), metadata)


def write_results(results: PluginResults, out_dir: Path) -> Path:
    """Attachments first, ``results.json`` last, each atomic; after a failure none of them is left."""
    from services.core.atomic import write_bytes_atomically

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for file_name, data in results.attachments():
            written.append(write_bytes_atomically(out_dir / file_name, data))
        body = (json.dumps(results.as_json(), indent=1) + "\n").encode()
        return write_bytes_atomically(out_dir / RESULTS_FILE, body)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
