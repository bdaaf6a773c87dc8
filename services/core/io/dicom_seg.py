"""DICOM SEG output with highdicom, referencing the source series the masks were estimated on.

A SEG can only reference real DICOM instances, so it is written when the input was a DICOM series
(the Volume's metadata keeps the SOP Instance UIDs in slice order); other inputs get NIfTI/NRRD.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from services.core.atomic import atomic_output
from services.core.errors import InputError
from services.core.io.dicom import instance_uid
from services.core.volume import Volume

MANUFACTURER = "wlcad"


def check_seg_source(volume: Volume) -> None:
    """Refuse, from the volume's metadata alone, an input a SEG cannot reference (not DICOM, no
    instance UIDs, multi-frame): cheap enough to ask before computing, so ``--seg`` on a NIfTI is
    refused before any output is written.

    Raises:
        InputError: naming ``seg``.
    """
    uids = volume.metadata.get("sop_instance_uids") or []
    if volume.metadata.get("source_format") != "dicom" or not uids:
        raise InputError(
            "a DICOM SEG needs a DICOM image input (it must reference the source images)", field="seg"
        )
    if len(uids) == 1 and volume.array.shape[0] > 1:
        raise InputError("multi-frame source images are not supported for SEG yet", field="seg")


def _source_datasets(series_folder: Path, volume: Volume) -> list[pydicom.Dataset]:
    check_seg_source(volume)
    uids = list(volume.metadata["sop_instance_uids"])
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
            f"{len(missing)} source instances are no longer in {series_folder.name}", field="seg"
        )
    datasets = [by_uid[uid] for uid in uids]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if not datasets[0].get(keyword):
            raise InputError(
                f"the source images have no {keyword} (anonymised?), so a SEG cannot reference them",
                field="seg",
            )
    for ds in datasets:  # some anonymisers leave the UIDs only in the file meta
        if not ds.get("SOPClassUID"):
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        if not ds.get("SOPInstanceUID"):
            ds.SOPInstanceUID = instance_uid(ds)
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet  # empty means the default repertoire; highdicom wants it absent
    return datasets


def write_seg(
    series_folder: Path,
    volume: Volume,
    label_map: np.ndarray,
    lesions: Sequence[dict],
    out_path: Path,
    *,
    software_version: str,
) -> Path:
    """One segment per lesion (``lesions``: dicts with ``lesion_id`` and ``method``), written atomically."""
    datasets = _source_datasets(Path(series_folder), volume)
    descriptions = []
    segment_map = np.zeros(label_map.shape, dtype=np.uint16)
    for number, lesion in enumerate(lesions, start=1):
        segment_map[label_map == lesion["lesion_id"]] = number
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=f"lesion {lesion['lesion_id']}",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Lesion,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name=f"wlcad {lesion['method']}",
                    family=codes.cid7162.ArtificialIntelligence,
                    version=software_version,
                ),
                tracking_uid=hd.UID(),
                tracking_id=f"lesion-{lesion['lesion_id']}",
            )
        )
    if not descriptions:
        raise InputError("no lesion to write", field="seg")
    # pydicom/highdicom warnings quote attribute values (patient names included): never let them out.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = _segmentation(datasets, segment_map, descriptions, software_version)
    with atomic_output(out_path) as temporary:
        seg.save_as(temporary)
    return out_path


def _segmentation(
    datasets: list, segment_map: np.ndarray, descriptions: list, software_version: str
) -> hd.seg.Segmentation:
    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=segment_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=9001,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="wlcad label estimation",
        software_versions=software_version,
        device_serial_number="0",
        series_description="wlcad lesion labels",
        omit_empty_frames=True,
    )
