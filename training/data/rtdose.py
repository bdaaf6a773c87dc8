"""A Gamma-Knife-like RT dose: steep fall-off around each treated target, 50 % isodose on its edge.

Radiosurgery prescribes to the ~50 % isodose of each target's maximum, so the prescription isodose
line *is* the target outline — which makes an RTDOSE a second weak label (treated targets only; the
untreated ones are exactly what a detector trained on dose-derived labels would miss). The dose lives
on its own coarser grid, as in every planning system export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from services.core.atomic import atomic_output
from services.core.grid import Grid, as_grid
from services.core.volume import Volume

RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
PRESCRIPTION_FRACTION = 0.5


def dose_geometry(image: Grid | Volume, spacing_mm: float) -> Grid:
    """A grid covering the image's box at a coarser isotropic ``spacing_mm`` (same direction).

    Sizes round up (unlike :meth:`Grid.respaced`), so the dose grid covers every image voxel.
    """
    extent = np.asarray(image.shape_xyz) * np.asarray(image.spacing)
    size = np.maximum(1, np.ceil(extent / spacing_mm)).astype(int)
    corner = image.index_to_world(np.full(3, -0.5))
    origin = corner + image.direction @ np.full(3, spacing_mm / 2)
    return Grid(tuple(int(n) for n in size[::-1]), (spacing_mm,) * 3, tuple(origin), image.direction)


def sample_labels(
    mask: Volume, grid: Grid | Volume, box_zyx: tuple[slice, slice, slice] | None = None
) -> np.ndarray:
    """The label map sampled (nearest voxel) at the dose grid's voxel centres (within ``box_zyx``).

    ``grid`` may be the dose Volume itself (its values are not read).
    """
    grid = as_grid(grid)
    box = box_zyx or tuple(slice(0, n) for n in grid.shape)
    kk_, jj_, ii_ = np.meshgrid(*(np.arange(b.start, b.stop) for b in box), indexing="ij")
    world = grid.index_to_world(np.stack([ii_, jj_, kk_], axis=-1).astype(float))
    idx = mask.world_to_nearest_index(world)
    size = np.asarray(mask.shape_xyz)
    valid = np.all((idx >= 0) & (idx < size), axis=-1)
    idx = np.clip(idx, 0, size - 1)
    return np.where(valid, np.asarray(mask.array)[idx[..., 2], idx[..., 1], idx[..., 0]], 0)


def _target_box(mask: Volume, grid: Grid, region: tuple[slice, slice, slice], margin_mm: float):
    """Dose-grid box around a target's image-grid box, grown by ``margin_mm`` (beyond it dose ≈ 0)."""
    lo = np.array([region[2].start, region[1].start, region[0].start], float) - 0.5
    hi = np.array([region[2].stop, region[1].stop, region[0].stop], float) - 0.5
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    idx = grid.world_to_index(mask.index_to_world(corners))
    pad = margin_mm / grid.spacing[0]
    size = np.asarray(grid.shape_xyz)
    start = np.clip(np.floor(idx.min(0) - pad).astype(int), 0, size - 1)
    stop = np.clip(np.ceil(idx.max(0) + pad).astype(int) + 1, 1, size)
    return (slice(start[2], stop[2]), slice(start[1], stop[1]), slice(start[0], stop[0]))


def dose_for_targets(
    rng: np.random.Generator, mask: Volume, treated_ids: list[int], spacing_mm: float | None = None
) -> Volume:
    """Physical dose (Gy, float32) on a coarse grid; target t peaks at 2 × its prescription.

    Inside a target the dose rises from 50 % of its maximum at the edge to 100 % at the deepest
    point; outside it falls as exp(−distance / 2–3 mm), the steep gradient of radiosurgery. Work is
    done in a box 40 mm around each target: beyond that the dose is < 10⁻⁶ of its maximum.
    """
    grid = dose_geometry(mask, spacing_mm or float(rng.choice([1.5, 2.0, 2.5])))
    dose = np.zeros(grid.shape, dtype=np.float64)
    step = grid.spacing[0]
    regions = ndimage.find_objects(np.asarray(mask.array).astype(np.int32))
    for lesion_id in treated_ids:
        if lesion_id > len(regions) or regions[lesion_id - 1] is None:
            continue
        box = _target_box(mask, grid, regions[lesion_id - 1], 40.0)
        target = sample_labels(mask, grid, box) == lesion_id
        if not target.any():  # smaller than a dose voxel: the voxel holding its centre
            centre = np.argwhere(np.asarray(mask.array) == lesion_id).mean(0)[::-1]
            i, j, k = grid.world_to_nearest_index(mask.index_to_world(centre))
            target[k - box[0].start, j - box[1].start, i - box[2].start] = True
        d_max = 2.0 * rng.uniform(15.0, 24.0)
        falloff = rng.uniform(2.0, 3.0)
        depth = ndimage.distance_transform_edt(target, sampling=step) - step / 2
        outside = ndimage.distance_transform_edt(~target, sampling=step) - step / 2
        depth_max = max(float(depth.max()), 1e-6)
        inside_dose = PRESCRIPTION_FRACTION + (1 - PRESCRIPTION_FRACTION) * np.sqrt(
            np.clip(depth / depth_max, 0, 1)
        )
        outside_dose = PRESCRIPTION_FRACTION * np.exp(-np.maximum(outside, 0) / falloff)
        dose[box] += d_max * np.where(target, inside_dose, outside_dose)
    return grid.with_array(dose.astype(np.float32), modality="RTDOSE", dose_units="GY")


def write_rtdose(dose: Volume, path: Path, *, uid_seed: str, referenced_frame_uid: str | None = None) -> Path:
    """Write ``dose`` as a DICOM RT Dose (multi-frame, uint32 + DoseGridScaling), deterministically.

    UIDs derive from ``uid_seed`` so the same case always yields the same file; the patient module
    names a phantom, never a person.
    """
    array = np.asarray(dose.array, dtype=np.float64)
    maximum = float(array.max())
    scaling = maximum / 4_000_000_000 if maximum > 0 else 1.0
    pixels = np.rint(array / scaling).astype(np.uint32)
    nz, ny, nx = array.shape

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_DOSE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, "rtdose-sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = RT_DOSE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "rtdose-series"])
    ds.FrameOfReferenceUID = referenced_frame_uid or generate_uid(entropy_srcs=[uid_seed, "frame"])
    ds.Modality = "RTDOSE"
    ds.PatientName = "PHANTOM"
    ds.PatientID = "PHANTOM"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.ContentTime = "000000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "wlcad phantom"
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [f"{v:.6f}" for v in dose.origin]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*dose.direction[:, 0], *dose.direction[:, 1])]
    ds.PixelSpacing = [f"{dose.spacing[1]:.6f}", f"{dose.spacing[0]:.6f}"]
    ds.SliceThickness = f"{dose.spacing[2]:.6f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ny, nx
    ds.NumberOfFrames = nz
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x3004, 0x000C)
    ds.GridFrameOffsetVector = [f"{k * dose.spacing[2]:.6f}" for k in range(nz)]
    ds.BitsAllocated = 32
    ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.DoseGridScaling = f"{scaling:.10e}"
    plan = Dataset()
    plan.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"
    plan.ReferencedSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, "rtplan"])
    ds.ReferencedRTPlanSequence = [plan]
    ds.PixelData = pixels.tobytes()
    with atomic_output(path) as temporary:
        ds.save_as(temporary, enforce_file_format=True)
    return path
