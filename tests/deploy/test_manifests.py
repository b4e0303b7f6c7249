"""The deployment files: Kubernetes manifests (schema-validated offline), the Grafana dashboard, the Dockerfile.

No container engine runs where the tests run, so the image is checked through what it is made of: its install step
is `scripts/install.sh --runtime` (run for real in tests/deploy/test_image.py), its user, volume and health check
agree with the manifests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import ValidationError, validate

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "kubernetes" / "filefeed.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "filefeed.json"
DOCKERFILE = REPO / "Dockerfile"
K8S_VERSION = "1.37.0"


def documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def kind(name: str) -> dict:
    (doc,) = [d for d in documents() if d["kind"] == name]
    return doc


def container() -> dict:
    return kind("StatefulSet")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_passes_the_strict_schema(doc: dict) -> None:
    validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    """The check above can fail: a misspelt field and a wrong type are both refused."""
    sts = kind("StatefulSet")
    sts["spec"]["replica"] = 3  # misspelt
    with pytest.raises(ValidationError):
        validate(sts, K8S_VERSION, strict=True)
    sts = kind("StatefulSet")
    sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45s"
    with pytest.raises(ValidationError):
        validate(sts, K8S_VERSION, strict=True)


def dockerfile() -> str:
    return DOCKERFILE.read_text()


def healthcheck_command() -> list[str]:
    """The exec-form CMD of the Dockerfile's HEALTHCHECK (continuation lines joined)."""
    text = dockerfile().replace("\\\n", " ")
    return json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", text, re.M).group(1))


def test_probes_volume_and_user_agree_with_the_image() -> None:
    c = container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/v1/status", probe
    assert "/v1/status" in healthcheck_command()[-1]
    staging = kind("ConfigMap")["data"]["FILEFEED_STAGING_DIR"]
    assert {m["mountPath"] for m in c["volumeMounts"] if m["name"] == "staging"} == {staging}
    assert f'VOLUME ["{staging}"]' in dockerfile()
    uid = kind("StatefulSet")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert re.search(rf"^USER {uid}:", dockerfile(), re.M), "the manifest runs as the image's non-root user"
    assert uid != 0
    assert kind("StatefulSet")["spec"]["volumeClaimTemplates"], "each replica keeps its own staging volume"


def test_grace_period_covers_pre_stop_and_uvicorn_drain() -> None:
    spec = kind("StatefulSet")["spec"]["template"]["spec"]
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    sleep = int(re.fullmatch(r"sleep (\d+)", pre_stop[-1]).group(1))
    cli = (REPO / "filefeed" / "cli.py").read_text()
    drain = int(re.search(r"timeout_graceful_shutdown=(\d+)", cli).group(1))
    # preStop, then uvicorn's graceful window, then each worker's last seal (fsyncs): leave at least 15 s for it.
    assert spec["terminationGracePeriodSeconds"] >= sleep + drain + 15


def test_image_installs_with_the_runtime_mode_of_the_install_script() -> None:
    runs = re.findall(r"^RUN (.+)$", dockerfile(), re.M)
    assert "scripts/install.sh --runtime" in runs
    assert not any("pip install" in r for r in runs), "the image installs only through scripts/install.sh"
    install = (REPO / "scripts" / "install.sh").read_text()
    assert '"--runtime"' in install and "[test,servers]" in install


def exported_series() -> set[str]:
    """Every series name filefeed exposes on /metrics, from its metric declarations."""
    text = "\n".join(p.read_text() for p in (REPO / "filefeed").glob("*.py"))
    names: set[str] = set()
    for cls, name in re.findall(r"\b(Counter|Histogram|Gauge|GaugeMetricFamily|CounterMetricFamily)\(\s*\"(\w+)\"",
                                text):
        if cls == "Counter":
            names.add(f"{name}_total")
        elif cls == "Histogram":
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
        else:
            names.add(name)
    # gauges declared as (name, help) pairs and built as GaugeMetricFamily(name, ...) per scrape
    names.update(re.findall(r'^\s*\("(filefeed_\w+)", "', text, re.M))
    return names


def dashboard_series() -> set[str]:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    return {m for e in exprs for m in re.findall(r"\bfilefeed_\w+", e)}


def test_dashboard_queries_only_series_filefeed_exports() -> None:
    exported = exported_series()
    assert "filefeed_requests_total" in exported  # the declarations were found at all
    unknown = dashboard_series() - exported
    assert not unknown, f"dashboard panels query series /metrics does not have: {sorted(unknown)}"


def test_dashboard_shows_every_metric_family() -> None:
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported_series() if not n.endswith(("_sum", "_count"))}
    shown = {re.sub(r"_bucket$", "", n) for n in dashboard_series()}
    assert not families - shown, f"metrics without a panel: {sorted(families - shown)}"


def test_several_replicas_share_a_database_and_name_themselves() -> None:
    """Replicas with volumes of their own deliver once only through FILEFEED_DATABASE_URL (tests/shared), and each
    needs a stable replica id of its own: the pod name, which stays with its volume."""
    if kind("StatefulSet")["spec"]["replicas"] <= 1:
        return
    env = {e["name"]: e for e in container()["env"]}
    assert env["FILEFEED_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"], env  # a Secret, never a literal
    assert "value" not in env["FILEFEED_DATABASE_URL"]
    assert env["FILEFEED_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    from config.settings import ServiceSettings

    assert ServiceSettings.model_fields["replica_id"].metadata  # the pattern pod names satisfy
    import re as _re

    pattern = next(m.pattern for m in ServiceSettings.model_fields["replica_id"].metadata if hasattr(m, "pattern"))
    assert _re.fullmatch(pattern, "filefeed-2")
