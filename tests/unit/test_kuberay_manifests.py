"""cluster/kuberay/: the RayService and RayJob against KubeRay v1.7.0's CRD schemas (offline, with the rules KubeRay
checks in code), the Serve config they embed against Ray's own schema, the cluster-launcher YAML against Ray's."""

from __future__ import annotations

import copy
import gzip
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from cluster.config import FleetSettings
from cluster.serve_config import IMPORT_PATH, render_serve_config

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"
CRDS = ROOT / "tests" / "data" / "kuberay-v1.7.0"
# Rules KubeRay applies in its Go code (ray-operator/controllers/ray/utils/validation.go), not in the schema.
UPGRADE_TYPES = {"NewCluster", "None", "NewClusterWithIncrementalUpgrade"}


def _schema(kind: str) -> dict:
    doc = yaml.safe_load(gzip.decompress((CRDS / f"ray.io_{kind}.yaml.gz").read_bytes()))
    version, = [v for v in doc["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]


def _errors(manifest: dict, kind: str) -> list[str]:
    validator = jsonschema.Draft7Validator(_schema(kind))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def _load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def _image_tag() -> str:
    """The tag the Dockerfile's build line gives the image."""
    match = re.search(r"docker build -f cluster/kuberay/Dockerfile -t (\S+) \.", (KUBERAY / "Dockerfile").read_text())
    assert match, "the Dockerfile says how it is built and tagged"
    return match.group(1)


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _ray_pin() -> str:
    return re.search(r"ray\[[a-z,]+\]==([\d.]+)", (ROOT / "pyproject.toml").read_text()).group(1)


def test_the_rayservice_passes_the_crd_schema_and_kuberays_own_rules():
    service = _load("rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert _errors(service, "rayservices") == []
    assert service["spec"]["upgradeStrategy"]["type"] in UPGRADE_TYPES - {"None"}  # an upgrade without downtime
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == _ray_pin()
    assert {c["image"] for c in _containers(cluster)} == {_image_tag()}
    # and the schema has teeth: a wrong type somewhere is an error
    broken = copy.deepcopy(service)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert _errors(broken, "rayservices")


def test_the_embedded_serve_config_is_fleets_own_render_and_serves_on_the_port_kuberay_probes():
    text = _load("rayservice.yaml")["spec"]["serveConfigV2"]
    doc = yaml.safe_load(text)
    ServeDeploySchema.model_validate(doc)
    app, = doc["applications"]
    assert app["import_path"] == IMPORT_PATH
    settings = FleetSettings(**app["args"])
    assert doc == render_serve_config(settings)  # exactly what `fleet render serve-config` writes for them
    # KubeRay routes to a pod once GET :8000/-/healthz answers "success": fleet's listeners on every address there.
    assert (settings.host, settings.port, settings.http_server) == ("0.0.0.0", 8000, "fleet")
    assert doc["proxy_location"] == "Disabled"
    # the repository and the data folder on the volume every pod mounts
    mounts = {m["mountPath"] for c in _containers(_load("rayservice.yaml")["spec"]["rayClusterConfig"])
              for m in c["volumeMounts"]}
    assert mounts == {"/var/lib/fleet"}
    assert settings.repository.startswith("/var/lib/fleet/") and settings.data_dir.startswith("/var/lib/fleet/")


def test_the_rayjob_retrains_into_the_repository_the_service_serves():
    job = _load("rayjob.yaml")
    assert job["kind"] == "RayJob" and _errors(job, "rayjobs") == []
    spec = job["spec"]
    # KubeRay's rule outside the schema: a TTL needs the cluster shut down after the job.
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["shutdownAfterJobFinishes"] is True
    assert spec["entrypoint"].startswith("python -m training.retrain --model ")
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    served = FleetSettings(**yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])
                           ["applications"][0]["args"])
    assert env["FLEET_REPOSITORY"] == served.repository and env["FLEET_DATA_DIR"] == served.data_dir
    assert spec["rayClusterSpec"]["rayVersion"] == _ray_pin()
    assert {c["image"] for c in _containers(spec["rayClusterSpec"])} == {_image_tag()}
    broken = copy.deepcopy(job)
    broken["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert _errors(broken, "rayjobs")


def test_the_cluster_launcher_yaml_passes_rays_own_check_as_ray_up_runs_it():
    config = _load("ray-cluster-launcher.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does before it starts anything
    assert any("torch==2.13.0" in c for c in config["setup_commands"])
    for field, value in (("idle_timeout_minutes", "five"), ("no_such_field", 1)):  # the check has teeth
        broken = copy.deepcopy(config)
        broken[field] = value
        with pytest.raises(jsonschema.ValidationError):
            validate_config(prepare_config(broken))


def test_the_image_copies_every_package_fleet_installs_and_the_pinned_torch():
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    packages = re.search(r'wheel\.packages = \[([^\]]*)\]', (ROOT / "pyproject.toml").read_text()).group(1)
    for package in re.findall(r'"([^"]+)"', packages):
        assert f"COPY --chown=ray:ray {package} /home/ray/fleet/{package}\n" in dockerfile, package
    assert "torch==2.13.0" in dockerfile and "pip install --no-cache-dir /home/ray/fleet" in dockerfile
