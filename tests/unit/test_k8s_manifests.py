"""launch/k8s/: both manifests checked against the published schemas, strictly (an unknown field is an
error, as with `kubectl apply --validate=strict`), and for the settings recovery depends on.

The core API (Job, Service, PVC, pod templates) is checked with kubernetes-validate's schemas for
K8S_VERSION; the PyTorchJob with the Kubeflow training operator's CRD, pinned (tests/k8s/README.md).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from conftest import REPO

yaml = pytest.importorskip("yaml", reason="PyYAML not installed: `pip install pyyaml`")
kv = pytest.importorskip("kubernetes_validate", reason="`pip install kubernetes-validate` (dev extra)")
jsonschema = pytest.importorskip("jsonschema", reason="`pip install jsonschema` (dev extra)")

K8S = REPO / "launch" / "k8s"
CRD = REPO / "tests" / "k8s" / "kubeflow.org_pytorchjobs.yaml"
K8S_VERSION = "1.31.0"  # podFailurePolicy and podReplacementPolicy on by default from here


def docs(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def strict(schema: object) -> object:
    """The CRD's schema with unknown fields rejected where it lists the known ones."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        known = "properties" in schema and "additionalProperties" not in schema
        if known and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def pytorchjob_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(version["schema"]["openAPIV3Schema"])


def validate_pytorchjob(job: dict, schema: dict) -> None:
    jsonschema.Draft7Validator(schema).validate(job)
    for replica in job["spec"]["pytorchReplicaSpecs"].values():  # and its pods as the core API has them
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                     "template": replica["template"]}, K8S_VERSION, strict=True)  # fmt: skip


def test_batch_job_manifest_is_valid_core_api() -> None:
    found = docs(K8S / "job.yaml")
    assert set(found) == {"Service", "Job", "PersistentVolumeClaim", "NetworkPolicy"}
    for doc in found.values():
        kv.validate(doc, K8S_VERSION, strict=True)


def test_pytorchjob_manifest_is_valid_against_the_operators_crd(pytorchjob_schema: dict) -> None:
    found = docs(K8S / "pytorchjob.yaml")
    assert set(found) == {"PyTorchJob", "PersistentVolumeClaim", "NetworkPolicy"}
    assert found["PyTorchJob"]["apiVersion"] == "kubeflow.org/v1"
    validate_pytorchjob(found["PyTorchJob"], pytorchjob_schema)
    kv.validate(found["PersistentVolumeClaim"], K8S_VERSION, strict=True)
    kv.validate(found["NetworkPolicy"], K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("manifest", "label"),
    [("job.yaml", "batch.kubernetes.io/job-name"), ("pytorchjob.yaml", "training.kubeflow.org/job-name")],
)
def test_only_the_jobs_own_pods_reach_its_pods_and_its_keys_are_signed(manifest: str, label: str) -> None:
    """The NetworkPolicy selects the job's pods (by the label the Job controller / the operator puts
    on them) and admits ingress from those pods alone; every pod gets the job's secret."""
    found = docs(K8S / manifest)
    job = found.get("Job") or found["PyTorchJob"]
    name = job["metadata"]["name"]
    policy = found["NetworkPolicy"]["spec"]
    assert policy["podSelector"] == {"matchLabels": {label: name}} and policy["policyTypes"] == ["Ingress"]
    assert policy["ingress"] == [{"from": [{"podSelector": {"matchLabels": {label: name}}}]}]
    template = (
        job["spec"]["template"]
        if "template" in job["spec"]
        else job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    )
    (container,) = template["spec"]["containers"]
    (secret,) = [e for e in container["env"] if e["name"] == "FTJOB_JOB_SECRET"]
    assert secret["valueFrom"]["secretKeyRef"]["optional"] is True


def test_the_validation_catches_mistakes(pytorchjob_schema: dict) -> None:
    job = docs(K8S / "pytorchjob.yaml")["PyTorchJob"]
    for path, value in (
        (["spec", "elasticPolicy", "maxReplica"], 2),  # a typo
        (["spec", "elasticPolicy", "minReplicas"], "one"),  # a wrong type
        (["spec", "pytorchReplicaSpecs", "Worker", "template", "spec", "containers", 0, "envv"], []),
    ):
        broken = copy.deepcopy(job)
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises((jsonschema.ValidationError, kv.ValidationError)):
            validate_pytorchjob(broken, pytorchjob_schema)
    batch = docs(K8S / "job.yaml")["Job"]
    batch["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(batch, K8S_VERSION, strict=True)


def test_pytorchjob_recovery_settings() -> None:
    job = docs(K8S / "pytorchjob.yaml")["PyTorchJob"]
    spec, elastic = job["spec"], job["spec"]["elasticPolicy"]
    assert set(spec["pytorchReplicaSpecs"]) == {"Worker"}  # elastic: workers only, worker 0 hosts c10d
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert worker["restartPolicy"] == "ExitCode"  # 1-127 fail the job, 128-255 restart the pod
    assert elastic["rdzvBackend"] in ("c10d", "etcd-v2")
    assert elastic["minReplicas"] < worker["replicas"] <= elastic["maxReplicas"]  # survives a pod's loss
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch"
    assert "command" not in container and container["args"][0] == "--"  # the image's ftjob; job options
    assert any(p["name"] == "pytorchjob-port" for p in container["ports"])
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert not [k for k in env if k.startswith("PET_")], "the operator sets PET_* from elasticPolicy"
    assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) + 10 <= pod["terminationGracePeriodSeconds"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    (shm,) = [v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"]]
    assert shm["emptyDir"]["medium"] == "Memory"  # the node-local tier and torch's shared memory
    assert "--run-dir" in container["args"] and "--ckpt.local-interval" in container["args"]
