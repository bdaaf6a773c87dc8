"""Write a phantom image as a DICOM series (one file per slice), as a PACS archive would hold it.

Deterministic: UIDs derive from the case id, dates are fixed, so the same seed gives the same bytes.
The patient module names a phantom. Geometry (ImagePositionPatient per slice, orientation from the
volume's direction, PixelSpacing) round-trips through :func:`services.core.io.read_image`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from services.core.volume import Volume

_SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "DX": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture: a synthetic radiograph has no detector
}


def write_dicom_series(volume: Volume, folder: Path, *, uid_seed: str) -> list[Path]:
    """One file per axial slice under ``folder`` (signed 16-bit, rescale 1/0)."""
    modality = str(volume.metadata.get("modality") or "CT")
    sop_class = _SOP_CLASSES.get(modality, _SOP_CLASSES["CT"])
    array = np.asarray(volume.array)
    pixels = np.clip(np.rint(array), -32768, 32767).astype(np.int16)
    study = generate_uid(entropy_srcs=[uid_seed, "study"])
    series = generate_uid(entropy_srcs=[uid_seed, "series"])
    frame = generate_uid(entropy_srcs=[uid_seed, "frame"])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    row_cos, col_cos = volume.direction[:, 0], volume.direction[:, 1]
    for k in range(array.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, "slice", str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "OT" if modality == "DX" else modality
        ds.PatientName = ds.PatientID = "PHANTOM"
        ds.PatientBirthDate = ds.AccessionNumber = ds.ReferringPhysicianName = ""
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.Manufacturer = "wlcad phantom"
        ds.ImageType = ["DERIVED", "SECONDARY"]
        position = volume.index_to_world([0.0, 0.0, float(k)])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [f"{volume.spacing[1]:.6f}", f"{volume.spacing[0]:.6f}"]
        ds.SliceThickness = f"{volume.spacing[2]:.6f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape[1], pixels.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        if modality == "CT":
            ds.RescaleType = "HU"
        ds.PixelData = pixels[k].tobytes()
        path = folder / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
