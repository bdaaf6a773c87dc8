"""Deployment files' security and command lines (tests/test_deploy_helm.py and test_deploy_compose.py
run the validators): every wlcad command line in the chart and in docker-compose.yml parses with
the real CLI parser (so a renamed option breaks this test, not a deployment). Nothing ships a usable
token: the chart generates the gateway→service token, compose requires every token from the
environment, and NetworkPolicies let only the gateway reach the services' gRPC ports."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
from pathlib import Path

import yaml

from services.capabilities import BUILT_IN
from services.cli.main import build_parser
from services.gateway.auth import TokenSet
from services.servers.service_auth import ENV_SERVICE_HASHES, ENV_UPSTREAM_TOKEN, check_listen
from tests.conftest import REPO_ROOT
from tests.test_deploy_helm import CHART, TOKEN, render, template_text


def _wlcad_args(command: list[str]):
    args = build_parser().parse_args(command)
    assert args.handler is not None
    return args


def test_every_wlcad_command_line_of_the_chart_parses_with_the_cli():
    """tests/test_deploy_helm.py runs the validators; here the commands themselves meet the real parser."""
    for values in ([], ["-f", str(CHART / "ci" / "production-values.yaml")]):
        objects = render(*values, tokens=not values)
        for document in objects.values():
            if document["kind"] != "Deployment":
                continue
            (box,) = document["spec"]["template"]["spec"]["containers"]
            if "wlcad" in box["image"]:
                _wlcad_args(box["args"])
    assert "cade" in {o["metadata"]["labels"].get("app.kubernetes.io/component") for o in objects.values()}


def _secret_file(objects: dict[str, dict], name: str, option: str) -> tuple[str, str]:
    """(Secret name, key) behind the file a container's ``option`` names."""
    spec = objects[f"Deployment/t-{name}"]["spec"]["template"]["spec"]
    (box,) = spec["containers"]
    path = Path(box["args"][box["args"].index(option) + 1])
    (mount,) = [m for m in box["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    (item,) = [i for i in volume["secret"]["items"] if i["path"] == path.name]
    return volume["secret"]["secretName"], item["key"]


def test_chart_generates_the_service_token_and_gives_the_services_only_its_hash():
    objects = render()
    data = objects["Secret/t-service-token"]["data"]
    token, hashes = (base64.b64decode(data[key]).decode() for key in ("token", "hashes"))
    assert len(token) >= 32 and hashes == "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    fresh = template_text(
        "--set", f"gateway.tokenHashes={{{TOKEN}}}", "--show-only", "templates/service-token.yaml"
    )
    assert base64.b64decode(yaml.safe_load(fresh)["data"]["token"]).decode() != token  # random per render
    assert _secret_file(objects, "gateway", "--upstream-token-file") == ("t-service-token", "token")
    for name in ("label-estimation", "cade"):
        assert _secret_file(objects, name, "--tokens-file") == ("t-service-token", "hashes")
        (box,) = objects[f"Deployment/t-{name}"]["spec"]["template"]["spec"]["containers"]
        assert not box.get("env") and "--upstream-token-file" not in box["args"]
        # the service's pod address needs tokens, and these are the ones the gateway sends
        args = _wlcad_args(box["args"])
        check_listen(args.listen, TokenSet([hashes]))
    assert TokenSet([hashes]).check(f"Bearer {token}")
    assert _secret_file(objects, "gateway", "--tokens-file") == ("t-gateway-tokens", "tokens")
    assert objects["Secret/t-gateway-tokens"]["stringData"]["tokens"].split() == [TOKEN]


def test_chart_network_policies_admit_only_the_gateway_to_service_grpc_ports():
    objects = render()
    policy = objects["NetworkPolicy/t-label-estimation"]["spec"]
    pod_labels = objects["Deployment/t-label-estimation"]["spec"]["template"]["metadata"]["labels"]
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    gateway_labels = objects["Deployment/t-gateway"]["spec"]["template"]["metadata"]["labels"]
    grpc_port = objects["Deployment/t-label-estimation"]["spec"]["template"]["spec"]["containers"][0][
        "ports"
    ][0]["containerPort"]
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
    assert [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in triton] == sorted(
        c.name for c in BUILT_IN
    )
    assert not any(o.startswith("NetworkPolicy/") for o in render("--set", "networkPolicy.enabled=false"))


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
