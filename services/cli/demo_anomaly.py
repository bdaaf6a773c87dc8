"""The anomaly-scoring part of ``wlcad demo``: phantom radiographs (and head CTs, when that model is
shipped) and the real chest radiograph through the gateway's ``wlcad.v1.AnomalyScoring`` service.

The same honesty rules as the rest of the demo:

* Phantoms come from the task's **test** seed (never used for training, selection or calibration), and
  their truth (normal, or the finding inserted) is printed beside each score, ranked most-abnormal
  first as a worklist would be. A handful of cases is no AUC: the model card and
  ``wlcad evaluate anomaly`` hold the test-set figures with their CIs.
* The real radiograph RG1_UNCR is **abnormal** (round lung masses). The models were trained and
  calibrated on phantoms only, so a real radiograph lies far outside anything they have seen: its
  high score says "unlike the phantom normals", not "the masses were found". The demo says so, and
  reports where the map is high relative to the four reader-marked masses (approximate marks).
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np

from services.api.client import channel
from services.api.convert import volume_from_proto, volume_to_proto
from services.api.pb import anomaly_pb2, anomaly_pb2_grpc, common_pb2, image_pb2
from services.core.volume import Volume

#: Test seeds (training/anomaly/tasks.py): never used for training, selection or calibration.
PHANTOM_SEEDS = {"cxr-anomaly": 1303, "head-ct-anomaly": 1403}
#: The demo sends the first test cases of each finding type and this many normals (a CT takes ~1.5 s
#: to generate, a radiograph ~0.1 s), scanning at most ``_SCAN`` cases.
PHANTOM_NORMALS = {"cxr-anomaly": 3, "head-ct-anomaly": 2}
PHANTOM_TYPES = {
    "cxr-anomaly": ("mass", "consolidation", "effusion", "cardiomegaly"),
    "head-ct-anomaly": ("haemorrhage", "infarct"),
}
_SCAN = 40


def _finding(case) -> str:
    kinds = sorted({record.lesion_type for record in case.lesions})
    return ", ".join(kinds) if case.abnormal and kinds else ("abnormal" if case.abnormal else "normal")


class _Client:
    def __init__(self, address: str, token: str | None) -> None:
        self._channel = channel(address)
        self._stub = anomaly_pb2_grpc.AnomalyScoringStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def describe(self) -> anomaly_pb2.AnomalyDescription:
        return self._stub.Describe(common_pb2.DescribeRequest(), timeout=10, metadata=self._metadata)

    def score(self, task: str, image: Volume) -> anomaly_pb2.ScoreResponse:
        request = anomaly_pb2.ScoreRequest(
            task=task, image=image_pb2.ImageSource(volume=volume_to_proto(image)), with_map=True
        )
        return self._stub.Score(request, timeout=120, metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()


def _overlay(image: Volume, response: anomaly_pb2.ScoreResponse, path: Path) -> Volume:
    """The map on the image grid, drawn as ``wlcad score --overlay`` draws it."""
    from services.anomaly.figure import write_score_figure

    on_image = volume_from_proto(response.map).resample(reference=image, output_dtype=np.float32)
    document = {
        "task": response.task,
        "model_version": response.model_version,
        "score": response.score,
        "units": response.units,
        "percentile_among_normals": response.percentile_among_normals,
        "z": response.z,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_score_figure(image, on_image, document, response.calibration_normals, path)
    return on_image


def _demo_cases(task: str) -> list[tuple[int, object]]:
    """(index, case) of the test seed: the first ``PHANTOM_NORMALS`` normals and the first case of
    each finding type, in index order."""
    from training.data.dataset import generate_case

    wanted = {"normal": PHANTOM_NORMALS[task], **dict.fromkeys(PHANTOM_TYPES[task], 1)}
    chosen = []
    for index in range(_SCAN):
        case = generate_case(task, PHANTOM_SEEDS[task], index)
        kinds = {r.lesion_type for r in case.lesions} if case.abnormal else {"normal"}
        if any(wanted.get(k, 0) > 0 for k in kinds):
            for kind in kinds:
                wanted[kind] = wanted.get(kind, 0) - 1
            chosen.append((index, case))
        if all(v <= 0 for v in wanted.values()):
            break
    return chosen


def _phantoms(client: _Client, task: str, out: Path) -> list[dict]:
    rows = []
    for index, case in _demo_cases(task):
        response = client.score(task, case.image)
        name = f"{task}-s{PHANTOM_SEEDS[task]}-{index:04d}"
        _overlay(case.image, response, out / "anomaly" / f"{name}.png")
        rows.append(
            {
                "case": name,
                "truth": _finding(case),
                "score": round(response.score, 4),
                "percentile_among_normals": round(response.percentile_among_normals, 1),
                "z": round(response.z, 2),
                "model_version": response.model_version,
            }
        )
    rows.sort(key=lambda r: -r["score"])
    print(
        f"  {task} ({rows[0]['model_version']}): {len(rows)} phantoms of the test seed "
        f"{PHANTOM_SEEDS[task]} (normals and one of each finding), most abnormal first"
    )
    print(f"    {'case':28s} {'truth':16s} {'score':>8s} {'pct normals':>12s} {'z':>8s}")
    for row in rows:
        print(
            f"    {row['case']:28s} {row['truth']:16s} {row['score']:8.4f} {row['percentile_among_normals']:11.1f}% "
            f"{row['z']:+8.2f}"
        )
    print(f"    (a few cases, not an AUC: the model card has the test-set AUC with its CI) → {out}/anomaly/")
    return rows


def _real_chest_xray(client: _Client, sample, out: Path) -> dict:
    from services.cli.demo_cmd import READER_MARKS

    response = client.score("cxr-anomaly", sample.image)
    on_image = _overlay(sample.image, response, out / sample.name / "anomaly.png")
    plane = on_image.array[0]
    rows, columns = np.mgrid[: plane.shape[0], : plane.shape[1]]
    marks = json.loads(READER_MARKS.read_text())["lesions"]
    inside = np.zeros(plane.shape, dtype=bool)
    for mark in marks:
        inside |= np.hypot(columns - mark["column"], rows - mark["row"]) <= mark["diameter_px"] / 2.0
    record = {
        "model_version": response.model_version,
        "score": round(response.score, 4),
        "percentile_among_normals": round(response.percentile_among_normals, 1),
        "z": round(response.z, 2),
        "map_mean_in_reader_marks": round(float(plane[inside].mean()), 4),
        "map_mean_elsewhere": round(float(plane[~inside].mean()), 4),
    }
    higher = record["map_mean_in_reader_marks"] > record["map_mean_elsewhere"]
    print(
        f"  real {sample.name} (abnormal: round lung masses) with {response.model_version}: score "
        f"{response.score:.3f} {response.units}, above {response.percentile_among_normals:.1f} % of "
        f"{response.calibration_normals} validation normals, z {response.z:+.1f}. The models know phantoms "
        "only: a real radiograph is far outside them, so this says 'unlike the phantom normals', not that "
        f"the masses were found. Map inside the {len(marks)} reader-marked masses "
        f"{record['map_mean_in_reader_marks']:.3f} vs {record['map_mean_elsewhere']:.3f} bits/pixel "
        f"elsewhere ({'higher' if higher else 'not higher'} on the masses: the map "
        f"{'points at them' if higher else 'does not point at them'}) → {out / sample.name}/anomaly.png"
    )
    return record


def run_anomaly(address: str, token: str | None, out: Path, real_samples: list) -> dict:
    """The anomaly section of the demo; returns its summary (also printed)."""
    client = _Client(address, token)
    summary: dict = {}
    try:
        try:
            description = client.describe()
        except grpc.RpcError as exc:
            print(f"\nanomaly: the AnomalyScoring service did not answer ({exc.code().name}); skipped")
            return {"skipped": exc.code().name}
        print("\nanomaly scoring through the gateway's AnomalyScoring service (each task's default model):")
        defaults = {m.task: m for m in description.models if m.is_default}
        for task in PHANTOM_SEEDS:
            model = defaults.get(task)
            if model is None or not model.available:
                reason = model.reason if model is not None else "not offered"
                print(f"  {task}: skipped ({reason})")
                summary[task] = {"skipped": reason}
                continue
            summary[task] = {"phantoms": _phantoms(client, task, out)}
        chest = next((s for s in real_samples if s.name == "chest-xray"), None)
        if chest is not None and "phantoms" in summary.get("cxr-anomaly", {}):
            summary["cxr-anomaly"]["chest-xray"] = _real_chest_xray(client, chest, out)
    finally:
        client.close()
    return summary
