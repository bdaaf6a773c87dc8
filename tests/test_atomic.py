"""services.core.atomic: outputs get the mode the umask allows, appear whole or not at all, and leave
no temporary file behind on failure.

The umask cases run in a child process: ``os.umask`` is process-global, and changing it here would
change the mode of every file other test threads create meanwhile.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from services.core.atomic import atomic_output, write_bytes_atomically

REPO = Path(__file__).resolve().parents[1]

_CHILD = """
import os, stat, sys
from pathlib import Path
from services.core.atomic import atomic_output, write_bytes_atomically

os.umask(int(sys.argv[1], 8))
folder = Path(sys.argv[2])
# Replacing a private file: the mode comes from the new file, not the replaced one (os.replace swaps inodes).
(folder / "labels.json").write_bytes(b"old")
(folder / "labels.json").chmod(0o600)
write_bytes_atomically(folder / "labels.json", b"new")
write_bytes_atomically(folder / "report.json", b"{}")
with atomic_output(folder / "mask.nii.gz", suffix=".nii.gz") as temporary:
    temporary.write_bytes(b"mask")
# A writer that opens the temporary path itself (as nibabel, SimpleITK and pydicom do).
with atomic_output(folder / "seg.dcm") as temporary, open(temporary, "wb") as out:
    out.write(b"seg")
for name in ("report.json", "mask.nii.gz", "seg.dcm", "labels.json"):
    print(name, oct(stat.S_IMODE((folder / name).stat().st_mode)))
"""


def _modes_under_umask(umask: int, folder: Path) -> dict[str, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, oct(umask), str(folder)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return {name: int(mode, 8) for name, mode in (line.split() for line in result.stdout.splitlines())}


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_output_mode_follows_the_umask(tmp_path: Path, umask: int, expected: int) -> None:
    modes = _modes_under_umask(umask, tmp_path)
    names = ["labels.json", "mask.nii.gz", "report.json", "seg.dcm"]
    assert modes == dict.fromkeys(names, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert (tmp_path / "labels.json").read_bytes() == b"new"


def test_failure_leaves_no_temporary_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "cases.csv"
    target.write_bytes(b"old,complete\n")
    with pytest.raises(RuntimeError, match="writer broke"), atomic_output(target, suffix=".csv") as temporary:
        temporary.write_bytes(b"new,half")
        raise RuntimeError("writer broke")
    assert [p.name for p in tmp_path.iterdir()] == ["cases.csv"]
    assert target.read_bytes() == b"old,complete\n"


def test_failure_on_a_new_target_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "sub" / "mask.nrrd") as temporary:
        temporary.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert list((tmp_path / "sub").iterdir()) == []


def test_temporary_lies_beside_the_target_and_keeps_the_suffix(tmp_path: Path) -> None:
    target = tmp_path / "out" / "mask.nii.gz"
    with atomic_output(target, suffix=".nii.gz") as temporary:
        assert temporary.parent == target.parent
        assert temporary.name.startswith(".mask.nii.gz.") and temporary.name.endswith(".nii.gz")
        assert temporary.is_file() and temporary.stat().st_size == 0
        assert not target.exists()
    assert target.is_file() and not temporary.exists()


def test_target_is_never_seen_partially_written(tmp_path: Path) -> None:
    """Checked at every step of a chunked write (deterministic), and by a concurrent reader whose every
    observation must be the whole old or the whole new content, however the threads interleave."""
    target = tmp_path / "report.json"
    old, new = b"o" * 65536, b"n" * 65536
    target.write_bytes(old)
    seen: set[bytes] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(target.read_bytes())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(20):
            with atomic_output(target) as temporary, temporary.open("wb") as out:
                for start in range(0, len(new), 4096):
                    out.write(new[start : start + 4096])
                    out.flush()
                    assert target.read_bytes() in (old, new)
            assert target.read_bytes() == new
            write_bytes_atomically(target, old)
    finally:
        stop.set()
        thread.join()
    assert seen <= {old, new}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_an_existing_file_with_the_temporary_name_is_never_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O_EXCL: a name already taken is skipped, not truncated."""
    import services.core.atomic as atomic

    tokens = iter(["taken", "free"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda _n: next(tokens))
    squatter = tmp_path / ".x.bin.taken"
    squatter.write_bytes(b"someone else's")
    write_bytes_atomically(tmp_path / "x.bin", b"ours")
    assert squatter.read_bytes() == b"someone else's"
    assert (tmp_path / "x.bin").read_bytes() == b"ours"
