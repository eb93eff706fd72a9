"""The deployment files under cluster/: schemas, what KubeRay needs, references that resolve.

Fast checks parse every file and hold it to the rules it must follow: the launcher YAML to
the JSON schema shipped inside the ray package, the Kubernetes manifests to what KubeRay
and batch/v1 need, every `python jobs/X.py configs/Y.yaml key=value ...` to files that
exist and overrides that the job's typed config accepts, every runtime_env `pip` list to
pyproject.toml. Each checker is also run on a deliberately broken copy, so a checker that
checks nothing fails. The reindex CronJob's script runs here against a stub `ray` CLI that
answers like Ray 2.60's job server. The `cluster` test starts a real two-node Ray with
cluster/local_multinode.sh, submits the demo's score_matrix to it, and sends its own requests
to the head's job API while it runs: HTTP 401 without a token, 403 with a wrong one, 200 with
the cluster's.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
AWS = CLUSTER / "aws.yaml"
RAYCLUSTER = KUBERAY / "raycluster.yaml"
RAYJOB = KUBERAY / "rayjob-score-matrix.yaml"
CRONJOB = KUBERAY / "reindex-cronjob.yaml"
RUNTIME_ENV = KUBERAY / "runtime_env.yaml"
LOCAL = CLUSTER / "local_multinode.sh"
OPERATIONS = ROOT / "docs" / "operations.md"

# `python jobs/NAME.py configs/NAME.yaml` wherever it is written (YAML, shell, Markdown)
ENTRYPOINT_RE = re.compile(r"python (jobs/[\w./-]+\.py) (configs/[\w./-]+\.yaml)")


def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def only(path: Path, kind: str) -> dict:
    docs = [d for d in load_docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path}: expected one {kind}, found {len(docs)}"
    return docs[0]


# --------------------------------------------------------------------------------------
# Checkers (each raises AssertionError naming what is wrong)
# --------------------------------------------------------------------------------------


def ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def pyproject_deps_without_ray() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {d.replace(" ", "") for d in deps if not re.match(r"ray\b", d)}


def pyproject_ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if re.match(r"ray\b", d)]
    return re.sub(r"^ray(\[[^]]*\])?", "", pin)


def check_ray_image(image: str) -> None:
    """A rayproject/ray image whose Ray version the project's pin accepts."""
    from packaging.specifiers import SpecifierSet

    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)(-gpu|-cpu|-cu\d+)?", image)
    assert m, f"{image!r} is not a rayproject/ray:X.Y.Z-pyNNN[-gpu] image"
    assert m.group(1) in SpecifierSet(pyproject_ray_pin()), (
        f"{image}: Ray {m.group(1)} is outside the project's pin ray{pyproject_ray_pin()}"
    )
    assert (m.group(2), m.group(3)) == ("3", "11"), f"{image}: the project is built for py311"


def job_config_class(script: Path) -> type:
    """The typed config a job script hands to run_job (read from its source, not run)."""
    tree = ast.parse(script.read_text())
    imported = {
        alias.asname or alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "run_job"
            and node.args
            and isinstance(node.args[0], ast.Name)
        ):
            name = node.args[0].id
            return getattr(importlib.import_module(imported[name]), name)
    raise AssertionError(f"{script}: no run_job(ConfigClass, ...) call")


def check_entrypoint(cmd: str, validate_overrides: bool = True) -> None:
    """`python jobs/X.py configs/Y.yaml [k=v ...]`: files exist; overrides load."""
    from aacray.config import load_config

    argv = shlex.split(cmd)
    assert argv[:1] == ["python"] and len(argv) >= 3, f"not `python SCRIPT CONFIG ...`: {cmd!r}"
    script, config, overrides = ROOT / argv[1], argv[2], argv[3:]
    assert argv[1].startswith("jobs/") and script.is_file(), f"{argv[1]} does not exist"
    assert config.startswith("configs/") and (ROOT / config).is_file(), f"{config} does not exist"
    assert all("=" in o for o in overrides), f"overrides must be key=value: {overrides}"
    if validate_overrides:
        load_config(job_config_class(script), [str(ROOT / config), *overrides])


def check_runtime_env(env: dict, remote_working_dir: bool) -> None:
    """A runtime_env Ray accepts, with the project's dependencies and no Ray in pip."""
    from ray.runtime_env import RuntimeEnv

    known = {"working_dir", "pip", "env_vars", "excludes", "py_modules", "config"}
    assert set(env) <= known, f"unknown runtime_env keys {sorted(set(env) - known)}"
    RuntimeEnv(**env)  # Ray's own validation: pip fields, env_vars types, URI suffixes
    wd = env.get("working_dir")
    if remote_working_dir:
        assert isinstance(wd, str) and re.match(r"(s3|gs|https?)://.+\.zip$", wd), (
            f"working_dir must be a remote .zip URI the cluster can fetch, got {wd!r}"
        )
    pip = env.get("pip")
    packages = pip["packages"] if isinstance(pip, dict) else pip
    assert packages, "runtime_env has no pip packages: the stock Ray image lacks the project's deps"
    got = {p.replace(" ", "") for p in packages}
    assert not any(re.match(r"ray\b", p) for p in got), "never reinstall Ray inside a runtime_env"
    want = pyproject_deps_without_ray()
    assert got == want, f"pip differs from pyproject.toml: missing {want - got}, extra {got - want}"
    for k, v in (env.get("env_vars") or {}).items():
        assert isinstance(v, str), f"env_vars[{k}] must be a string"


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    """What KubeRay needs of a RayCluster spec, plus this project's own rules."""
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth must be on"
    head = spec.get("headGroupSpec")
    assert isinstance(head, dict), f"{where}: no headGroupSpec"
    groups = [("head", head)]
    workers = spec.get("workerGroupSpecs")
    assert isinstance(workers, list) and workers, f"{where}: no workerGroupSpecs"
    n_gpu_groups = 0
    for w in workers:
        name = w.get("groupName")
        assert isinstance(name, str) and name, f"{where}: a worker group has no groupName"
        for k in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(w.get(k), int) and w[k] >= 0, f"{where}/{name}: {k} must be an int >= 0"
        assert w["minReplicas"] <= w["replicas"] <= w["maxReplicas"], (
            f"{where}/{name}: need minReplicas <= replicas <= maxReplicas"
        )
        groups.append((name, w))
    for name, g in groups:
        params = g.get("rayStartParams")
        assert isinstance(params, dict), f"{where}/{name}: rayStartParams is required (may be {{}})"
        for k, v in params.items():
            assert isinstance(v, str), f"{where}/{name}: rayStartParams.{k} must be a string"
        containers = g.get("template", {}).get("spec", {}).get("containers")
        assert isinstance(containers, list) and containers, f"{where}/{name}: no containers"
        ray_c = containers[0]
        assert ray_c.get("name") and ray_c.get("image"), f"{where}/{name}: container needs name, image"
        check_ray_image(ray_c["image"])
        assert spec.get("rayVersion") == ray_c["image"].split(":")[1].split("-")[0], (
            f"{where}: rayVersion {spec.get('rayVersion')} differs from the image {ray_c['image']}"
        )
        limits = ray_c.get("resources", {}).get("limits", {})
        gpus = int(limits.get("nvidia.com/gpu", 0))
        if name == "head":
            assert gpus == 0, f"{where}: the head should not take a GPU"
            ports = {p.get("containerPort") for p in ray_c.get("ports", [])}
            assert 8265 in ports, f"{where}: the head must expose the dashboard / job server (8265)"
        else:
            requests = ray_c.get("resources", {}).get("requests", {})
            assert gpus >= 1, f"{where}/{name}: no nvidia.com/gpu limit"
            assert int(requests.get("nvidia.com/gpu", gpus)) == gpus, (
                f"{where}/{name}: GPU request and limit differ"
            )
            n_gpu_groups += 1
    assert n_gpu_groups, f"{where}: no GPU worker group"


def cron_script(cron: dict) -> str:
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    cmd = container["command"]
    assert cmd[:2] == ["/bin/bash", "-c"] and len(cmd) == 3, f"command: {cmd}"
    return cmd[2]


def cron_env(cron: dict) -> dict:
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container.get("env", [])}


CRON_FIELD = r"(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*"


def check_cronjob(cron: dict, raycluster: dict) -> None:
    assert cron.get("apiVersion") == "batch/v1" and cron.get("kind") == "CronJob"
    fields = cron["spec"]["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(CRON_FIELD, f) for f in fields), (
        f"schedule {cron['spec']['schedule']!r} is not a 5-field cron expression"
    )
    assert cron["spec"].get("concurrencyPolicy") == "Forbid", "overlapping triggers must not race"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod.get("restartPolicy") in ("Never", "OnFailure"), "a Job pod needs Never/OnFailure"
    check_ray_image(pod["containers"][0]["image"])
    script = cron_script(cron)
    assert "ray job submit" in script and '--submission-id "$ID"' in script
    m = re.search(r"-- (python jobs/\S+ configs/\S+)", script)
    assert m, "the CronJob must submit `python jobs/... configs/...`"
    env = cron_env(cron)
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] == raycluster["spec"]["authOptions"]["secretName"], (
        "the CronJob must read the RayCluster's token Secret"
    )
    assert secret["key"] == "auth_token", "KubeRay's token Secret keeps the token under auth_token"
    head_svc = f"http://{raycluster['metadata']['name']}-head-svc:8265"
    assert env["RAY_ADDRESS"]["value"] == head_svc, f"RAY_ADDRESS must be {head_svc}"
    check_runtime_env(json.loads(env["RUNTIME_ENV_JSON"]["value"]), remote_working_dir=True)
    # last: the job's files must exist, and the overrides fit its config
    check_entrypoint(f"{m.group(1)} {env['REINDEX_ARGS']['value']}")


# --------------------------------------------------------------------------------------
# The launcher YAML
# --------------------------------------------------------------------------------------


def test_aws_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(AWS.read_text())
    jsonschema.validate(cfg, ray_schema())
    # and what `ray up` does before launching anything: fill defaults, validate again
    validate_config(prepare_config(cfg))


def _set(d: dict, path: str, value) -> dict:
    d = copy.deepcopy(d)
    *parents, last = path.split("/")
    node = d
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return d


@pytest.mark.parametrize(
    "path, value",
    [
        ("available_node_types/gpu.g5/resources", {"CPU": 4, "GPU": 0.5}),  # not an integer
        ("available_node_types/gpu.g5/min_workers", "0"),  # a string
        ("available_node_types/gpu.g5/node_config", KeyError),  # required
        ("docker/imagee", "rayproject/ray:2.60.0-py311-gpu"),  # unknown key
        ("setup_comands", ["pip install -e ."]),  # misspelt top-level key
        ("provider", KeyError),  # required
    ],
)
def test_a_broken_aws_yaml_fails_the_schema(path, value):
    broken = _set(yaml.safe_load(AWS.read_text()), path, value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())


def test_aws_yaml_has_cpu_head_gpu_workers_and_installs_the_project():
    cfg = yaml.safe_load(AWS.read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = {k: t for k, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for name, t in gpu_types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
    check_ray_image(cfg["docker"]["image"])
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"], "token auth must be on"
    # the repository is mounted and installed editable (its pins come from pyproject.toml)
    repo_mounts = [remote for remote, local in cfg["file_mounts"].items() if local == "."]
    assert len(repo_mounts) == 1, "mount the repository (local '.') once"
    assert f"pip install --no-cache-dir -e {repo_mounts[0]}" in cfg["setup_commands"]
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", (
        "every node needs the submitters' token at Ray's default path"
    )


# --------------------------------------------------------------------------------------
# KubeRay manifests and runtime envs
# --------------------------------------------------------------------------------------


def test_raycluster_is_what_kuberay_needs():
    rc = only(RAYCLUSTER, "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    check_ray_cluster_spec(rc["spec"], "raycluster.yaml")
    assert rc["spec"]["authOptions"].get("secretName"), "a fixed Secret so clients can read it"
    assert rc["spec"]["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("headGroupSpec/rayStartParams", KeyError, "rayStartParams is required"),
        ("headGroupSpec/rayStartParams", {"num-cpus": 0}, "must be a string"),
        ("workerGroupSpecs", [], "no workerGroupSpecs"),
        ("authOptions", KeyError, "token auth"),
        ("rayVersion", "2.59.0", "differs from the image"),
    ],
)
def test_a_broken_raycluster_fails(path, value, message):
    spec = _set(only(RAYCLUSTER, "RayCluster")["spec"], path, value)
    with pytest.raises(AssertionError, match=message):
        check_ray_cluster_spec(spec, "broken")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda w: w.update(groupName=""), "groupName"),
        (lambda w: w.update(minReplicas=9), "minReplicas <= replicas"),
        (lambda w: w["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"), "no nvidia.com/gpu"),
        (lambda w: w["template"]["spec"]["containers"][0].update(image="rayproject/ray:2.42.0-py311-gpu"), "outside the project's pin"),
        (lambda w: w["template"]["spec"].update(containers=[]), "no containers"),
    ],
)
def test_a_broken_worker_group_fails(mutate, message):
    spec = copy.deepcopy(only(RAYCLUSTER, "RayCluster")["spec"])
    mutate(spec["workerGroupSpecs"][0])
    with pytest.raises(AssertionError, match=message):
        check_ray_cluster_spec(spec, "broken")


def test_rayjob_runs_score_matrix_with_a_valid_runtime_env():
    job = only(RAYJOB, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python jobs/score_matrix.py ")
    check_entrypoint(spec["entrypoint"])
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    check_runtime_env(env, remote_working_dir=True)
    assert {"AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"} <= set(env["env_vars"]), "S3 settings"
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), (
        "a RayJob needs exactly one of rayClusterSpec / clusterSelector"
    )
    if "rayClusterSpec" in spec:
        check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob rayClusterSpec")
        assert spec.get("shutdownAfterJobFinishes") is True, "tear the GPUs down afterwards"


@pytest.mark.parametrize(
    "entrypoint, message",
    [
        ("python jobs/score_matrx.py configs/score_demo.yaml", "does not exist"),
        ("python jobs/score_matrix.py configs/score_clotho_missing.yaml", "does not exist"),
        ("python jobs/score_matrix.py configs/score_demo.yaml actors.num_gpu=1", "unknown config key"),
        ("python jobs/score_matrix.py configs/score_demo.yaml scorer.precision=fp16", "not one of"),
        ("bash jobs/score_matrix.py configs/score_demo.yaml", "not `python"),
    ],
)
def test_a_broken_entrypoint_fails(entrypoint, message):
    from aacray.config import ConfigError

    with pytest.raises((AssertionError, ConfigError), match=message):
        check_entrypoint(entrypoint)


def test_runtime_env_file_is_valid():
    check_runtime_env(yaml.safe_load(RUNTIME_ENV.read_text()), remote_working_dir=False)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e: e["pip"]["packages"].remove("torch==2.8.*"), "missing"),
        (lambda e: e["pip"]["packages"].append("ray[default]==2.60.*"), "never reinstall Ray"),
        (lambda e: e["env_vars"].update(N=1), "Dict\\[str, str\\]"),
        (lambda e: e.update(workdir="x"), "unknown runtime_env keys"),
        (lambda e: e.update(working_dir="s3://b/code.tar"), "remote .zip URI|Only .zip"),
    ],
)
def test_a_broken_runtime_env_fails(change, message):
    env = yaml.safe_load(only(RAYJOB, "RayJob")["spec"]["runtimeEnvYAML"])
    change(env)
    with pytest.raises((AssertionError, TypeError, ValueError), match=message):
        check_runtime_env(env, remote_working_dir=True)


def test_reindex_cronjob():
    """Fails while jobs/reindex.py or configs/reindex_demo.yaml do not exist yet."""
    check_cronjob(only(CRONJOB, "CronJob"), only(RAYCLUSTER, "RayCluster"))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["spec"].update(schedule="every hour"), "5-field cron"),
        (lambda c: c["spec"].update(concurrencyPolicy="Allow"), "must not race"),
        (lambda c: c["spec"]["jobTemplate"]["spec"]["template"]["spec"].update(restartPolicy="Always"), "Never/OnFailure"),
        (lambda c: cron_env(c)["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"].update(name="other"), "token Secret"),
        (lambda c: cron_env(c)["RAY_ADDRESS"].update(value="http://ray-head:8265"), "RAY_ADDRESS"),
        (lambda c: cron_env(c)["REINDEX_ARGS"].update(value="new_caption=s3://b/x.csv"), "unknown config key"),
    ],
)
def test_a_broken_cronjob_fails(mutate, message):
    from aacray.config import ConfigError

    cron = copy.deepcopy(only(CRONJOB, "CronJob"))
    mutate(cron)
    with pytest.raises((AssertionError, ConfigError), match=message):
        check_cronjob(cron, only(RAYCLUSTER, "RayCluster"))


# --------------------------------------------------------------------------------------
# The CronJob's script against a stub `ray` that answers like Ray 2.60's job server
# --------------------------------------------------------------------------------------

# The texts are Ray 2.60's: a duplicate id fails with this ValueError (surfaced through
# HTTP 500, `ray job submit` exits 1); `ray job status` logs "Job '<id>' succeeded",
# "Job '<id>' failed", "Job '<id>' was stopped" or "Status for job '<id>': RUNNING".
STUB_RAY = r"""#!/usr/bin/env bash
echo "$*" >> "$STUB_STATE.calls"
if [ "$1 $2" = "job submit" ]; then
    [ -n "${STUB_SUBMIT_ERROR:-}" ] && { echo "$STUB_SUBMIT_ERROR" >&2; exit 1; }
    id=""; while [ $# -gt 0 ]; do [ "$1" = --submission-id ] && id=$2; shift; done
    if grep -qx "$id" "$STUB_STATE" 2>/dev/null; then
        echo "ValueError: Job with submission_id $id already exists. Please use a different submission_id." >&2
        exit 1
    fi
    echo "$id" >> "$STUB_STATE"
    echo "Job '$id' submitted successfully"
    exit 0
fi
if [ "$1 $2" = "job status" ]; then
    id="${@: -1}"
    case "${STUB_STATUS:-SUCCEEDED}" in
        SUCCEEDED) echo "Job '$id' succeeded" >&2 ;;
        FAILED) echo "Job '$id' failed" >&2 ;;
        STOPPED) echo "Job '$id' was stopped" >&2 ;;
        *) echo "Status for job '$id': $STUB_STATUS" >&2 ;;
    esac
    exit 0
fi
exit 3
"""


@pytest.fixture
def cron_runner(tmp_path):
    script = tmp_path / "reindex.sh"
    script.write_text(cron_script(only(CRONJOB, "CronJob")))
    (tmp_path / "bin").mkdir()
    stub = tmp_path / "bin" / "ray"
    stub.write_text(STUB_RAY)
    stub.chmod(0o755)
    manifest = tmp_path / "_MANIFEST.json"
    manifest.write_text('{"tables": {"captions": {"rows": 10}}}\n')

    def run(**env):
        full = {
            "PATH": f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin",
            "STUB_STATE": str(tmp_path / "state"),
            "NEW_DATA_MANIFEST": str(manifest),
            "RUNTIME_ENV_JSON": "{}",
            **env,
        }
        return subprocess.run(["bash", str(script)], env=full, capture_output=True, text=True, timeout=60)

    run.manifest = manifest
    run.state = tmp_path / "state"  # ids the stub job server accepted
    run.calls = tmp_path / "state.calls"  # every stub invocation
    return run


def submitted_ids(calls: Path) -> list[str]:
    lines = calls.read_text().splitlines() if calls.exists() else []
    return [line.split("--submission-id ")[1].split()[0] for line in lines if line.startswith("job submit")]


def test_cron_submission_id_is_the_manifest_hash(cron_runner):
    r = cron_runner()
    assert r.returncode == 0, r.stdout + r.stderr
    digest = hashlib.sha256(cron_runner.manifest.read_bytes()).hexdigest()[:16]
    assert submitted_ids(cron_runner.calls) == [f"aacray-reindex-{digest}-a1"]
    assert "-- python jobs/reindex.py configs/reindex_demo.yaml" in cron_runner.calls.read_text()
    # new data -> a new id, so a new job
    cron_runner.manifest.write_text('{"tables": {"captions": {"rows": 11}}}\n')
    assert cron_runner().returncode == 0
    ids = submitted_ids(cron_runner.calls)
    assert len(ids) == 2 and ids[0] != ids[1]


@pytest.mark.parametrize("earlier", ["SUCCEEDED", "RUNNING", "PENDING"])
def test_cron_repeated_trigger_is_a_noop(cron_runner, earlier):
    assert cron_runner().returncode == 0
    r = cron_runner(STUB_STATUS=earlier)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing to do" in r.stdout
    # the stub accepted one job only: the second submission was refused
    assert len(cron_runner.state.read_text().split()) == 1


@pytest.mark.parametrize("earlier", ["FAILED", "STOPPED"])
def test_cron_repeated_trigger_after_a_failed_job_fails_until_the_attempt_is_raised(cron_runner, earlier):
    assert cron_runner().returncode == 0
    r = cron_runner(STUB_STATUS=earlier)
    assert r.returncode == 1 and "raise REINDEX_ATTEMPT" in r.stderr
    r = cron_runner(STUB_STATUS=earlier, REINDEX_ATTEMPT="2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert submitted_ids(cron_runner.calls)[-1].endswith("-a2")


def test_cron_other_submission_errors_fail(cron_runner):
    r = cron_runner(STUB_SUBMIT_ERROR="ConnectionError: Failed to connect to Ray at address")
    assert r.returncode != 0


def test_cron_unreadable_manifest_fails(cron_runner):
    r = cron_runner(NEW_DATA_MANIFEST="/nonexistent/_MANIFEST.json")
    assert r.returncode != 0 and not cron_runner.calls.exists()


# --------------------------------------------------------------------------------------
# Entry points written anywhere in cluster/ and docs/operations.md; the local script
# --------------------------------------------------------------------------------------


def referenced_entrypoints() -> list[tuple[str, str, str]]:
    files = sorted(p for p in CLUSTER.rglob("*") if p.is_file()) + [OPERATIONS]
    found = []
    for f in files:
        for script, config in ENTRYPOINT_RE.findall(f.read_text()):
            found.append((str(f.relative_to(ROOT)), script, config))
    return found


def test_every_referenced_job_and_config_exists():
    found = referenced_entrypoints()
    assert len(found) >= 6, f"expected the files to name their commands, found {found}"
    missing = sorted(
        {f"{src}: {p}" for src, script, config in found for p in (script, config) if not (ROOT / p).is_file()}
    )
    assert not missing, "referenced but missing:\n" + "\n".join(missing)


def test_entrypoint_scan_finds_commands_in_prose_and_shell():
    text = "run `ray job submit -- python jobs/score_matrx.py configs/score_demo.yaml k=1` now"
    assert ENTRYPOINT_RE.findall(text) == [("jobs/score_matrx.py", "configs/score_demo.yaml")]
    assert not (ROOT / "jobs/score_matrx.py").exists()


def _code(path: Path) -> str:
    """The script without its comments."""
    return "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())


def calls_ray_stop(code: str) -> bool:
    # `ray stop`, `.venv/bin/ray stop`, `"$RAY" stop`
    return bool(re.search(r"""(^|[\s"'/$])ray"?\s+stop\b""", code, re.IGNORECASE | re.MULTILINE))


def test_local_multinode_script_is_valid_bash_and_never_calls_ray_stop():
    subprocess.run(["bash", "-n", str(LOCAL)], check=True)
    code = _code(LOCAL)
    # `ray stop` ends every Ray process on the machine, other people's too
    assert not calls_ray_stop(code), "never `ray stop`"
    assert "trap cleanup EXIT" in code
    assert code.count("--temp-dir=") == 2, "each node gets its own temp dir"
    assert "RAY_AUTH_MODE=token" in code
    assert ENTRYPOINT_RE.search(code).groups() == ("jobs/score_matrix.py", "configs/score_demo.yaml")


@pytest.mark.parametrize(
    "line, hit",
    [
        ('cleanup() { "$RAY" stop; }', True),
        ("ray stop --force", True),
        (".venv/bin/ray stop", True),
        ("# never ray stop", False),
        ('"$RAY" start --head', False),
    ],
)
def test_the_ray_stop_guard(tmp_path, line, hit):
    script = tmp_path / "s.sh"
    script.write_text(f"#!/usr/bin/env bash\n{line}\n")
    assert calls_ray_stop(_code(script)) is hit


# --------------------------------------------------------------------------------------
# End to end: a two-node Ray on this machine, score_matrix through `ray job submit`
# --------------------------------------------------------------------------------------


def _run_job(args: list[str], log: Path) -> None:
    env = {**os.environ, "AACRAY_LOG_LEVEL": "WARNING"}
    env.pop("RAY_ADDRESS", None)
    for _ in range(2):  # once more if an embedded Ray could not start in time
        start = log.stat().st_size if log.exists() else 0
        with open(log, "a") as f:
            r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode == 0 or "timed out during startup" not in log.read_text()[start:]:
            break
    assert r.returncode == 0, f"{args[0]} failed; see {log}:\n{log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    """corpus (12/4/4 clips) -> logmel_pool embeddings -> a 1-layer width-32 decoder, 1 epoch."""
    base = tmp_path_factory.mktemp("tiny_pipeline")
    log = base / "pipeline.log"
    corpus, emb, model = base / "corpus", base / "emb", base / "model"
    _run_job(["jobs/make_demo_corpus.py", "configs/demo_corpus.yaml", f"output={corpus}",
              "n_dev=12", "n_val=4", "n_eval=4", "min_seconds=2.0", "max_seconds=4.0"], log)
    _run_job(["jobs/extract_embeddings.py", "configs/extract_demo.yaml", f"input.root={corpus}",
              f"output={emb}", "encoder.name=logmel_pool"], log)
    _run_job(["jobs/train_decoder.py", "configs/train_demo.yaml", f"embeddings={emb}",
              f"output={model}", "epochs=1", "num_workers=1", "model.n_layers=1",
              "model.d_model=32", "model.d_ff=64", "model.n_heads=2"], log)
    return emb, model


def _processes_mentioning(text: str) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in a for a in p.info["cmdline"] or []):
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids


def _http_status(url: str, headers: dict) -> int:
    """The HTTP status of a GET (an error status is an answer too)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.cluster
@pytest.mark.timeout(2400)
def test_local_multinode_scores_the_demo_and_stops_only_its_own_nodes(tiny_trained, tmp_path):
    from aacray import storage

    emb, model = tiny_trained
    out = tmp_path / "score"
    # bystanders: one carrying another cluster's tag, one carrying none
    bystander_env = {**os.environ, "AACRAY_LOCAL_CLUSTER": "somebody-else"}
    bystanders = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], env=bystander_env),
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"]),
    ]
    probes = None
    proc = None
    try:
        t0 = time.time()
        proc = subprocess.Popen(
            ["bash", str(LOCAL), f"checkpoint={model}", f"audio={emb}", f"captions={emb}", f"output={out}"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "AACRAY_PYTHON": sys.executable},
        )
        lines = []
        for line in proc.stdout:  # the head lives from this line until the job has ended
            lines.append(line)
            m = re.search(r"job API (http://\S+):", line)
            if m and probes is None:
                # our own requests to the real head's job API, not the script's word for it
                work = re.search(r"starting the head .* in (/\S+)", "".join(lines)).group(1)
                token = Path(work, "auth_token").read_text().strip()
                probes = {
                    "none": _http_status(m.group(1), {}),
                    "wrong": _http_status(m.group(1), {"Authorization": "Bearer " + "f" * 64}),
                    "x-ray wrong": _http_status(m.group(1), {"X-Ray-Authorization": "Bearer wrong"}),
                    "right": _http_status(m.group(1), {"Authorization": f"Bearer {token}"}),
                }
        rc = proc.wait(timeout=600)
        elapsed = time.time() - t0
        log = "".join(lines)
        (tmp_path / "local_multinode.log").write_text(log)
        assert rc == 0, log[-5000:]
        assert all(b.poll() is None for b in bystanders), "the script stopped a process that was not its own"
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()  # the script's trap stops its nodes
            proc.wait(60)
        for b in bystanders:
            b.kill()
            b.wait()
    # token enforced by the head itself: 401 without a token, 403 with a wrong one, 200 with it
    assert probes == {"none": 401, "wrong": 403, "x-ray wrong": 403, "right": 200}, probes
    assert "no token -> HTTP 401, a wrong token -> HTTP 403, the token -> HTTP 200" in log
    # two nodes, duplicate id refused, nodes stopped
    # `ray status` lists each live node as "1 node_<id>" (under Active, or Idle when idle)
    live = set(re.findall(r"^\s*1 (node_[0-9a-f]+)\s*$", log, re.M))
    assert len(live) == 2, f"expected two live nodes in `ray status`, got {live}"
    assert "a second submission with the same id was refused" in log
    assert "SUCCEEDED" in log
    work = re.search(r"starting the head .* in (/\S+)", log).group(1)
    time.sleep(1)
    assert not _processes_mentioning(work), f"processes of {work} outlived the script"
    assert not Path(work, "auth_token").exists(), "the token file is removed"
    # the output is complete and readable: 4 evaluation audios x 20 captions
    manifest = storage.read_manifest(str(out))
    assert set(manifest["tables"]) >= {"caption_stats", "topk_t2a", "topk_a2t", "topk_a2t_raw"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_pairs"] == metrics["n_audios"] * metrics["n_captions"] == 4 * 20
    assert storage.read_table(str(out), "caption_stats").num_rows == 20
    print(f"local_multinode.sh took {elapsed:.0f} s")
