"""DICOM SEG output with highdicom, referencing the source series the masks were estimated on.

A SEG can only reference real DICOM instances, so it is written when the input was a DICOM series
(the Volume's metadata keeps the SOP Instance UIDs in slice order) or one enhanced multi-frame
image; other inputs get NIfTI/NRRD.

Each SEG frame is handed to highdicom beside the source image (or multi-frame source frame, matched
by position) it was computed on, so every frame references its source exactly; the SEG's
``SpacingBetweenSlices`` is the slice distance wlcad measured from the positions (an oblique MR
series whose header says 2 mm while its slices sit 7 mm apart gave a SEG that highdicom's own
``get_volume()`` refused).

What the SEG copies from its source is what the IOD requires (patient and general study modules,
frame of reference); :func:`minimal_source_copy` drops everything else before highdicom sees it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DSfloat

from services.core.atomic import write_bytes_atomically
from services.core.errors import InputError
from services.core.io.dicom import instance_uid
from services.core.volume import Volume

MANUFACTURER = "wlcad"
#: Derived series are numbered ``100 × source + offset``: next to their source when sorted, and never
#: the scanner's next acquisition (``source + 1``). Offsets: SEG 1, detection SR 2, estimation SR 3.
SERIES_NUMBER_OFFSETS = {"seg": 1, "detection-sr": 2, "estimation-sr": 3}
_MAX_IS = 2**31 - 1

#: Attributes of a source header a derived object may carry: the patient module and the general
#: study module (type 1/2, which DICOM requires and a PACS files the result by), the frame of
#: reference, and what references and geometry need. Everything else (institution, operators,
#: device serials, descriptions, ages, weights, private tags) is dropped before highdicom copies it.
_KEPT_SOURCE_KEYWORDS = frozenset(
    {
        # patient module (type 2) and the character set its values are in
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "SpecificCharacterSet",
        # general study module (type 1/2)
        "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
        "AccessionNumber",
        # references and geometry
        "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "FrameOfReferenceUID",
        "Modality", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
        "SpacingBetweenSlices", "Rows", "Columns", "NumberOfFrames", "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence", "DimensionOrganizationSequence", "DimensionIndexSequence",
        "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
        "PixelRepresentation", "ImageType", "InstanceNumber", "PatientOrientation", "ImagerPixelSpacing",
        "TotalPixelMatrixRows",
        "TotalPixelMatrixColumns",
    }
)  # fmt: skip

#: Lesion types (the manifest's ``lesion_type`` vocabulary, docs/manifest.schema.json) → SNOMED CT
#: morphologic abnormality. Anything else (or none) is coded as the generic "Lesion" and kept as text.
LESION_TYPE_CODES: dict[str, Code] = {
    "solid": codes.SCT.Nodule,
    "part-solid": codes.SCT.Nodule,
    "ground-glass": codes.SCT.Nodule,
    "juxta-pleural": codes.SCT.Nodule,
    "juxta-vascular": codes.SCT.Nodule,
    "nodule": codes.SCT.Nodule,
    "mass": codes.SCT.Mass,
    "saccular-bifurcation": codes.SCT.Aneurysm,
    "saccular-bend": codes.SCT.Aneurysm,
    "aneurysm": codes.SCT.Aneurysm,
    "haemorrhage": codes.SCT.Hemorrhage,
    "hemorrhage": codes.SCT.Hemorrhage,
    "effusion": codes.SCT.Effusion,
    "ring-enhancing": codes.SCT.Lesion,
    "hypointense": codes.SCT.Lesion,
    "targetoid": codes.SCT.Lesion,
}


@dataclass(frozen=True)
class SegLesion:
    """One segment to write: the label value in the label map, how it was made, and what it is.

    ``algorithm_version``: the model's version (e.g. ``label_unet3d/1``) or, for a method without a
    model, the method's name; never the software's version (that is the SEG's SoftwareVersions).
    ``lesion_type``: free text from the prompt or manifest (``""`` when unknown).
    """

    lesion_id: int
    method: str
    algorithm_version: str
    lesion_type: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.lesion_id, bool) or not isinstance(self.lesion_id, (int, np.integer)):
            raise InputError(f"must be an integer, got {self.lesion_id!r}", field="lesion_id")
        if not 1 <= int(self.lesion_id) <= 65535:
            raise InputError(f"must be in 1..65535, got {self.lesion_id}", field="lesion_id")
        for name in ("method", "algorithm_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip() or len(value) > 64:
                raise InputError(
                    f"must be a non-empty text of at most 64 characters, got {value!r}", field=name
                )
        if not isinstance(self.lesion_type, str) or len(self.lesion_type) > 64:
            raise InputError(
                f"must be a text of at most 64 characters, got {self.lesion_type!r}", field="lesion_type"
            )

    @property
    def property_type(self) -> Code:
        return LESION_TYPE_CODES.get(self.lesion_type.strip().lower(), codes.SCT.Lesion)


def derived_series_number(source: pydicom.Dataset, kind: str) -> int:
    """The series number of a derived object (see :data:`SERIES_NUMBER_OFFSETS`)."""
    offset = SERIES_NUMBER_OFFSETS[kind]
    try:
        base = int(source.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        base = 0
    number = 100 * max(base, 0) + offset
    return number if number <= _MAX_IS else offset


def check_seg_source(volume: Volume, field: str = "seg") -> None:
    """Refuse, from the volume's metadata alone, an input a SEG (or SR) cannot reference (not DICOM,
    no instance UIDs): cheap enough to ask before computing, so ``--seg`` on a NIfTI is refused before
    any output is written.

    Raises:
        InputError: naming ``field``.
    """
    uids = volume.metadata.get("sop_instance_uids") or []
    if volume.metadata.get("source_format") != "dicom" or not uids:
        what = "a DICOM SEG" if field == "seg" else "a DICOM SR"
        raise InputError(
            f"{what} needs a DICOM image input (it must reference the source images)", field=field
        )
    if len(uids) != volume.array.shape[0]:
        raise InputError(
            f"the image has {volume.array.shape[0]} slices but {len(uids)} source instance UIDs", field=field
        )


def minimal_source_copy(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of a source header holding only :data:`_KEPT_SOURCE_KEYWORDS` (and its file meta)."""
    kept = pydicom.Dataset()
    for element in dataset:
        if element.keyword in _KEPT_SOURCE_KEYWORDS:
            kept.add(element)
    if getattr(dataset, "file_meta", None) is not None:
        kept.file_meta = dataset.file_meta
    return kept


def source_datasets(series_folder: Path, volume: Volume, field: str = "seg") -> list[pydicom.Dataset]:
    """The source instances of ``volume`` (headers, minimal copies), one per distinct SOP Instance in
    slice order: a series gives one per slice, an enhanced multi-frame image gives one.

    Raises:
        InputError: naming ``field``: not DICOM, files gone, UIDs blank (anonymised).
    """
    check_seg_source(volume, field)
    uids = list(dict.fromkeys(volume.metadata["sop_instance_uids"]))
    series_folder = Path(series_folder)
    by_uid = {}
    candidates = (
        [series_folder]
        if series_folder.is_file()
        else sorted(p for p in series_folder.rglob("*") if p.is_file())
    )
    for path in candidates:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # other files in the folder are not ours to judge
            continue
        by_uid[instance_uid(ds)] = ds
    missing = [uid for uid in uids if uid not in by_uid]
    if missing:
        raise InputError(
            f"{len(missing)} source instances are no longer in {series_folder.name}", field=field
        )
    datasets = [minimal_source_copy(by_uid[uid]) for uid in uids]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if not datasets[0].get(keyword):
            raise InputError(
                f"the source images have no {keyword} (anonymised?), so a DICOM object cannot reference them",
                field=field,
            )
    for ds in datasets:  # some anonymisers leave the UIDs only in the file meta
        if not ds.get("SOPClassUID"):
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        if not ds.get("SOPInstanceUID"):
            ds.SOPInstanceUID = instance_uid(ds)
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet  # empty means the default repertoire; highdicom wants it absent
    return datasets


def hd_volume(volume: Volume, array: np.ndarray, frame_of_reference_uid: str) -> hd.Volume:
    """``array`` (z, y, x, on ``volume``'s grid) as a highdicom Volume: axis 0 runs along the slice
    normal, axis 1 down the rows (column cosine), axis 2 along a row (row cosine)."""
    direction = np.asarray(volume.direction, dtype=np.float64)
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, 0] = direction[:, 2] * spacing[2]
    affine[:3, 1] = direction[:, 1] * spacing[1]
    affine[:3, 2] = direction[:, 0] * spacing[0]
    affine[:3, 3] = np.asarray(volume.origin, dtype=np.float64)
    return hd.Volume(array, affine, "PATIENT", frame_of_reference_uid=frame_of_reference_uid)


def build_seg(
    datasets: Sequence[pydicom.Dataset],
    volume: Volume,
    label_map: np.ndarray,
    lesions: Sequence[SegLesion],
    *,
    software_version: str,
) -> hd.seg.Segmentation:
    """One segment per lesion (segment numbers 1.. in ``lesions`` order) of ``label_map`` (z, y, x on
    ``volume``'s grid), referencing ``datasets`` (from :func:`source_datasets`).

    Raises:
        InputError: naming ``seg`` (no lesion, a lesion absent from the map, a map off the grid) or
            ``lesion_id`` (two lesions with one id).
    """
    label_map = np.asarray(label_map)
    if label_map.shape != volume.array.shape:
        raise InputError(
            f"label map shape {label_map.shape} is not the image's {volume.array.shape}", field="seg"
        )
    if not lesions:
        raise InputError("no lesion to write", field="seg")
    ids = [int(lesion.lesion_id) for lesion in lesions]
    if len(set(ids)) != len(ids):
        raise InputError(f"lesion ids repeat: {ids}", field="lesion_id")
    segment_map = np.zeros(label_map.shape, dtype=np.uint16)
    descriptions = []
    for number, lesion in enumerate(lesions, start=1):
        inside = label_map == lesion.lesion_id
        if not inside.any():
            raise InputError(f"lesion {lesion.lesion_id} has no voxel in the label map", field="seg")
        segment_map[inside] = number
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"lesion {lesion.lesion_id}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=lesion.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=f"wlcad {lesion.method}",
                family=codes.cid7162.ArtificialIntelligence,
                version=lesion.algorithm_version,
            ),
            tracking_uid=hd.UID(),
            tracking_id=f"lesion-{lesion.lesion_id}",
        )
        if lesion.lesion_type.strip():
            description.SegmentDescription = lesion.lesion_type.strip()
        descriptions.append(description)
    # pydicom/highdicom warnings quote attribute values (patient names included): never let them out.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = hd.seg.Segmentation(
            source_images=list(datasets),
            pixel_array=_in_source_order(datasets, volume, segment_map),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=derived_series_number(datasets[0], "seg"),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name="wlcad label estimation",
            software_versions=software_version,
            device_serial_number="0",
            series_description="wlcad lesion labels",
            omit_empty_frames=True,
        )
    _place_on_grid(seg, volume, datasets)
    return seg


def _place_on_grid(seg: hd.seg.Segmentation, volume: Volume, datasets: Sequence[pydicom.Dataset]) -> None:
    """Put the SEG's frames on the grid the masks were computed on (wlcad's volume, the NIfTI mask's):
    highdicom copies each source slice's position and the source's pixel measures, and sources state
    wrong spacings (the oblique brain MR sample: SpacingBetweenSlices 2.0 while its slices are 7.0 mm
    apart) and jittered positions (the same series: gaps of 6.96–7.07 mm, which wlcad's reader
    accepts as one regular grid but highdicom's ``get_volume()`` refuses at its 1 % tolerance). Each
    frame keeps its reference to the source slice it was computed on; its position moves to that
    slice's place on the regular grid (by at most the source's own jitter)."""
    if volume.array.shape[0] < 2:
        return
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    measures.SpacingBetweenSlices = DSfloat(float(volume.spacing[2]), auto_format=True)
    uids = list(volume.metadata["sop_instance_uids"])
    multiframe = len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1
    slices_of_frames = frame_slices(datasets[0], volume) if multiframe else None
    for item in seg.PerFrameFunctionalGroupsSequence:
        (source,) = item.DerivationImageSequence[0].SourceImageSequence
        if slices_of_frames is not None:
            k = slices_of_frames[int(source.ReferencedFrameNumber) - 1]
        else:
            k = uids.index(str(source.ReferencedSOPInstanceUID))
        position = volume.index_to_world([0.0, 0.0, float(k)])
        item.PlanePositionSequence[0].ImagePositionPatient = [
            DSfloat(float(v), auto_format=True) for v in position
        ]


def frame_slices(dataset: pydicom.Dataset, volume: Volume) -> list[int]:
    """For each frame of a multi-frame source (in its own order), the slice of ``volume`` at its
    position: the frames of an enhanced image need not be stored in slice order.

    Raises:
        InputError: naming ``seg``: a frame with no slice of ``volume`` within 1 % of the spacing.
    """
    normal = np.asarray(volume.direction, dtype=np.float64)[:, 2]
    origin = np.asarray(volume.origin, dtype=np.float64)
    spacing = float(volume.spacing[2])
    slices = []
    for number, item in enumerate(dataset.PerFrameFunctionalGroupsSequence, start=1):
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
        k = float(np.dot(position - origin, normal)) / spacing
        if abs(k - round(k)) > 0.01 or not 0 <= round(k) < volume.array.shape[0]:
            raise InputError(f"frame {number} of the source lies on no slice of the image", field="seg")
        slices.append(round(k))
    return slices


def _in_source_order(
    datasets: Sequence[pydicom.Dataset], volume: Volume, segment_map: np.ndarray
) -> np.ndarray:
    """``segment_map`` (slice order) as highdicom wants it: frame ``i`` is the ``i``-th source image
    (a series, in slice order already) or the ``i``-th frame of the one multi-frame source, so each
    SEG frame references exactly the source frame it was computed on."""
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
        return segment_map[frame_slices(datasets[0], volume)]
    if len(datasets) != segment_map.shape[0]:
        raise InputError(f"{len(datasets)} source images for {segment_map.shape[0]} slices", field="seg")
    return segment_map


def dataset_bytes(dataset: pydicom.Dataset) -> bytes:
    """A DICOM object as Part 10 file bytes (what a service returns and STOW-RS sends)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def seg_bytes(
    series_folder: Path,
    volume: Volume,
    label_map: np.ndarray,
    lesions: Sequence[SegLesion],
    *,
    software_version: str,
) -> bytes:
    """The SEG of ``lesions`` on the DICOM source at ``series_folder`` as Part 10 bytes.

    Raises:
        InputError: naming ``seg`` or ``lesion_id`` (see :func:`source_datasets`, :func:`build_seg`).
    """
    datasets = source_datasets(Path(series_folder), volume)
    seg = build_seg(datasets, volume, label_map, lesions, software_version=software_version)
    return dataset_bytes(seg)


def write_seg(
    series_folder: Path,
    volume: Volume,
    label_map: np.ndarray,
    lesions: Sequence[SegLesion],
    out_path: Path,
    *,
    software_version: str,
) -> Path:
    """:func:`seg_bytes` written atomically to ``out_path``.

    Raises:
        InputError: as :func:`seg_bytes`.
    """
    data = seg_bytes(series_folder, volume, label_map, lesions, software_version=software_version)
    return write_bytes_atomically(Path(out_path), data)
