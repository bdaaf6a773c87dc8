"""The CIRCUS CS plug-in contract as wlcad types: the capabilities offered as plug-ins, the
``results.json`` they write, its overlay attachments, and ``plugin.json``.

CIRCUS CS hands a plug-in numbered volumes (``N.mhd|N.raw|N.json``, read by
:mod:`services.core.io.circus`) and reads back ``results.json``:
``{"results": {"lesionCandidates": [...], "volumes": [...]}, "metadata": {...}}`` from a detection
plug-in, ``{"results": {"anomaly": {...}}, "metadata": {...}}`` and a PNG from an anomaly one. A candidate's
``location`` is a voxel index ``[x, y, z]`` of the volume *as stored* in ``N.raw`` (so a head-first
series with negative z spacing counts z from its first stored slice), ``rank`` is unique from 1 and
``volumeId`` names the input volume. An overlay (``results.volumes[]``) is a voxel box: ``origin``
(first voxel index), ``size`` (voxels, x y z), and the attachment ``name.raw.gz``: the box's voxels,
x fastest then y then z, one bit each, most significant bit first, gzip-compressed.

The shapes are also JSON Schemas in ``schemas/circus/`` (what the tests validate against); the
types here refuse what the schemas refuse, so a plug-in cannot write a file CIRCUS would reject.
"""

from __future__ import annotations

import enum
import gzip
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.core.errors import InputError

__all__ = [
    "CAPABILITIES",
    "AnomalyResult",
    "Capability",
    "LesionCandidate",
    "PluginKind",
    "PluginManifest",
    "PluginResults",
    "ResultImage",
    "VolumeOverlay",
    "capability_named",
]

#: The folders CIRCUS CS mounts into a plug-in's container.
CIRCUS_IN = "/circus/in"
CIRCUS_OUT = "/circus/out"
RESULTS_FILE = "results.json"
#: CIRCUS's own limit on a plug-in's description.
MAX_DESCRIPTION_CHARS = 128
#: semver.org 2.0.0's regular expression (what CIRCUS checks a plug-in version against).
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


#: The per-candidate verdicts a reader chooses from, in the order CIRCUS stores as 0, 1.
FEEDBACK_CHOICES = ("TP", "FP")
#: The reader's verdict on a whole image an anomaly plug-in scored (stored as the value itself).
VERDICT_CHOICES = ("normal", "abnormal")
#: The Gallery image of an anomaly plug-in: CIRCUS's displayStrategy names its files up front.
ANOMALY_FIGURE = "anomaly-map.png"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PluginKind(enum.Enum):
    """What a plug-in reports, which fixes its ``results.json`` and its display."""

    #: Ranked lesion candidates (LesionCandidates, a TP/FP verdict per candidate).
    DETECTION = "detection"
    #: One image's anomaly score and map (Gallery, and the reader's normal/abnormal verdict).
    ANOMALY = "anomaly"


@dataclass(frozen=True)
class Capability:
    """One wlcad capability offered as a plug-in.

    ``task``: the CADe task whose candidates the plug-in reports (``kind`` DETECTION) or the anomaly
    task it scores with (ANOMALY); ``overlays``: whether a detection plug-in also estimates each
    candidate's mask (label estimation) and attaches it as a VolumeOverlay. A radiograph task takes
    CIRCUS's 2D input: a volume of one slice (DimSize X Y 1).
    """

    name: str
    plugin_name: str
    task: str
    overlays: bool
    description: str
    caption: str
    kind: PluginKind = PluginKind.DETECTION

    def __post_init__(self) -> None:
        if self.overlays and self.kind is not PluginKind.DETECTION:
            raise ValueError(f"{self.name}: only a detection plug-in attaches mask overlays")

    def display_strategy(self) -> list[dict[str, Any]]:
        """What CIRCUS shows: the ranked candidates (reader feedback per candidate), and for label
        estimation the masks over the image; for an anomaly plug-in the image beside its anomaly map,
        labelled with the score, and the reader's verdict on the whole image."""
        if self.kind is PluginKind.ANOMALY:
            return self._anomaly_display()
        # The reader marks each candidate TP or FP with CIRCUS's Choice listener (the value stored is the
        # option's index), which is what ``wlcad feedback ingest --choices TP,FP`` reads back.
        verdicts = {"feedbackListener": {"type": "Choice", "options": {"personal": list(FEEDBACK_CHOICES)}}}
        strategy = [
            {
                "type": "LesionCandidates",
                "feedbackKey": "lesionCandidates",
                "caption": self.caption,
                "options": verdicts,
            }
        ]
        if self.overlays:
            strategy.append(
                {"type": "VolumeOverlay", "feedbackKey": "volumeOverlay", "caption": "Lesion masks"}
            )
        return strategy

    def _anomaly_display(self) -> list[dict[str, Any]]:
        labels = [
            {"customLabel": "score (bits/dim):", "dataPath": "results.anomaly.score"},
            {
                "customLabel": "above % of validation normals:",
                "dataPath": "results.anomaly.percentileAmongNormals",
            },
            {"customLabel": "z among normals:", "dataPath": "results.anomaly.z"},
        ]
        return [
            {
                "type": "Gallery",
                "caption": self.caption,
                "options": {
                    "imageInfo": [
                        {"fileName": ANOMALY_FIGURE, "labelData": labels, "labelPosition": "bottom"}
                    ]
                },
            },
            {
                "type": "Choice",
                "feedbackKey": "verdict",
                "caption": "Reader's verdict on the image",
                "options": {"personal": [{"caption": v, "value": v} for v in VERDICT_CHOICES]},
            },
        ]


CAPABILITIES: dict[str, Capability] = {
    c.name: c
    for c in (
        Capability(
            "chest-ct-nodule",
            "wlcad-chest-ct-nodule",
            "chest-ct-nodule",
            overlays=False,
            description="wlcad lung nodule candidates on chest CT (3D detector trained on weak labels)",
            caption="Lung nodule candidates",
        ),
        Capability(
            "cxr-mass",
            "wlcad-cxr-mass",
            "cxr-mass",
            overlays=False,
            description="wlcad mass candidates on a chest radiograph (2D input as a one-slice volume)",
            caption="Mass candidates",
        ),
        Capability(
            "head-mra-aneurysm",
            "wlcad-head-mra-aneurysm",
            "head-mra-aneurysm",
            overlays=False,
            description="wlcad intracranial aneurysm candidates on TOF-MRA (3D detector trained on sphere labels)",
            caption="Aneurysm candidates",
        ),
        Capability(
            "label-estimation",
            "wlcad-label-estimation",
            "chest-ct-nodule",
            overlays=True,
            description="wlcad lung nodule candidates on chest CT with each nodule's estimated mask as an overlay",
            caption="Lung nodule candidates",
        ),
        Capability(
            "cxr-anomaly",
            "wlcad-cxr-anomaly",
            "cxr-anomaly",
            overlays=False,
            description="wlcad anomaly score of a chest radiograph (normalising flows trained on normal/abnormal labels only)",
            caption="Anomaly map",
            kind=PluginKind.ANOMALY,
        ),
    )
}


def capability_named(name: str) -> Capability:
    if name not in CAPABILITIES:
        raise InputError(f"unknown plug-in {name!r} (plug-ins: {', '.join(CAPABILITIES)})", field="task")
    return CAPABILITIES[name]


def _voxel_triple(values: Sequence[int], what: str, least: int) -> list[int]:
    out = [int(v) for v in values]
    if len(out) != 3 or any(v < least for v in out):
        raise InputError(f"needs 3 integers ≥ {least}, got {list(values)}", field=what)
    return out


@dataclass(frozen=True)
class LesionCandidate:
    """One ``results.lesionCandidates`` entry. ``volume_size_mm3``: the candidate's equivalent-sphere
    volume (from the detector's diameter), what CIRCUS shows as its size."""

    rank: int
    confidence: float
    volume_id: int
    location_voxel: tuple[int, int, int]
    volume_size_mm3: float

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InputError(f"must be ≥ 1, got {self.rank}", field="rank")
        if not (math.isfinite(self.confidence) and 0.0 <= self.confidence <= 1.0):
            raise InputError(f"must lie in [0, 1], got {self.confidence}", field="confidence")
        if self.volume_id < 0:
            raise InputError(f"must be ≥ 0, got {self.volume_id}", field="volumeId")
        _voxel_triple(self.location_voxel, "location", 0)

    def as_json(self) -> dict[str, Any]:
        return {
            "rank": int(self.rank),
            "confidence": float(self.confidence),
            "volumeId": int(self.volume_id),
            "location": [int(v) for v in self.location_voxel],
            "volumeSize": float(self.volume_size_mm3),
        }


def pack_overlay(mask_zyx) -> bytes:
    """A box's mask as CIRCUS reads an overlay: x fastest, 1 bit per voxel, MSB first, gzip."""
    import numpy as np

    bits = np.packbits(np.ascontiguousarray(mask_zyx, dtype=bool).ravel(), bitorder="big")
    return gzip.compress(bits.tobytes(), mtime=0)


@dataclass(frozen=True)
class VolumeOverlay:
    """One ``results.volumes`` entry and its attachment bytes (``name.raw.gz``)."""

    name: str
    volume_id: int
    origin_voxel: tuple[int, int, int]
    size_voxel: tuple[int, int, int]
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise InputError(f"{self.name[:64]!r} is not a plain file name stem", field="volumes.name")
        _voxel_triple(self.origin_voxel, "volumes.origin", 0)
        _voxel_triple(self.size_voxel, "volumes.size", 1)

    @property
    def raw_file(self) -> str:
        return f"{self.name}.raw.gz"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "volumeId": int(self.volume_id),
            "origin": [int(v) for v in self.origin_voxel],
            "size": [int(v) for v in self.size_voxel],
            "rawFile": self.raw_file,
        }


@dataclass(frozen=True)
class ResultImage:
    """A picture attached to the results (what a Gallery display shows): a plain file name, PNG bytes."""

    file_name: str
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not (_NAME.match(self.file_name) and self.file_name.endswith(".png")):
            raise InputError(
                f"{self.file_name[:64]!r} is not a plain .png file name", field="imageInfo.fileName"
            )
        if not self.data.startswith(_PNG_SIGNATURE):
            raise InputError("is not PNG data", field="imageInfo.fileName")


@dataclass(frozen=True)
class AnomalyResult:
    """``results.anomaly``: how abnormal volume ``volume_id`` looks, as ``wlcad score`` says it
    (score in ``units``, higher = more abnormal; percentile and z among the model card's validation
    normals), the model that said it, and the figure attached for the reader."""

    volume_id: int
    score: float
    units: str
    percentile_among_normals: float
    z: float
    model_version: str
    calibration_normals: int
    figure: str = ANOMALY_FIGURE

    def __post_init__(self) -> None:
        if self.volume_id < 0:
            raise InputError(f"must be ≥ 0, got {self.volume_id}", field="anomaly.volumeId")
        if not (math.isfinite(self.score) and math.isfinite(self.z)):
            raise InputError("score and z must be finite", field="anomaly.score")
        if not 0.0 <= self.percentile_among_normals <= 100.0:
            raise InputError(
                f"must lie in [0, 100], got {self.percentile_among_normals}",
                field="anomaly.percentileAmongNormals",
            )

    def as_json(self) -> dict[str, Any]:
        return {
            "volumeId": int(self.volume_id),
            "score": float(self.score),
            "units": self.units,
            "percentileAmongNormals": float(self.percentile_among_normals),
            "z": float(self.z),
            "model": self.model_version,
            "calibrationNormals": int(self.calibration_normals),
            "figure": self.figure,
        }


@dataclass(frozen=True)
class PluginResults:
    """Everything one run hands back: candidates ranked 1.. by confidence and their overlays (a
    detection plug-in), or one image's anomaly score and its figure (an anomaly plug-in); metadata."""

    candidates: tuple[LesionCandidate, ...]
    overlays: tuple[VolumeOverlay, ...]
    metadata: dict[str, Any]
    anomaly: AnomalyResult | None = None
    images: tuple[ResultImage, ...] = ()

    def __post_init__(self) -> None:
        ranks = sorted(c.rank for c in self.candidates)
        if ranks != list(range(1, len(ranks) + 1)):
            raise InputError(f"ranks must be 1..{len(ranks)}, each once; got {ranks}", field="rank")
        if self.anomaly is not None and (self.candidates or self.overlays):
            raise InputError("an anomaly result carries no candidates or overlays", field="results")
        files = [o.raw_file for o in self.overlays] + [i.file_name for i in self.images]
        if len(set(files)) != len(files):
            raise InputError("attachment names must be unique", field="volumes.name")
        if self.anomaly is not None and self.anomaly.figure not in files:
            raise InputError(f"names {self.anomaly.figure!r}, which is not attached", field="anomaly.figure")

    def attachments(self) -> list[tuple[str, bytes]]:
        """(file name, bytes) of every file beside ``results.json``."""
        return [(o.raw_file, o.data) for o in self.overlays] + [(i.file_name, i.data) for i in self.images]

    def summary(self) -> str:
        """One line for a log or a progress event (counts and numbers, nothing about the patient)."""
        if self.anomaly is not None:
            a = self.anomaly
            return f"score {a.score:.4f} {a.units}, above {a.percentile_among_normals:.1f} % of normals"
        return f"{len(self.candidates)} candidate(s), {len(self.overlays)} overlay(s)"

    def as_json(self) -> dict[str, Any]:
        if self.anomaly is not None:
            return {"results": {"anomaly": self.anomaly.as_json()}, "metadata": self.metadata}
        results: dict[str, Any] = {"lesionCandidates": [c.as_json() for c in self.candidates]}
        if self.overlays:
            results["volumes"] = [o.as_json() for o in self.overlays]
        return {"results": results, "metadata": self.metadata}


@dataclass(frozen=True)
class PluginManifest:
    """``plugin.json``: what CIRCUS registers. ``endpoint`` only for a ``CAD+remote`` plug-in."""

    type: str
    plugin_name: str
    version: str
    description: str
    display_strategy: list[dict[str, Any]]
    endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.type not in ("CAD", "CAD+remote"):
            raise InputError(f"must be CAD or CAD+remote, got {self.type!r}", field="type")
        if not _NAME.match(self.plugin_name):
            raise InputError(f"{self.plugin_name[:64]!r} is not a plug-in name", field="pluginName")
        if not SEMVER.match(self.version):
            raise InputError(f"{self.version[:64]!r} is not a semantic version (x.y.z)", field="version")
        if not 0 < len(self.description) <= MAX_DESCRIPTION_CHARS:
            raise InputError(
                f"must be 1..{MAX_DESCRIPTION_CHARS} characters, got {len(self.description)}",
                field="description",
            )
        if (self.type == "CAD+remote") != (self.endpoint is not None):
            raise InputError("a CAD+remote plug-in (and only one) names its endpoint", field="endpoint")
        if self.endpoint is not None and not re.match(r"^https?://[^\s/]+(/\S*)?$", self.endpoint):
            raise InputError(f"{self.endpoint[:64]!r} is not an http(s) URL", field="endpoint")

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type,
            "pluginName": self.plugin_name,
            "version": self.version,
            "description": self.description,
            "displayStrategy": self.display_strategy,
        }
        if self.endpoint is not None:
            out["endpoint"] = self.endpoint
        return out
