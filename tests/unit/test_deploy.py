"""deploy/ and docker/: the Grafana dashboard names only metrics asyncrl exports; the YAML
passes yamllint; the KubeRay manifests have the fields asyncrl relies on; the Dockerfiles pass
hadolint. (The real KubeRay CRD schema and container registries are not reachable offline, so
the manifests are checked against the subset of ray.io/v1 written below, and images are not
built here.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from asyncrl.metrics.names import RunMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY, DOCKER = ROOT / "deploy", ROOT / "docker"


def _exported_names() -> set[str]:
    """Every sample name RunMetrics exposes: counters get _total, histograms _bucket/_sum/
    _count, as Prometheus writes them."""
    names = set()
    for family in RunMetrics().registry.collect():
        names |= {sample.name for sample in family.samples}
        names.add(family.name)
    return names


def test_every_dashboard_query_names_metrics_that_exist():
    dashboard = json.loads((DEPLOY / "grafana" / "asyncrl-dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exported = _exported_names()
    used = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= set(re.findall(r"\basyncrl_[a-z_]+", target["expr"]))
    assert used and not used - exported, sorted(used - exported)
    for family in ("asyncrl_pool_busy_fraction", "asyncrl_sample_staleness_versions_bucket",
                   "asyncrl_rollout_generated_tokens_total"):
        assert family in used


def test_yaml_under_deploy_passes_yamllint():
    proc = subprocess.run([sys.executable, "-m", "yamllint", "-s", "-c",
                           str(DEPLOY / ".yamllint"), str(DEPLOY)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


_POD = {"type": "object", "required": ["spec"], "properties": {"spec": {
    "type": "object", "required": ["containers"], "properties": {"containers": {
        "type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "image", "resources"]}}}}}}
_GROUP = {"type": "object",
          "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams",
                       "template"],
          "properties": {"rayStartParams": {"type": "object", "required": ["resources"]},
                         "template": _POD}}
_CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec", "workerGroupSpecs"],
                 "properties": {"headGroupSpec": {"type": "object",
                                                  "required": ["rayStartParams", "template"],
                                                  "properties": {"template": _POD}},
                                "workerGroupSpecs": {"type": "array", "minItems": 2,
                                                     "items": _GROUP}}}
SCHEMAS = {
    "RayCluster": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
                   "properties": {"apiVersion": {"const": "ray.io/v1"}, "spec": _CLUSTER_SPEC}},
    "RayJob": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
               "properties": {"apiVersion": {"const": "ray.io/v1"}, "spec": {
                   "type": "object", "required": ["entrypoint", "rayClusterSpec"],
                   "properties": {"entrypoint": {"type": "string", "pattern": "^asyncrl train"},
                                  "rayClusterSpec": _CLUSTER_SPEC}}}},
}


def test_kuberay_manifests_have_separate_pools_with_their_own_resources(tmp_path):
    docs = [d for f in sorted((DEPLOY / "kuberay").glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text())]
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "RayJob", "ConfigMap"} <= kinds
    for doc in docs:
        if doc["kind"] not in SCHEMAS:
            continue
        jsonschema.validate(doc, SCHEMAS[doc["kind"]])
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        groups = {g["groupName"]: json.loads(json.loads(g["rayStartParams"]["resources"]))
                  for g in spec["workerGroupSpecs"]}
        assert {"rollout", "trainer", "reward"} <= set(groups)
        assert all(name in res for name, res in groups.items())  # each offers its own resource
    job_config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["job.yaml"]
    from asyncrl.config import load_config

    path = tmp_path / "job.yaml"
    path.write_text(job_config)
    config = load_config(path, [])  # the shipped job config is a valid asyncrl config
    assert config.rollout.worker_resources == {"rollout": 1}


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_dockerfiles_pass_hadolint():
    files = sorted(DOCKER.glob("Dockerfile.*"))
    assert {f.name for f in files} == {"Dockerfile.cpu", "Dockerfile.gpu"}
    proc = subprocess.run(["hadolint", *map(str, files)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_cpu_image_pins_every_package_it_installs():
    """Dockerfile.cpu installs `.[rewards]` under docker/constraints-cpu.txt: each direct
    dependency (and, through the freeze, each transitive one) has an exact version there."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["rewards"]]
    names = {re.split(r"[\[<>=!~ ;]", req, maxsplit=1)[0].lower().replace("_", "-")
             for req in wanted} - {"torch"}  # torch: pinned in the Dockerfile (CPU index)
    lines = (DOCKER / "constraints-cpu.txt").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))
    pinned = {name.lower().replace("_", "-") for name in pins}
    assert names <= pinned, names - pinned
    assert "-c /tmp/constraints.txt" in (DOCKER / "Dockerfile.cpu").read_text()
