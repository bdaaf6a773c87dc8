"""The Prometheus alert rules in deploy/prometheus/ parse and fire as intended (promtool unit tests),
and every metric they use is one the processes really export."""

from __future__ import annotations

import re
import shutil
import subprocess

from services.servers import observability  # noqa: F401 - registers the metrics
from tests.conftest import REPO_ROOT

RULES = REPO_ROOT / "deploy" / "prometheus"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run scripts/install-system-deps.sh (Debian package prometheus)"
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=RULES)


def test_rules_pass_their_unit_tests():
    checked = _promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_rules_only_use_exported_metrics():
    from prometheus_client import REGISTRY

    families = {metric.name for metric in REGISTRY.collect()}
    used = set(re.findall(r"\b(wlcad_[a-z_]+)", (RULES / "alerts.yml").read_text()))
    assert used, "no wlcad metric in the rules"
    missing = {name for name in used if re.sub(r"_(total|bucket|count|sum)$", "", name) not in families}
    assert not missing, missing
