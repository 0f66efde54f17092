"""launch/k8s/: every manifest, rendered as Kubernetes would read it, against the launcher's
own parser (every flag a container passes to ``engine.launch``) and the metric names
``engine.frontend.metrics`` exports (every name a manifest mentions, and every series the
autoscaler's adapter rules query), and against each other (selectors, ports, references)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engine.cli import config_from_args
from engine.frontend.metrics import EngineMetrics
from engine.messages import PoolStats

K8S = Path(__file__).resolve().parents[1] / "launch" / "k8s"
GIE = "inference.networking.k8s.io"


def manifests() -> dict[str, list[dict[str, Any]]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(K8S.glob("*.yaml"))}


def objects(kind: str) -> list[dict[str, Any]]:
    return [d for docs in manifests().values() for d in docs if d["kind"] == kind]


def exported_metric_names() -> set[str]:
    """Family and sample names of a frontend's /metrics with one pool that has reported."""
    metrics = EngineMetrics()
    pool = SimpleNamespace(stats=PoolStats(live_workers=1, worker_ids=[0], kv_usage=[0.1],
                                           num_waiting_per_worker=[0], block_size=16,
                                           num_blocks=[8]), stats_listeners=[])
    metrics.add_pool("m", pool)  # type: ignore[arg-type]
    names = set()
    for fam in text_string_to_metric_families(metrics.render().decode()):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
    return names


def launcher_config(container: dict[str, Any], tmp_path: Path) -> Any:
    """The container's flags through the launcher's own parser (a flag it lacks exits 2);
    in-cluster paths become local stand-ins."""
    from engine.models.default import default_model_dir

    assert container["command"] == ["python", "-m", "engine.launch"]
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    args = [str(default_model_dir()) if a == "/models/model" else
            str(keys) if a == "/etc/engine/keys" else a for a in container["args"]]
    return config_from_args(args)


def engine_deployment() -> dict[str, Any]:
    (deploy,) = [d for d in objects("Deployment") if d["metadata"]["name"] == "engine"]
    return deploy


def test_every_manifest_is_well_formed() -> None:
    found = manifests()
    assert {"engine.yaml", "inference-pool.yaml", "autoscaling.yaml"} <= set(found)
    for name, docs in found.items():
        assert docs, name
        for d in docs:
            assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), name


def test_every_engine_container_passes_only_flags_the_launcher_accepts(tmp_path: Path) -> None:
    containers = [c for d in objects("Deployment")
                  for c in d["spec"]["template"]["spec"]["containers"]
                  if c.get("command", [])[-1:] == ["engine.launch"]]
    assert containers
    for c in containers:
        launcher_config(c, tmp_path)


def test_engine_deployment_ports_probes_and_scrape_annotations(tmp_path: Path) -> None:
    """engine.yaml's probes and scrape annotations point at the HTTP port it configures."""
    pod = engine_deployment()["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    cfg = launcher_config(container, tmp_path)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": cfg.frontend.http_port, "grpc": cfg.frontend.grpc_port}
    assert cfg.frontend.host == "0.0.0.0"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    notes = pod["metadata"]["annotations"]
    assert (notes["prometheus.io/path"], int(notes["prometheus.io/port"])) == \
        ("/metrics", cfg.frontend.http_port)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == cfg.worker.num_workers


def test_inference_pool_selects_the_engine_pods_on_their_http_port(tmp_path: Path) -> None:
    deploy = engine_deployment()
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    cfg = launcher_config(container, tmp_path)
    (pool,) = objects("InferencePool")
    assert pool["apiVersion"] == f"{GIE}/v1"
    spec = pool["spec"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert spec["targetPorts"] == [{"number": cfg.frontend.http_port}]
    epp = spec["endpointPickerRef"]
    assert epp["name"] and 1 <= epp["port"]["number"] <= 65535
    assert epp.get("failureMode", "FailClose") in ("FailOpen", "FailClose")
    name = pool["metadata"]["name"]
    objectives = objects("InferenceObjective")
    assert objectives
    for o in objectives:
        assert o["apiVersion"] == "inference.networking.x-k8s.io/v1alpha2"
        assert isinstance(o["spec"]["priority"], int)
        assert o["spec"]["poolRef"] == {"group": GIE, "kind": "InferencePool", "name": name}
    (route,) = objects("HTTPRoute")
    refs = [b for r in route["spec"]["rules"] for b in r["backendRefs"]]
    assert refs == [{"group": GIE, "kind": "InferencePool", "name": name}]


def test_autoscaler_reads_metrics_the_engine_exports() -> None:
    exported = exported_metric_names()
    (hpa,) = objects("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", engine_deployment()["metadata"]["name"])
    (rules_cm,) = [c for c in objects("ConfigMap") if c["metadata"]["name"] == "engine-adapter-rules"]
    rules = yaml.safe_load(rules_cm["data"]["values.yaml"])["rules"]["custom"]
    served = {}  # adapter name -> the engine's metric it reads
    for rule in rules:
        series = re.match(r"[\w:]+", rule["seriesQuery"]).group(0)  # type: ignore[union-attr]
        assert series in exported, series
        assert re.fullmatch(rule["name"]["matches"], series)
        served[rule["name"]["as"]] = series
    read = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in hpa["spec"]["metrics"]}
    assert set(read) <= set(served)
    # Queue depth and KV usage, as the issue asks.
    assert {served[n] for n in read} == {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"}
    kv = next(t for n, t in read.items() if served[n] == "vllm:kv_cache_usage_perc")
    assert kv["averageValue"].endswith("m") and 0 < int(kv["averageValue"][:-1]) < 1000  # 0..1


@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml")))
def test_every_metric_a_manifest_names_is_exported(name: str) -> None:
    exported = exported_metric_names()
    text = "\n".join(line for line in (K8S / name).read_text().splitlines()
                     if not line.strip().startswith("image:"))  # engine:latest is an image
    mentioned = set(re.findall(r"\b(?:vllm|engine):[a-z_]+", text))
    assert mentioned - exported == set()
