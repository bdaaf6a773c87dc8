"""Model repository, config.pbtxt, model cards, export helper, `wlcad models check`, embedded backend.

Runs on a real tiny ONNX 3D conv net built in the test (no trained model ships yet) and, with the
same checks, on every model actually present in model_repository/.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from services.cli.main import main as wlcad
from services.core.errors import InputError
from services.inference import BlockingBackend, backend_from_setting
from services.inference.card import ModelCard, sha256_file
from services.inference.checks import check_model
from services.inference.config import format_config, parse_config, read_config
from services.inference.embedded import EmbeddedBackend
from services.inference.export import register_onnx_model
from services.inference.factory import default_repository
from services.inference.repository import ModelRepository
from services.inference.toy_model import toy_onnx
from services.inference.triton import TritonBackend

CARD = {
    "command": "python -m training.fit --config toy.yaml",
    "data_manifest": "manifests/toy.json",
    "seed": 7,
}


def _register(root: Path, name: str = "toy", **options) -> Path:
    options.setdefault("git_commit", "0123456789abcdef0123456789abcdef01234567")
    return register_onnx_model(root, name, toy_onnx(16), metrics={"dice": 0.5}, **CARD, **options)


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    _register(tmp_path, max_batch_size=4, preferred_batch_sizes=(4,), max_queue_delay_us=5000)
    register_onnx_model(
        tmp_path, "toy_any", toy_onnx(None), metrics={}, git_commit="abcdef0", max_batch_size=0, **CARD
    )
    return ModelRepository(tmp_path)


def _volume(batch: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 1, size, size, size)).astype(np.float32)


def test_export_writes_triton_config_and_card(repo: ModelRepository) -> None:
    config = read_config(repo.root / "toy" / "config.pbtxt")
    assert config.name == "toy" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 4
    assert list(config.dynamic_batching.preferred_batch_size) == [4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("image", mc.TYPE_FP32, [1, 16, 16, 16])
    ]
    assert [(t.name, list(t.dims)) for t in config.output] == [
        ("probability", [1, 16, 16, 16]),
        ("score", [1]),
    ]
    any_config = repo.config("toy_any")
    assert any_config.max_batch_size == 0 and not any_config.HasField("dynamic_batching")
    assert list(any_config.input[0].dims) == [-1, 1, -1, -1, -1]
    card = ModelCard.read(repo.root / "toy")
    entry = card.versions["1"]
    assert entry.sha256 == sha256_file(repo.root / "toy" / "1" / "model.onnx")
    # Triton reads the repository as another user: the staged temp file's 0600 must not survive.
    assert (repo.root / "toy" / "1" / "model.onnx").stat().st_mode & 0o777 == 0o644
    assert (entry.command, entry.seed, entry.metrics) == (CARD["command"], 7, {"dice": 0.5})
    # A second export becomes version 2; the card keeps version 1's provenance.
    _register(repo.root, max_batch_size=4)
    assert repo.versions("toy") == [1, 2]
    assert set(ModelCard.read(repo.root / "toy").versions) == {"1", "2"}
    assert check_model(repo, "toy") == []


def test_export_defaults_git_commit_to_head(tmp_path: Path) -> None:
    register_onnx_model(tmp_path, "m", toy_onnx(8), metrics={}, **CARD)
    commit = ModelCard.read(tmp_path / "m").versions["1"].git_commit
    assert len(commit.removesuffix("-dirty")) == 40


def test_config_round_trips_and_rejects_typos() -> None:
    config = parse_config('name: "m" platform: "onnxruntime_onnx" max_batch_size: 2')
    assert parse_config(format_config(config)) == config
    with pytest.raises(InputError, match="max_batch_sise") as caught:
        parse_config('name: "m" max_batch_sise: 2', "m/config.pbtxt")
    assert caught.value.field == "m/config.pbtxt"


def test_check_passes_good_models(repo: ModelRepository) -> None:
    assert {name: check_model(repo, name) for name in repo.model_names()} == {"toy": [], "toy_any": []}


def test_check_finds_each_kind_of_problem(repo: ModelRepository) -> None:
    model_dir = repo.root / "toy"
    onnx_path = model_dir / "1" / "model.onnx"
    # sha256 no longer matches the card
    onnx_path.write_bytes(toy_onnx(16, seed=1))
    assert any("sha256" in p for p in check_model(repo, "toy"))
    # config dims / names disagree with the ONNX model
    config = repo.config("toy")
    config.input[0].dims[1] = 32
    config.output[1].name = "scores"
    (model_dir / "config.pbtxt").write_text(format_config(config))
    problems = " | ".join(check_model(repo, "toy"))
    assert "config dims [1, 32, 16, 16]" in problems and "output names" in problems
    # unparseable config
    (model_dir / "config.pbtxt").write_text("name: 'toy' max_batch_size: four")
    assert "not a valid Triton model config" in check_model(repo, "toy")[0]
    # card missing, and a card listing a version that is not there
    (repo.root / "toy_any" / "model_card.json").unlink()
    assert any("model card missing" in p for p in check_model(repo, "toy_any"))
    card = {
        "name": "toy_any",
        "versions": {"1": {**CARD, "git_commit": "abcdef0", "metrics": {}, "sha256": "0" * 64}},
    }
    card["versions"]["3"] = card["versions"]["1"]
    (repo.root / "toy_any" / "model_card.json").write_text(json.dumps(card))
    problems = " | ".join(check_model(repo, "toy_any"))
    assert "sha256" in problems and "lists version 3" in problems


def test_models_check_cli(repo: ModelRepository, capsys) -> None:
    assert wlcad(["models", "check", "--repository", str(repo.root)]) == 0
    assert "toy: ok" in capsys.readouterr().out
    (repo.root / "toy" / "1" / "model.onnx").write_bytes(toy_onnx(16, seed=3))
    assert wlcad(["models", "check", "--repository", str(repo.root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["models"]["toy_any"] == [] and "sha256" in report["models"]["toy"][0]
    assert wlcad(["models", "check", "--repository", str(repo.root / "missing")]) == 2
    assert "--repository" in capsys.readouterr().err


def test_every_shipped_model_passes_check() -> None:
    """Each model in model_repository/ (none until training ships one) must pass `wlcad models check`."""
    shipped = ModelRepository(default_repository())
    for name in shipped.model_names():
        assert check_model(shipped, name) == [], name
        assert shipped.config(name).instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU, name


def test_embedded_matches_onnxruntime_and_batches(repo: ModelRepository) -> None:
    import onnxruntime as ort

    # The same toy net with a queue delay far longer than the test: every batch waits until it is full
    # instead of racing the arrival of the next request (a 5 ms window a loaded machine can miss).
    _register(
        repo.root, "toy_patient", max_batch_size=4, preferred_batch_sizes=(4,), max_queue_delay_us=60_000_000
    )
    reference = ort.InferenceSession(str(repo.onnx_path("toy_patient")), providers=["CPUExecutionProvider"])
    volumes = [_volume(1, seed=i) for i in range(12)]

    async def run() -> tuple[list[dict[str, np.ndarray]], dict[str, int]]:
        async with EmbeddedBackend(repo) as backend:
            results = await asyncio.gather(*(backend.infer("toy_patient", {"image": v}) for v in volumes))
            return results, backend.stats("toy_patient")

    results, stats = asyncio.run(run())
    for volume, result in zip(volumes, results, strict=True):
        probability, score = reference.run(None, {"image": volume})
        assert np.abs(result["probability"] - probability).max() <= 1e-5
        assert np.abs(result["score"] - score).max() <= 1e-5
    # 12 concurrent requests ran as three full batches of max_batch_size=4.
    assert stats == {"requests": 12, "runs": 3, "max_rows": 4}


def test_embedded_rejects_bad_requests_naming_the_field(repo: ModelRepository) -> None:
    cases = [
        ("nope", {"image": _volume(1)}, "model", "unknown model"),
        ("toy", {"image": _volume(1).astype(np.float64)}, "inputs.image", "dtype float64"),
        ("toy", {"image": _volume(1, size=8)}, "inputs.image", "does not match"),
        ("toy", {"image": _volume(1)[0]}, "inputs.image", "rank 4"),
        ("toy", {"image": _volume(5)}, "inputs.image", "max_batch_size"),
        ("toy", {}, "inputs.image", "needs input"),
        ("toy", {"image": _volume(1), "extra": _volume(1)}, "inputs.extra", "no input 'extra'"),
    ]

    async def run() -> None:
        async with EmbeddedBackend(repo) as backend:
            for model, inputs, field, message in cases:
                with pytest.raises(InputError, match=message) as caught:
                    await backend.infer(model, inputs)
                assert caught.value.field == field
            with pytest.raises(InputError) as caught:
                await backend.infer("toy", {"image": _volume(1)}, outputs=["logits"])
            assert caught.value.field == "outputs.logits"

    asyncio.run(run())


def test_embedded_any_size_model_and_blocking_facade(repo: ModelRepository) -> None:
    volume = _volume(2, size=24)  # toy_any: max_batch_size 0, every dim of [-1, 1, -1, -1, -1] free
    with BlockingBackend(lambda: backend_from_setting("embedded", repo.root)) as backend:
        result = backend.infer("toy_any", {"image": volume}, outputs=["score"])
        assert list(result) == ["score"] and result["score"].shape == (2, 1)
        assert backend.signature("toy_any").max_batch_size == 0


def test_setting_selects_backend(tmp_path: Path, monkeypatch) -> None:
    async def kinds() -> list[str]:
        monkeypatch.setenv("WLCAD_INFERENCE", "triton://127.0.0.1:8001")
        triton = backend_from_setting()
        assert isinstance(triton, TritonBackend) and triton.url == "127.0.0.1:8001" and triton.shared_memory
        await triton.close()
        monkeypatch.delenv("WLCAD_INFERENCE")
        embedded = backend_from_setting(repository=tmp_path)
        return [triton.kind, embedded.kind]

    assert asyncio.run(kinds()) == ["triton", "embedded"]
    for bad in ("onnx", "triton://nohost", "triton://host:port"):
        with pytest.raises(InputError) as caught:
            backend_from_setting(bad)
        assert caught.value.field == "WLCAD_INFERENCE"


def test_repository_readme_exists_and_layout_is_documented() -> None:
    readme = (Path(__file__).resolve().parents[1] / "model_repository" / "README.md").read_text()
    assert "model_card.json" in readme and "config.pbtxt" in readme


def test_copied_repository_stays_valid(repo: ModelRepository, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(repo.root, copy)
    assert check_model(ModelRepository(copy), "toy") == []
