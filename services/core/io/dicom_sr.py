"""DICOM SR TID 1500 (Measurement Report) with highdicom: a detection run's candidates and a label
estimation's lesion measurements, as a PACS and a viewer (OHIF, 3D Slicer, dcmqi) read them.

* Detection (:func:`detection_sr_bytes`): one volumetric ROI group (TID 1411) per candidate, its
  centre an SCOORD3D POINT in the source's frame of reference referencing the slice it lies on; on
  a radiograph (one image, no patient space) a planar ROI group (TID 1410) whose region is the
  candidate's equivalent circle in pixel coordinates. Each group holds the diameter (mm), the
  confidence (Certainty of Finding, 0..1), the finding type and site of the task (SNOMED CT), a
  tracking identifier and UID, and the algorithm (the model and its version, e.g.
  ``cade_chest-ct-nodule/1``); one image-level group (TID 1501) states the CAD processing summary
  (all algorithms succeeded, with or without findings), so a run without candidates is a report too.
* Label estimation (:func:`estimation_sr_bytes`): one volumetric ROI group per lesion whose ROI is
  the lesion's segment in the SEG written beside it, with volume, maximum diameter and the axial
  long and short axes.

Like the SEG (:mod:`services.core.io.dicom_seg`), an SR copies from its source only what DICOM
requires (patient and general study modules); the evidence lists the source instances (and the SEG).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from services.core.atomic import write_bytes_atomically
from services.core.errors import InputError
from services.core.io.dicom import instance_uid
from services.core.io.dicom_seg import (
    LESION_TYPE_CODES,
    MANUFACTURER,
    dataset_bytes,
    derived_series_number,
    frame_slices,
    minimal_source_copy,
    source_datasets,
)
from services.core.lesion_measurements import Measurements
from services.core.volume import Volume

if TYPE_CHECKING:  # core does not import the capabilities at run time
    from services.cade.pipeline import DetectionResult

#: Task → (finding type, finding site), SNOMED CT: what the task's detector looks for, and where.
TASK_FINDINGS: dict[str, tuple[Code, Code]] = {
    "chest-ct-nodule": (codes.SCT.Nodule, codes.SCT.Lung),  # lung nodule
    "cxr-mass": (codes.SCT.Mass, codes.SCT.Lung),  # mass of lung
    "head-mra-aneurysm": (codes.SCT.Aneurysm, codes.SCT.CerebralArtery),  # intracranial aneurysm
}
#: A task not listed above is reported as a lesion with no site rather than refused.
DEFAULT_FINDING = codes.SCT.Lesion

#: The confidence is the detector's score in [0, 1] (its peak probability), reported as DCM
#: "Certainty of Finding" with unit "1": the likelihood that the finding is the feature of interest.
CONFIDENCE = codes.DCM.CertaintyOfFinding
NO_UNITS = codes.UCUM.NoUnits
MM = codes.UCUM.Millimeter
MM3 = codes.UCUM.CubicMillimeter


@dataclass(frozen=True)
class SrLesion:
    """One estimated lesion for the estimation SR: its segment in the SEG and its measurements.

    ``algorithm_version``: the model's version (``label_unet3d/1``) or the method without a model.

    Raises:
        InputError: naming ``segment_number``, ``lesion_id``, ``measurements``, ``method``,
            ``algorithm_version`` or ``lesion_type``.
    """

    lesion_id: int
    segment_number: int
    measurements: Measurements
    method: str
    algorithm_version: str
    lesion_type: str = ""

    def __post_init__(self) -> None:
        for name in ("lesion_id", "segment_number"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InputError(f"must be a positive integer, got {value!r}", field=name)
        if not isinstance(self.measurements, Measurements):
            raise InputError(
                f"must be Measurements, got {type(self.measurements).__name__}", field="measurements"
            )
        m = self.measurements
        if m.voxels < 1:
            raise InputError(f"lesion {self.lesion_id} is empty: nothing to report", field="measurements")
        for name in ("volume_mm3", "max_diameter_mm", "axial_long_mm", "axial_short_mm"):
            value = getattr(m, name)
            if not math.isfinite(value) or value < 0:
                raise InputError(f"{name} must be a finite number ≥ 0, got {value}", field="measurements")
        _check_text(self.method, "method")
        _check_text(self.algorithm_version, "algorithm_version")
        if not isinstance(self.lesion_type, str) or len(self.lesion_type) > 64:
            raise InputError(
                f"must be a text of at most 64 characters, got {self.lesion_type!r}", field="lesion_type"
            )


def _check_text(value: object, field: str) -> None:
    if not isinstance(value, str) or not value.strip() or len(value) > 64:
        raise InputError(f"must be a non-empty text of at most 64 characters, got {value!r}", field=field)


def check_sr_source(volume: Volume) -> None:
    """Refuse, from the volume's metadata alone and before any computing, an input an SR cannot
    reference: not DICOM, or a volume without the instance UIDs it was read from (a radiograph is
    looked up in its file when the SR is written).

    Raises:
        InputError: naming ``sr``.
    """
    if volume.metadata.get("source_format") != "dicom":
        raise InputError(
            "a DICOM SR needs a DICOM image input (it must reference the source images)", field="sr"
        )
    if volume.shape_xyz[2] > 1 and not volume.metadata.get("sop_instance_uids"):
        raise InputError("the image kept no SOP Instance UIDs to reference", field="sr")


def _radiograph_dataset(source: Path) -> pydicom.Dataset:
    """The one DICOM file of a projection radiograph (the reader keeps no UID for it)."""
    path = Path(source)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    found = []
    for file in files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except Exception:  # other files in the folder are not ours to judge
            continue
        if "Rows" in ds:
            found.append(ds)
    if len(found) != 1:
        raise InputError(f"expected one DICOM image for a radiograph, found {len(found)}", field="sr")
    ds = minimal_source_copy(found[0])
    if not ds.get("SOPClassUID") and getattr(found[0], "file_meta", None) is not None:
        ds.SOPClassUID = found[0].file_meta.MediaStorageSOPClassUID
    if not ds.get("SOPInstanceUID"):
        ds.SOPInstanceUID = instance_uid(found[0])
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not ds.get(keyword):
            raise InputError(
                f"the source image has no {keyword} (anonymised?), so an SR cannot reference it", field="sr"
            )
    if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
        del ds.SpecificCharacterSet
    return ds


def sr_source_datasets(source: Path, volume: Volume) -> list[pydicom.Dataset]:
    """The source headers an SR of ``volume`` references (minimal copies, slice order).

    Raises:
        InputError: naming ``sr``.
    """
    check_sr_source(volume)
    if volume.shape_xyz[2] == 1 and not volume.metadata.get("sop_instance_uids"):
        return [_radiograph_dataset(source)]
    return source_datasets(Path(source), volume, field="sr")


def _observation_context(model_name: str, model_version: str) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=pydicom.uid.generate_uid(entropy_srcs=["wlcad", model_version]),  # one UID per model version
        name=model_name,
        manufacturer_name=MANUFACTURER,
        model_name=model_version,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _algorithm(name: str, version: str) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=name, version=version, family=codes.cid7162.ArtificialIntelligence
    )


def _document(
    datasets: Sequence[pydicom.Dataset],
    report: hd.sr.MeasurementReport,
    kind: str,
    description: str,
    evidence_extra: Sequence[pydicom.Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    with warnings.catch_warnings():  # warnings may quote attribute values (patient names): never shown
        warnings.simplefilter("ignore")
        return hd.sr.Comprehensive3DSR(
            evidence=[*datasets, *evidence_extra],
            content=report,
            series_instance_uid=hd.UID(),
            series_number=derived_series_number(datasets[0], kind),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            series_description=description,
        )


def _slice_image(
    datasets: Sequence[pydicom.Dataset], volume: Volume, k: int
) -> hd.sr.SourceImageForSegmentation:
    """The source image (and frame, for a multi-frame source) holding slice ``k`` of ``volume``."""
    uids = list(volume.metadata.get("sop_instance_uids") or [])
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    uid = uids[k] if uids else str(datasets[0].SOPInstanceUID)
    ds = by_uid[uid]
    frames = None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        frames = [frame_slices(ds, volume).index(k) + 1]
    return hd.sr.SourceImageForSegmentation(str(ds.SOPClassUID), uid, referenced_frame_numbers=frames)


def build_detection_sr(
    result: DetectionResult,
    volume: Volume,
    datasets: Sequence[pydicom.Dataset],
    *,
    model_name: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of one detection run on ``volume`` (read from ``datasets``).

    Raises:
        InputError: naming ``sr`` (no source, a candidate off the image), ``result`` (not a
            DetectionResult, a confidence outside [0, 1], a non-finite diameter) or ``model_version``.
    """
    if not all(hasattr(result, a) for a in ("task", "model_version", "candidates")):
        raise InputError(f"must be a DetectionResult, got {type(result).__name__}", field="result")
    if not datasets:
        raise InputError("no source image to reference", field="sr")
    _check_text(result.model_version, "model_version")
    model_name = model_name or f"cade_{result.task}"
    finding, site = TASK_FINDINGS.get(result.task, (DEFAULT_FINDING, None))
    planar = volume.shape_xyz[2] == 1 and "FrameOfReferenceUID" not in datasets[0]
    groups = []
    for rank, cand in enumerate(result.candidates, start=1):
        i, j, k = (int(v) for v in cand.center_voxel)
        if not (
            0 <= i < volume.shape_xyz[0] and 0 <= j < volume.shape_xyz[1] and 0 <= k < volume.shape_xyz[2]
        ):
            raise InputError(f"candidate {rank} lies off the image at voxel {[i, j, k]}", field="sr")
        if not (math.isfinite(cand.confidence) and 0.0 <= cand.confidence <= 1.0):
            raise InputError(
                f"candidate {rank} has confidence {cand.confidence} outside [0, 1]", field="result"
            )
        if not (math.isfinite(cand.diameter_mm) and cand.diameter_mm >= 0):
            raise InputError(f"candidate {rank} has diameter {cand.diameter_mm}", field="result")
        tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"candidate-{rank}")
        measurements = [
            hd.sr.Measurement(name=CONFIDENCE, value=float(cand.confidence), unit=NO_UNITS),
        ]
        assumed_spacing = volume.metadata.get("pixel_spacing_source") == "assumed-1mm"
        if not assumed_spacing:  # a radiograph without a spacing has no mm to state
            measurements.insert(
                0, hd.sr.Measurement(name=codes.SCT.Diameter, value=float(cand.diameter_mm), unit=MM)
            )
        common = dict(
            tracking_identifier=tracking,
            finding_type=finding,
            finding_sites=[hd.sr.FindingSite(site)] if site is not None else None,
            algorithm_id=_algorithm(model_name, result.model_version),
            measurements=measurements,
            finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        )
        if planar:
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    referenced_region=_circle_region(datasets[0], volume, cand), **common
                )
            )
        else:
            point = hd.sr.VolumeSurface(
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=np.asarray([cand.center_mm], dtype=np.float64),
                frame_of_reference_uid=str(datasets[0].FrameOfReferenceUID),
                source_images=[_slice_image(datasets, volume, k)],
            )
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    referenced_volume_surface=point, **common
                )
            )
    groups.append(_summary(len(groups), model_name, result.model_version))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(model_name, result.model_version),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
        referenced_images=_library(datasets),
    )
    return _document(datasets, report, "detection-sr", f"wlcad detect {result.task}")


def _summary(found: int, model_name: str, model_version: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The run's outcome as an image-level group (TID 1501): CAD Processing and Findings Summary,
    with or without findings. It makes a run without candidates a report too (TID 1500 needs one
    group), saying the detector ran and found nothing rather than leaving no trace."""
    outcome = (
        codes.DCM.AllAlgorithmsSucceededWithFindings
        if found
        else codes.DCM.AllAlgorithmsSucceededWithoutFindings
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="detection-summary"),
        algorithm_id=_algorithm(model_name, model_version),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=codes.DCM.CADProcessingAndFindingsSummary, value=outcome)
        ],
    )


def _library(datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset] | None:
    """The images for the report's Image Library (TID 1600). A projection radiograph's entry needs
    its PatientOrientation and ImagerPixelSpacing; a radiograph without them (the pydicom-data CR
    has neither) is listed in the evidence and its region's reference only; so is an enhanced
    multi-frame image, whose geometry lives per frame (highdicom's entry reads it at the top level)."""
    if "PerFrameFunctionalGroupsSequence" in datasets[0]:
        return None
    if "FrameOfReferenceUID" in datasets[0]:
        return list(datasets)
    if all(k in datasets[0] for k in ("PatientOrientation", "ImagerPixelSpacing")):
        return list(datasets)
    return None


def _circle_region(ds: pydicom.Dataset, volume: Volume, cand) -> hd.sr.ImageRegion:
    """The candidate's equivalent circle in the radiograph's pixel coordinates (column, row; the top
    left corner of the image is (0, 0), so a pixel's centre is its index + 0.5)."""
    index = np.asarray(volume.world_to_index(np.asarray(cand.center_mm, dtype=float)), dtype=float)
    column, row = float(index[0]) + 0.5, float(index[1]) + 0.5
    radius_px = max(float(cand.diameter_mm) / 2.0 / float(volume.spacing[0]), 0.5)
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
        graphic_data=np.asarray([[column, row], [column + radius_px, row]], dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(str(ds.SOPClassUID), str(ds.SOPInstanceUID)),
    )


def build_estimation_sr(
    lesions: Sequence[SrLesion],
    seg: pydicom.Dataset,
    datasets: Sequence[pydicom.Dataset],
    *,
    algorithm_name: str = "wlcad label estimation",
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of one label estimation: each lesion's measurements on its SEG segment.

    Raises:
        InputError: naming ``sr`` (no lesion, a segment the SEG lacks, a SEG of other images) or
            ``lesion_id`` (repeated).
    """
    if not lesions:
        raise InputError("no lesion to report", field="sr")
    ids = [int(lesion.lesion_id) for lesion in lesions]
    if len(set(ids)) != len(ids):
        raise InputError(f"lesion ids repeat: {ids}", field="lesion_id")
    if not datasets:
        raise InputError("no source image to reference", field="sr")
    segments = {int(item.SegmentNumber) for item in seg.get("SegmentSequence", [])}
    referenced = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    if str(datasets[0].SeriesInstanceUID) not in referenced:
        raise InputError("the SEG does not reference the source series", field="sr")
    source_series = hd.sr.SourceSeriesForSegmentation(str(datasets[0].SeriesInstanceUID))
    groups = []
    for lesion in lesions:
        if lesion.segment_number not in segments:
            raise InputError(f"the SEG has no segment {lesion.segment_number}", field="sr")
        m = lesion.measurements
        algorithm = _algorithm(f"wlcad {lesion.method}", lesion.algorithm_version)
        measurements = [
            hd.sr.Measurement(name=codes.SCT.Volume, value=float(m.volume_mm3), unit=MM3),
            hd.sr.Measurement(
                name=codes.SCT.Diameter, value=float(m.max_diameter_mm), unit=MM, derivation=codes.SCT.Maximum
            ),
            hd.sr.Measurement(name=codes.SCT.LongAxis, value=float(m.axial_long_mm), unit=MM),
            hd.sr.Measurement(name=codes.SCT.ShortAxis, value=float(m.axial_short_mm), unit=MM),
        ]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=f"lesion-{lesion.lesion_id}"
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=int(lesion.segment_number),
                    source_series=source_series,
                ),
                finding_type=LESION_TYPE_CODES.get(lesion.lesion_type.strip().lower(), codes.SCT.Lesion),
                finding_category=codes.SCT.MorphologicallyAbnormalStructure,
                algorithm_id=algorithm,
                measurements=measurements,
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm_name, lesions[0].algorithm_version),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
        referenced_images=_library(datasets),
    )
    return _document(datasets, report, "estimation-sr", "wlcad lesion measurements", evidence_extra=[seg])


def detection_sr_bytes(
    result: DetectionResult, volume: Volume, source: Path, *, model_name: str | None = None
) -> bytes:
    """:func:`build_detection_sr` on the DICOM source at ``source`` (a folder or file), as Part 10 bytes.

    Raises:
        InputError: naming ``sr``, ``result`` or ``model_version`` (see :func:`sr_source_datasets`,
            :func:`build_detection_sr`).
    """
    datasets = sr_source_datasets(Path(source), volume)
    return dataset_bytes(build_detection_sr(result, volume, datasets, model_name=model_name))


def write_detection_sr(
    result: DetectionResult, volume: Volume, source: Path, out_path: Path, *, model_name: str | None = None
) -> Path:
    """:func:`detection_sr_bytes` written atomically to ``out_path``.

    Raises:
        InputError: as :func:`detection_sr_bytes`.
    """
    return write_bytes_atomically(
        Path(out_path), detection_sr_bytes(result, volume, source, model_name=model_name)
    )


def estimation_sr_bytes(
    lesions: Sequence[SrLesion], seg: pydicom.Dataset | bytes | Path, volume: Volume, source: Path
) -> bytes:
    """:func:`build_estimation_sr` for the SEG ``seg`` (a data set, Part 10 bytes or a file) on the
    DICOM source at ``source``, as Part 10 bytes.

    Raises:
        InputError: naming ``sr`` (not DICOM, a ``seg`` that is not a readable DICOM SEG) or
            ``lesion_id``.
    """
    seg_dataset = _as_dataset(seg)
    datasets = sr_source_datasets(Path(source), volume)
    return dataset_bytes(build_estimation_sr(lesions, seg_dataset, datasets))


def write_estimation_sr(
    lesions: Sequence[SrLesion],
    seg: pydicom.Dataset | bytes | Path,
    volume: Volume,
    source: Path,
    out_path: Path,
) -> Path:
    """:func:`estimation_sr_bytes` written atomically to ``out_path``.

    Raises:
        InputError: as :func:`estimation_sr_bytes`.
    """
    return write_bytes_atomically(Path(out_path), estimation_sr_bytes(lesions, seg, volume, source))


def _as_dataset(seg: pydicom.Dataset | bytes | Path) -> pydicom.Dataset:
    if isinstance(seg, pydicom.Dataset):
        dataset = seg
    else:
        try:
            dataset = pydicom.dcmread(
                io.BytesIO(seg) if isinstance(seg, bytes) else Path(seg), stop_before_pixels=True
            )
        except Exception as exc:
            raise InputError(f"is not a readable DICOM file ({type(exc).__name__})", field="sr") from None
    if str(dataset.get("SOPClassUID", "")) != "1.2.840.10008.5.1.4.1.1.66.4":
        raise InputError("the referenced object is not a DICOM Segmentation", field="sr")
    return dataset
