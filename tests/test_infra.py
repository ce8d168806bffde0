"""The deployment files in infra/: they parse, agree with each other and with the project.

No Docker engine or Kubernetes cluster runs here, so the images are not built and nothing is applied;
what can be checked without them is: the Dockerfiles' COPY sources and version pins, the image names
the manifests use, the work pool's base job template as Prefect and prefect-kubernetes read it, and
(slow) a real Prefect server accepting the template as a kubernetes work pool.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import tomllib
import urllib.error
from pathlib import Path

import jsonschema
import pytest
import yaml
from jsonpatch import JsonPatch
from prefect.utilities.templating import apply_values, find_placeholders

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
TEMPLATE = INFRA / "k8s" / "base-job-template.json"
DOCKERFILES = {"cpu": INFRA / "Dockerfile.cpu", "cuda": INFRA / "Dockerfile.cuda"}
POOL = "unclip-k8s"
GPU = "nvidia.com/gpu"


# -- helpers -------------------------------------------------------------------------------------

def _template() -> dict:
    return json.loads(TEMPLATE.read_text())


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _arg_defaults(path: Path) -> dict[str, str]:
    return dict(rest.split("=", 1) for op, rest in _instructions(path) if op == "ARG" and "=" in rest)


def _documented_tag(path: Path) -> str:
    """The image name the Dockerfile's header tells `docker build -t` to give."""
    m = re.search(rf"docker build -f infra/{re.escape(path.name)} -t (\S+) \.", path.read_text())
    assert m, f"{path.name}: no `docker build -f infra/{path.name} -t NAME .` line in its header"
    return m.group(1)


def _is_image(ref: str, kind: str) -> bool:
    """Whether ``ref`` names the image Dockerfile.<kind> builds, in any registry."""
    name = _documented_tag(DOCKERFILES[kind])
    return ref == name or ref.endswith("/" + name)


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


def _pyproject_pins() -> dict[str, str]:
    return _pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def _requirements_pins() -> dict[str, str]:
    return _pins((INFRA / "requirements.txt").read_text().splitlines())


def _dockerignored(rel: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.strip().startswith("#")]
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        pat = pat.rstrip("/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pat):
                return True
            if pat.startswith("**/") and fnmatch.fnmatch(prefix.rsplit("/", 1)[-1], pat[3:]):
                return True
    return False


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _render(template: dict, values: dict) -> dict:
    """The job configuration a worker builds for a flow run: variable defaults, overridden by the
    deployment's job variables, applied to the template (as BaseJobConfiguration does)."""
    props = template["variables"]["properties"]
    variables = {k: v["default"] for k, v in props.items() if v.get("default") is not None}
    variables.update(values)
    return apply_values(copy.deepcopy(template["job_configuration"]), variables)


# What prefect-kubernetes' KubernetesWorkerJobConfiguration requires of a job manifest: these paths
# must exist and hold these values (it diffs the manifest against this and refuses the manifest when
# the diff adds or replaces anything).
_K8S_REQUIRED_MANIFEST = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {"annotations": {}, "labels": {}},
    "spec": {"template": {"spec": {"parallelism": 1, "completions": 1, "restartPolicy": "Never",
                                   "containers": [{"name": "prefect-job"}]}}},
}
_K8S_JOB_CONFIGURATION_KEYS = {"command", "env", "labels", "name", "namespace", "job_manifest", "cluster_config",
                               "job_watch_timeout_seconds", "pod_watch_timeout_seconds", "stream_output"}


# -- the work pool's base job template -------------------------------------------------------------

def test_template_placeholders_are_all_declared_and_used():
    t = _template()
    assert set(t) == {"job_configuration", "variables"}
    used = {p.name for p in find_placeholders(json.dumps(t["job_configuration"]))}
    declared = set(t["variables"]["properties"])
    assert used <= declared, f"undeclared: {sorted(used - declared)}"
    assert declared <= used, f"declared but never used: {sorted(declared - used)}"


def test_template_has_prefect_kubernetes_structure():
    t = _template()
    job = t["job_configuration"]
    assert _K8S_JOB_CONFIGURATION_KEYS <= set(job)
    for key in _K8S_JOB_CONFIGURATION_KEYS - {"job_manifest"}:
        assert job[key] == "{{ " + key + " }}"
    container = _containers(job["job_manifest"]["spec"]["template"])[0]
    assert container["name"] == "prefect-job"
    assert container["args"] == "{{ command }}" and container["env"] == "{{ env }}"
    assert container["image"] == "{{ image }}"
    assert t["variables"]["properties"]["cluster_config"]["allOf"] == [
        {"$ref": "#/definitions/KubernetesClusterConfig"}]
    assert "KubernetesClusterConfig" in t["variables"]["definitions"]


def test_template_requests_gpus():
    t = _template()
    container = _containers(t["job_configuration"]["job_manifest"]["spec"]["template"])[0]
    assert container["resources"]["limits"][GPU] == "{{ gpu_count }}"
    gpu = t["variables"]["properties"]["gpu_count"]
    assert gpu["type"] == "integer" and gpu["minimum"] == 0 and gpu["default"] >= 1
    tolerations = t["variables"]["properties"]["tolerations"]["default"]
    assert any(tol["key"] == GPU for tol in tolerations)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/dev/shm" in mounts  # NCCL and DataLoader workers need more than the default 64 MiB


@pytest.mark.parametrize("values", [
    {},
    {"image": "registry.example.com/unclip-pipeline:cpu", "gpu_count": 0, "tolerations": [], "cpu_limit": "8",
     "env": {"WORKDIR": "s3://bucket/run1"}, "service_account_name": "unclip-flows",
     "node_selector": {"pool": "gpu"}},
])
def test_template_renders_a_job_prefect_kubernetes_accepts(values):
    t = _template()
    schema = t["variables"]
    defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    jsonschema.validate({**defaults, **values}, schema)   # what the server checks of job variables
    job = _render(t, values)
    assert not find_placeholders(json.dumps(job)), "a placeholder was left unrendered"
    manifest = job["job_manifest"]
    for key in ("annotations", "labels"):  # the worker adds these when the template leaves them out
        manifest["metadata"].setdefault(key, {})
    patch = JsonPatch.from_diff(manifest, _K8S_REQUIRED_MANIFEST)
    assert [op for op in patch if op["op"] in ("add", "replace")] == []
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    expected = {**defaults, **values}
    assert container["resources"]["limits"][GPU] == expected["gpu_count"]
    assert container["image"] == expected["image"]
    assert pod["tolerations"] == expected["tolerations"]
    assert job["namespace"] == manifest["metadata"]["namespace"] == "unclip"
    if "cpu_limit" not in values:
        assert "cpu" not in container["resources"]["limits"]  # an unset variable drops its key
    if "service_account_name" in values:
        assert pod["serviceAccountName"] == values["service_account_name"]
    else:
        assert "serviceAccountName" not in pod


# -- images ----------------------------------------------------------------------------------------

def test_dockerfiles_document_their_image_names():
    assert {k: _documented_tag(p) for k, p in DOCKERFILES.items()} == {
        "cpu": "unclip-pipeline:cpu", "cuda": "unclip-pipeline:cuda"}


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_copy_sources_exist_and_reach_the_context(kind):
    copies = [rest.split() for op, rest in _instructions(DOCKERFILES[kind]) if op == "COPY"]
    sources = [src for args in copies if not any(a.startswith("--from") for a in args)
               for src in [a for a in args if not a.startswith("--")][:-1]]
    assert {"pyproject.toml", "README.md", "unclip", "infra/requirements.txt"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"{kind}: COPY {src}: not in the repository"
        assert not _dockerignored(src), f"{kind}: COPY {src}: excluded by .dockerignore"
    assert not _dockerignored("unclip/flows/data.py")
    assert _dockerignored(".venv") and _dockerignored("work/demo")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_torch_pins_match_pyproject(kind):
    pins, args = _pyproject_pins(), _arg_defaults(DOCKERFILES[kind])
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]
    wheel_flavour = args["TORCH_INDEX"].rstrip("/").rsplit("/", 1)[-1]
    assert (wheel_flavour == "cpu") == (kind == "cpu")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_steps(kind):
    path = DOCKERFILES[kind]
    ops = _instructions(path)
    text = " ".join(rest for _, rest in ops)
    froms = [rest for op, rest in ops if op == "FROM"]
    base = froms[-1].split()[0]
    if base.startswith("${"):
        base = _arg_defaults(path)[base[2:-1]]
    assert base.startswith("python:3.11-slim" if kind == "cpu" else "nvidia/cuda:")
    assert "-r infra/requirements.txt" in text
    assert "pip uninstall -y dataclasses" in text
    env = " ".join(rest for op, rest in ops if op == "ENV")
    for var in ("UNCLIP_REPO=/opt/unclip", "NO_ALBUMENTATIONS_UPDATE=1", "WANDB_MODE=disabled",
                "PREFECT_SERVER_ANALYTICS_ENABLED=false"):
        assert var in env
    assert ("WORKDIR", "/opt/unclip") in ops  # the pull step's $UNCLIP_REPO holds the source
    user = [rest for op, rest in ops if op == "USER"][-1]
    assert re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user), "numeric non-root USER (for runAsNonRoot)"
    assert "ENTRYPOINT" not in [op for op, _ in ops]  # the Kubernetes worker passes the command as args
    # the commit reaches the lineage through a build argument (the image copies no .git)
    assert ("ARG", "CODE_VERSION") in ops and "UNCLIP_CODE_VERSION=${CODE_VERSION}" in env


def test_an_images_code_version_is_its_build_argument(monkeypatch):
    from unclip import manifest

    code_version = manifest.code_version.__wrapped__  # uncached
    monkeypatch.setenv("UNCLIP_CODE_VERSION", "0123456789ab")
    assert code_version() == "0.1.0+g0123456789ab"
    monkeypatch.setenv("UNCLIP_CODE_VERSION", "")  # built without it: the checkout's commit, else the version
    assert code_version().startswith("0.1.0")


def test_cluster_versions_agree():
    req = _requirements_pins()
    prefect_version = yaml.safe_load((ROOT / "prefect.yaml").read_text())["prefect-version"]
    assert req["prefect"] == prefect_version
    ray_cluster = _yaml_docs(INFRA / "ray" / "raycluster.yaml")[0]
    assert ray_cluster["spec"]["rayVersion"] == req["ray"]
    assert {"prefect-kubernetes", "prefect-ray"} <= set(req)


# -- Kubernetes manifests -------------------------------------------------------------------------

def test_raycluster():
    (rc,) = _yaml_docs(INFRA / "ray" / "raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["metadata"]["namespace"] == _template()["variables"]["properties"]["namespace"]["default"]
    spec = rc["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (head_c,) = _containers(head["template"])
    assert _is_image(head_c["image"], "cpu")
    assert 10001 in {p["containerPort"] for p in head_c["ports"]}  # the ray:// client server
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for name, group in groups.items():
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"]  # autoscaled
        assert "rayStartParams" in group
        (c,) = _containers(group["template"])
        assert _is_image(c["image"], "cuda" if name == "gpu" else "cpu")
        for key in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][key])
        assert (GPU in c["resources"]["limits"]) == (name == "gpu")
        assert "/dev/shm" in {m["mountPath"] for m in c["volumeMounts"]}
    for c in [head_c] + [_containers(g["template"])[0] for g in groups.values()]:
        assert {"cpu", "memory"} <= set(c["resources"]["limits"])
    assert spec["enableInTreeAutoscaling"] is True
    # the address the README and the file's header give for orchestration.ray.address
    address = f"ray://{rc['metadata']['name']}-head-svc.{rc['metadata']['namespace']}.svc.cluster.local:10001"
    assert address in (INFRA / "ray" / "raycluster.yaml").read_text()
    assert address in (INFRA / "README.md").read_text()


def test_prefect_worker_manifest():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _yaml_docs(INFRA / "k8s" / "prefect-worker.yaml")}
    ns = _template()["variables"]["properties"]["namespace"]["default"]
    assert ("Namespace", ns) in docs
    assert all(d["metadata"].get("namespace") == ns for (kind, _), d in docs.items() if kind != "Namespace")
    dep = docs[("Deployment", "prefect-worker")]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert _is_image(c["image"], "cpu")
    cmd = " ".join(c["command"])
    assert f"prefect worker start --pool {POOL} --type kubernetes" in cmd
    sa = pod["serviceAccountName"]
    assert ("ServiceAccount", sa) in docs
    binding = next(d for (kind, _), d in docs.items() if kind == "RoleBinding")
    assert {"kind": "ServiceAccount", "name": sa, "namespace": ns} in binding["subjects"]
    role = docs[("Role", binding["roleRef"]["name"])]
    job_rules = [r for r in role["rules"] if "jobs" in r["resources"] and "batch" in r["apiGroups"]]
    assert job_rules and {"create", "get", "list", "watch", "delete"} <= set(job_rules[0]["verbs"])
    cm_names = [e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e]
    assert any("PREFECT_API_URL" in docs[("ConfigMap", n)]["data"] for n in cm_names)
    env = {e["name"]: e for e in c["env"]}
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"]["value"] == ns


def test_template_image_default_is_a_project_image():
    props = _template()["variables"]["properties"]
    assert _is_image(props["image"]["default"], "cuda")
    assert all(_is_image(e, "cpu") or _is_image(e, "cuda") for e in props["image"].get("examples", []))


def test_readme_deployment_example_fits_the_template():
    blocks = re.findall(r"```yaml\n(.*?)```", (INFRA / "README.md").read_text(), re.S)
    example = next(yaml.safe_load(b) for b in blocks if "work_pools" in b)
    schema = _template()["variables"]
    pools = example["definitions"]["work_pools"].values()
    assert pools
    for pool in pools:
        assert pool["name"] == POOL
        jsonschema.validate(pool["job_variables"], schema)
        image = pool["job_variables"]["image"]
        assert _is_image(image, "cpu") or _is_image(image, "cuda")


# -- a real Prefect server -------------------------------------------------------------------------

@pytest.mark.slow
def test_server_accepts_the_template_as_a_kubernetes_pool(tmp_path):
    from unclip.prefect_server import PrefectServer

    template = _template()
    with PrefectServer(tmp_path / "prefect") as server:
        created = server.post("/work_pools/", {"name": "unclip-k8s-rest", "type": "kubernetes",
                                               "base_job_template": template})
        assert created["type"] == "kubernetes"
        assert server.get("/work_pools/unclip-k8s-rest")["base_job_template"] == template

        # the command infra/README.md gives
        server.cli("work-pool", "create", POOL, "--type", "kubernetes",
                   "--base-job-template", str(TEMPLATE))
        assert server.get(f"/work_pools/{POOL}")["base_job_template"] == template

        # deployments' job variables are checked against the template's schema
        flow = server.post("/flows/", {"name": "infra-test"})
        ok = server.post("/deployments/", {"name": "gpu", "flow_id": flow["id"], "work_pool_name": POOL,
                                           "job_variables": {"gpu_count": 8, "shm_size": "64Gi"}})
        assert ok["job_variables"]["gpu_count"] == 8
        with pytest.raises(urllib.error.HTTPError) as err:
            server.post("/deployments/", {"name": "bad", "flow_id": flow["id"], "work_pool_name": POOL,
                                          "job_variables": {"gpu_count": -1}})
        assert err.value.code == 422

        # and a template with an undeclared variable is refused, so the acceptance above means something
        broken = copy.deepcopy(template)
        broken["job_configuration"]["job_manifest"]["spec"]["activeDeadlineSeconds"] = "{{ deadline }}"
        with pytest.raises(urllib.error.HTTPError) as err:
            server.post("/work_pools/", {"name": "broken", "type": "kubernetes", "base_job_template": broken})
        assert err.value.code == 422
