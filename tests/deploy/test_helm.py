"""The Helm chart (rendered by helm, validated against the Kubernetes schema) and the monitoring files against
the real server: Prometheus scrapes it with the alert rules loaded, the dashboard uses exported metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "polyreward"
ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARD = CHART / "files" / "grafana-dashboard.json"
ITEM = {"prompt": "What is 2 + 2?", "response": "4."}


@pytest.fixture(scope="module")
def helm() -> str:
    path = os.environ.get("HELM") or (
        str(ROOT / ".tools" / "helm") if (ROOT / ".tools" / "helm").exists() else None
    )
    path = path or shutil.which("helm")
    if not path:
        pytest.skip("helm not found: `make deploy-check` fetches it into .tools/helm")
    return path


def render(helm: str, *flags: str) -> dict[str, dict]:
    """`helm template` → {"Kind/name": object}."""
    out = subprocess.run(
        [helm, "template", "rm", str(CHART), "--namespace", "rl", *flags],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(out) if d}


def helm_fails(helm: str, command: str, *flags: str) -> str:
    r = subprocess.run([helm, command, *(["--strict"] if command == "lint" else ["rm"]), str(CHART), *flags],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode != 0, f"helm {command} {flags} should have failed:\n{r.stdout}"
    return r.stdout + r.stderr


def validate(tmp_path: Path, objects) -> subprocess.CompletedProcess:
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(list(objects)))
    kv = Path(sys.executable).parent / "kubernetes-validate"
    return subprocess.run([kv, "--strict", "--quiet", path], capture_output=True, text=True)


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_default_deployment(helm):
    objs = render(helm)
    assert set(objs) == {
        "Deployment/rm-polyreward", "Service/rm-polyreward", "ConfigMap/rm-polyreward",
        "ServiceAccount/rm-polyreward", "PodDisruptionBudget/rm-polyreward",
    }  # fmt: skip
    dep = objs["Deployment/rm-polyreward"]
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # The port opens at once; the startup probe gives the models 10 minutes to load (/ready), then liveness
    # on /health and readiness on /ready take over.
    startup = c["startupProbe"]
    assert (
        startup["httpGet"]["path"] == "/ready"
        and startup["periodSeconds"] * startup["failureThreshold"] >= 300
    )
    # Security: non-root, read-only root filesystem, no escalation, no capabilities, a writable /tmp.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert pod["automountServiceAccountToken"] is False
    # Draining: preStop sleep + the server's drain + the longest request fit in the grace period.
    config = objs["ConfigMap/rm-polyreward"]["data"]
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    needed = sleep + float(config["POLYREWARD_DRAIN_SECONDS"]) + float(config["POLYREWARD_REQUEST_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= needed
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # Configuration: the ConfigMap's POLYREWARD_* settings, in the form the server reads.
    assert c["envFrom"] == [{"configMapRef": {"name": "rm-polyreward"}}]
    assert config["POLYREWARD_MAX_BODY_BYTES"] == "8388608" and config["POLYREWARD_ARTIFACTS"] == "/models"
    assert config["POLYREWARD_PORT"] == str(c["ports"][0]["containerPort"])
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert "checksum/config" in dep["spec"]["template"]["metadata"]["annotations"]


def test_gpu_deployment(helm):
    objs = render(helm, "-f", str(CHART / "values-gpu.yaml"))
    dep = objs["Deployment/rm-polyreward"]
    pod, c = dep["spec"]["template"]["spec"], container(dep)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith(":gpu")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]
    assert objs["ConfigMap/rm-polyreward"]["data"]["POLYREWARD_DEVICE"] == "cuda"
    hpa = objs["HorizontalPodAutoscaler/rm-polyreward"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "rm-polyreward" and "replicas" not in dep["spec"]
    assert (
        c["securityContext"]["readOnlyRootFilesystem"] is True
        and c["readinessProbe"]["httpGet"]["path"] == "/ready"
    )


def test_every_option_renders_valid(helm, tmp_path):
    """Models from an init container, API keys, queue-depth autoscaling and the monitoring objects at once,
    checked against the Kubernetes schema."""
    objs = render(
        helm, "--set", "models.source=init", "--set", "apiKeys.keys={k1,k2}",
        "--set", "autoscaling.enabled=true", "--set", "autoscaling.queueDepth.enabled=true",
        "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.prometheusRule.enabled=true",
        "--set", "metrics.grafanaDashboard.enabled=true",
    )  # fmt: skip
    dep = objs["Deployment/rm-polyreward"]
    pod, c = dep["spec"]["template"]["spec"], container(dep)
    (init,) = pod["initContainers"]
    assert {"name": "models", "mountPath": "/models"} in init[
        "volumeMounts"
    ]  # writable for the init container
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    assert objs["Secret/rm-polyreward-api-keys"]["stringData"]["api-keys"].split() == ["k1", "k2"]
    assert {"name": "POLYREWARD_API_KEY_FILE", "value": "/etc/polyreward/secrets/api-keys"} in c["env"]
    metrics = objs["HorizontalPodAutoscaler/rm-polyreward"]["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource", "Pods"]
    assert metrics[1]["pods"]["metric"]["name"] == "polyreward_queue_depth"
    rule = objs["PrometheusRule/rm-polyreward"]["spec"]
    assert rule == yaml.safe_load(ALERTS.read_text())  # the same rules promtool tests
    dashboard = objs["ConfigMap/rm-polyreward-dashboard"]["data"]["polyreward.json"]
    assert json.loads(dashboard) == json.loads(DASHBOARD.read_text())
    r = validate(tmp_path, objs.values())
    assert r.returncode == 0, r.stdout + r.stderr


def test_broken_values_fail(helm, tmp_path):
    # A string port: the values schema refuses it, naming the field...
    assert "/service/port" in helm_fails(helm, "lint", "--set-string", "service.port=http")
    assert "/containerPort" in helm_fails(helm, "template", "--set-string", "containerPort=8000")
    # ...and, had it slipped through, the Kubernetes schema refuses the rendered object.
    objs = render(helm)
    objs["Service/rm-polyreward"]["spec"]["ports"][0]["port"] = "8000"
    r = validate(tmp_path, objs.values())
    assert r.returncode != 0 and "port" in r.stdout + r.stderr
    # A grace period that would kill pods with requests in flight, and a PVC source without a claim.
    assert "terminationGracePeriodSeconds" in helm_fails(
        helm, "template", "--set", "lifecycle.terminationGracePeriodSeconds=30"
    )
    assert "models.pvc.claimName" in helm_fails(helm, "template", "--set", "models.source=pvc")
    assert "/config/precision" in helm_fails(helm, "lint", "--set", "config.precision=bf16")
    assert "typo" in helm_fails(helm, "lint", "--set", "typo=1")  # unknown keys are refused too


def documented_values() -> dict[str, str]:
    """values.yaml key paths that carry a `# --` comment."""
    docs, stack, pending = {}, [], False
    for line in (CHART / "values.yaml").read_text().splitlines():
        if re.match(r"\s*# -- ", line):
            pending = True
        elif m := re.match(r"(\s*)([A-Za-z0-9_]+):", line):
            while stack and stack[-1][0] >= len(m[1]):
                stack.pop()
            stack.append((len(m[1]), m[2]))
            if pending:
                docs[".".join(k for _, k in stack)] = line
            pending = False
        elif not line.strip().startswith("#"):
            pending = False
    return docs


def leaves(values, prefix=""):
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield path, True
            yield from leaves(value, f"{path}.")
        else:
            yield path, False


def test_every_value_documented():
    docs = documented_values()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    undocumented = [
        path
        for path, is_map in leaves(values)
        if not is_map and not any(path == d or path.startswith(f"{d}.") for d in docs)
    ]
    assert not undocumented, f"values.yaml keys without a `# --` comment: {undocumented}"
    readme = (CHART / "README.md").read_text()
    missing = [path for path in docs if f"| `{path}` |" not in readme]
    assert not missing, f"helm/polyreward/README.md has no row for {missing}"
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]) == set(values), "values.schema.json and values.yaml list different keys"


# ---- monitoring against the real server ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def prometheus() -> str:
    """Session-scoped, so a missing prometheus skips before the module's server starts."""
    return shutil.which("prometheus") or pytest.skip(
        "prometheus not installed (.ci/run installs Debian's package)"
    )


@pytest.fixture(scope="module")
def live(export_family, serve):
    """The real server, having scored a few requests: (url, its /metrics text)."""
    with serve(export_family("minilm")) as (url, _):
        for _ in range(3):
            assert httpx.post(f"{url}/v1/score", json={"items": [ITEM, ITEM]}).status_code == 200
        assert httpx.post(f"{url}/v1/score", json={"items": []}).status_code == 422
        yield url, httpx.get(f"{url}/metrics").text


def exported_series(metrics_text: str) -> set[str]:
    """Every series name the server can export: counters with _total, histograms with _bucket/_sum/_count."""
    names = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", metrics_text, re.M):
        suffixes = {"histogram": ["_bucket", "_sum", "_count"]}.get(kind, [""])  # counters: already _total
        names |= {family + s for s in suffixes}
    return names


def referenced_metrics(text: str) -> set[str]:
    return set(re.findall(r"\b(polyreward_[a-z_]+)\b", text))


def test_dashboard_and_alerts_use_exported_metrics(live):
    _, metrics_text = live
    exported = exported_series(metrics_text)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    used = referenced_metrics(" ".join(exprs)) | referenced_metrics(ALERTS.read_text())
    assert "polyreward_queue_depth" in used and "polyreward_request_duration_seconds_bucket" in used
    assert not used - exported, f"not exported by the server: {sorted(used - exported)}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.slow
@pytest.mark.integration
def test_prometheus_scrapes_the_server(prometheus, live, tmp_path, free_port):
    """Debian's prometheus scrapes the real server on 127.0.0.1, loads the alert rules, and a query returns
    polyreward_ series with the values the server reported."""
    url, _ = live
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "polyreward", "static_configs": [{"targets": [url.removeprefix("http://")]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    proc = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        items, deadline = None, time.monotonic() + 60
        while items is None:
            assert proc.poll() is None, f"prometheus exited: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "prometheus returned no polyreward_ series in 60 s"
            time.sleep(1)
            try:
                result = httpx.get(f"{api}/query", params={"query": "polyreward_items_scored_total"}).json()
            except httpx.TransportError:
                continue
            if result["data"]["result"]:
                items = result["data"]["result"]
        (series,) = items
        assert (
            series["metric"]["job"] == "polyreward" and float(series["value"][1]) == 6
        )  # 3 requests × 2 items
        names = httpx.get(f"{api}/label/__name__/values").json()["data"]
        assert {
            "polyreward_queue_depth",
            "polyreward_request_duration_seconds_bucket",
            "polyreward_model_info",
        } <= set(names)
        while True:  # every alert rule evaluated against the real series, without an error
            rules = [r for g in httpx.get(f"{api}/rules").json()["data"]["groups"] for r in g["rules"]]
            if rules and all(r["health"] != "unknown" for r in rules):
                break
            assert time.monotonic() < deadline, f"rules not evaluated in 60 s: {rules}"
            time.sleep(1)
        assert len(rules) >= 4 and all(r["health"] == "ok" for r in rules), rules
    finally:
        proc.terminate()
        proc.wait(timeout=30)
