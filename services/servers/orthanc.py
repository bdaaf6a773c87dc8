"""A private Orthanc (DICOMweb server) process for the bench and the integration tests.

The service's DICOMweb reference form fetches series by WADO-RS from an allow-listed server; this
module starts the Debian ``orthanc`` + ``orthanc-dicomweb`` packages with a throw-away storage folder,
so that path is measured and tested against a real PACS rather than a stub.

Exposure: Orthanc 1.10 has no bind-address option and listens on all interfaces. The configuration
therefore turns the DICOM (DIMSE) listener off and keeps ``RemoteAccessAllowed: false``, so the
HTTP port answers only requests from 127.0.0.1; nothing here is reachable from another host beyond a
refusal. (A network namespace would hide the port entirely, but the service and the clients would then
have to run inside it too.)
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ORTHANC = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def available() -> bool:
    """True when the Orthanc binary and its DICOMweb plugin are installed."""
    return shutil.which(ORTHANC) is not None and DICOMWEB_PLUGIN.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configuration(work: Path, http_port: int) -> dict:
    """Orthanc settings: loopback-only answers, no DIMSE listener, storage under ``work``."""
    return {
        "Name": "wlcad-local",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "storage"),
        "HttpPort": http_port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpCompressionEnabled": False,
        "StorageCompression": False,
        "HttpThreadsCount": 8,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1"},
    }


@dataclass
class LocalOrthanc:
    """One Orthanc process; ``url`` is its REST root, ``dicomweb_url`` the WADO-RS base."""

    work: Path
    http_port: int = field(default_factory=_free_port)
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout_s: float = 30.0) -> LocalOrthanc:
        self.work.mkdir(parents=True, exist_ok=True)
        config = self.work / "orthanc.json"
        config.write_text(json.dumps(configuration(self.work, self.http_port), indent=2))
        log = open(self.work / "orthanc.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self.process.returncode}; see {self.work}/orthanc.log"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/system", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"Orthanc did not answer within {timeout_s} s")
            time.sleep(0.1)

    def upload(self, files: Iterable[Path]) -> int:
        """Store DICOM files through the REST API (``POST /instances``); returns how many."""
        count = 0
        for path in files:
            request = urllib.request.Request(
                f"{self.url}/instances",
                data=Path(path).read_bytes(),
                headers={"Content-Type": "application/dicom"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
            count += 1
        return count

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
