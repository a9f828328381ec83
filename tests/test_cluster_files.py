"""Deployment files: cluster.yaml, runtime_env.yaml, .rayignore, deploy/kuberay/*.yaml.

Checked with Ray's own code wherever it runs offline:
* cluster.yaml against ray/autoscaler/ray-schema.json (jsonschema), then through
  `prepare_config` + `validate_config` (what `ray up` runs before it talks to AWS), then through the
  AWS provider's resource autodetection with the EC2 DescribeInstanceTypes call stubbed.
  The rest of `ray up` (`bootstrap_aws`: IAM, key pairs, subnets, security groups) needs AWS
  credentials and is not exercised.
* runtime_env.yaml through the same parsing `ray job submit --runtime-env` uses, then `RuntimeEnv`.
* The working-dir upload is built with Ray's packaging code (.gitignore + .rayignore + Ray's default
  excludes) and its size checked against Ray's limits.
No Ray cluster is started.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray
import ray.autoscaler

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
RUNTIME_ENV_YAML = REPO / "runtime_env.yaml"
RAYIGNORE = REPO / ".rayignore"
RAYJOB_YAML = REPO / "deploy" / "kuberay" / "rayjob.yaml"
RAYCRONJOB_YAML = REPO / "deploy" / "kuberay" / "raycronjob.yaml"

MIN_DISK_GB = 200

# Public EC2 facts for the instance types cluster.yaml uses, in the shape of DescribeInstanceTypes:
# (vCPUs, memory MiB, GPU name, GPU count). Add a row when cluster.yaml adds an instance type.
EC2_INSTANCE_TYPES = {
    "m7i.2xlarge": (8, 32 * 1024, None, 0),
    "c7i.8xlarge": (32, 64 * 1024, None, 0),
    "g6e.xlarge": (4, 32 * 1024, "L40S", 1),
    "g6e.12xlarge": (48, 384 * 1024, "L40S", 4),
    "p5.48xlarge": (192, 2048 * 1024, "H100", 8),
}
# The GPU worker types the deployment is built around: (GPUs, accelerator, spot?).
EXPECTED_GPU_TYPES = {
    "g6e.xlarge": (1, "L40S", True),
    "g6e.12xlarge": (4, "L40S", True),
    "p5.48xlarge": (8, "H100", False),
}


def _load(path: Path):
    assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    with path.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _load(CLUSTER_YAML)


def _node_types(cluster: dict) -> dict:
    return cluster["available_node_types"]


def _worker_types(cluster: dict) -> dict:
    return {n: t for n, t in _node_types(cluster).items() if n != cluster["head_node_type"]}


# ------------------------------------------------------------------------------------ cluster.yaml


def test_cluster_yaml_matches_ray_schema(cluster):
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(cluster), key=lambda e: list(e.absolute_path)
    )
    if errors:
        lines = [f"  at {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
        pytest.fail(f"cluster.yaml does not match {schema_path}:\n" + "\n".join(lines))


def test_cluster_yaml_passes_ray_config_preparation(cluster):
    # `ray up` runs prepare_config (merge with aws/defaults.yaml, merge setup commands, fill per-type
    # min/max workers), then validate_config. Neither calls AWS.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    try:
        validate_config(prepared)
    except (jsonschema.ValidationError, ValueError, RuntimeError) as e:
        pytest.fail(f"Ray refuses cluster.yaml after preparation: {getattr(e, 'message', e)}")
    assert prepared["cluster_name"] == "phi4mm-batch"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # Our setup commands replaced Ray's defaults (which would install a Ray nightly wheel).
    assert not any("ray-wheels" in c for c in prepared["head_setup_commands"])
    # Every worker type can scale to zero, and its cap fits under the global cap.
    for name, t in _worker_types(prepared).items():
        assert t["min_workers"] == 0, f"{name}: min_workers should be 0 (autoscale from zero)"
        assert 0 < t["max_workers"] <= prepared["max_workers"], name
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    assert prepared["idle_timeout_minutes"] > 0


def test_declared_resources_match_what_ray_autodetects(cluster, monkeypatch):
    # `ray up` asks EC2 DescribeInstanceTypes for CPU/GPU/memory/accelerator of each type and lets
    # the file's `resources` override it. Stub the EC2 call with the table above and run Ray's
    # own code: the declared values must be what Ray would detect (except the head's CPU: 0).
    from ray.autoscaler._private.aws import node_provider
    from ray.autoscaler._private.util import prepare_config

    def fake_list_ec2_instances(region, aws_credentials=None):
        out = []
        for itype, (vcpus, mib, gpu, count) in EC2_INSTANCE_TYPES.items():
            entry = {"InstanceType": itype, "VCpuInfo": {"DefaultVCpus": vcpus}, "MemoryInfo": {"SizeInMiB": mib}}
            if gpu:
                entry["GpuInfo"] = {"Gpus": [{"Name": gpu, "Manufacturer": "NVIDIA", "Count": count}]}
            out.append(entry)
        return out

    monkeypatch.setattr(node_provider, "list_ec2_instances", fake_list_ec2_instances)
    for name, t in _node_types(cluster).items():
        itype = t["node_config"]["InstanceType"]
        assert itype in EC2_INSTANCE_TYPES, f"{name}: add {itype} to EC2_INSTANCE_TYPES in this test"

    stripped = prepare_config(copy.deepcopy(cluster))
    for t in stripped["available_node_types"].values():
        t["resources"] = {}
    detected = node_provider.AWSNodeProvider.fillout_available_node_types_resources(stripped)
    final = node_provider.AWSNodeProvider.fillout_available_node_types_resources(
        prepare_config(copy.deepcopy(cluster))
    )
    head = cluster["head_node_type"]
    for name, t in _node_types(cluster).items():
        auto = detected["available_node_types"][name]["resources"]
        declared = t["resources"]
        for key, value in declared.items():
            if name == head and key == "CPU":
                assert value == 0, "the head should advertise CPU: 0 (no tasks on the head)"
                continue
            assert auto.get(key) == value, f"{name}: declares {key}={value}, Ray would detect {auto.get(key)}"
        for key in ("CPU", "GPU"):
            if key in auto and name != head:
                assert key in declared, f"{name}: declare {key} explicitly (autodetection needs EC2 access)"
        # The file's values win over autodetection.
        assert {k: final["available_node_types"][name]["resources"][k] for k in declared} == declared


def test_head_runs_no_tasks(cluster):
    head = _node_types(cluster)[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    assert "InstanceMarketOptions" not in head["node_config"], "the head must be on-demand"


def test_gpu_worker_types(cluster):
    by_instance = {t["node_config"]["InstanceType"]: (n, t) for n, t in _worker_types(cluster).items()}
    for itype, (gpus, accel, spot) in EXPECTED_GPU_TYPES.items():
        assert itype in by_instance, f"no worker type uses {itype}"
        name, t = by_instance[itype]
        res = t["resources"]
        assert res.get("GPU") == gpus, f"{name}: resources.GPU should be {gpus}"
        assert res.get(f"accelerator_type:{accel}") == 1, f"{name}: missing accelerator_type:{accel}"
        assert t.get("min_workers", 0) == 0, f"{name}: GPU nodes should start at zero"
        market = t["node_config"].get("InstanceMarketOptions")
        if spot:
            assert market and market.get("MarketType") == "spot", f"{name}: should be spot"
        else:
            assert market is None, f"{name}: should be on-demand"
    # The on-demand 8x H100 type is a capped fallback, never a pool that grows on its own.
    _, p5 = by_instance["p5.48xlarge"]
    assert p5["max_workers"] <= 1


def test_cpu_worker_type_for_decode(cluster):
    cpu_types = [t for t in _worker_types(cluster).values() if not t["resources"].get("GPU")]
    assert cpu_types, "a CPU-only worker type is needed for fetch/decode/segment"
    assert all(t["resources"].get("CPU", 0) >= 8 for t in cpu_types)


def test_disks_sized_for_spilling_and_model_cache(cluster):
    for name, t in _node_types(cluster).items():
        bdm = t["node_config"].get("BlockDeviceMappings")
        assert bdm, f"{name}: no BlockDeviceMappings (the AMI's default root disk is too small)"
        root = [m for m in bdm if m.get("DeviceName") == "/dev/sda1"]
        assert root, f"{name}: set the root volume /dev/sda1 (Ubuntu DLAMI), spilling goes to /tmp/ray"
        for m in bdm:
            ebs = m["Ebs"]
            size, iops, tput = ebs["VolumeSize"], ebs.get("Iops", 3000), ebs.get("Throughput", 125)
            assert ebs.get("VolumeType") == "gp3", f"{name}: use gp3"
            assert size >= MIN_DISK_GB, f"{name}: {size} GB < {MIN_DISK_GB} GB"
            # gp3 limits: 3000-16000 IOPS, 125-1000 MiB/s, <= 500 IOPS per GiB and 0.25 MiB/s per IOPS.
            assert 3000 <= iops <= 16000 and iops <= 500 * size, f"{name}: Iops {iops} out of gp3 range"
            assert 125 <= tput <= 1000 and tput <= iops / 4, f"{name}: Throughput {tput} out of gp3 range"


def test_one_ami_for_all_nodes(cluster):
    # Ray needs the same Python and Ray on every node: one image for all node types.
    amis = {t["node_config"].get("ImageId") for t in _node_types(cluster).values()}
    assert len(amis) == 1, f"node types use different AMIs: {amis}"
    (ami,) = amis
    assert re.fullmatch(r"ami-[0-9a-f]{8}(?:[0-9a-f]{9})?", ami or ""), f"ImageId {ami!r} is not an AMI id"


def test_setup_installs_the_project(cluster):
    mounts = cluster["file_mounts"]
    assert mounts.get("~/phi4mm-batch") == ".", "the repo should be mounted at ~/phi4mm-batch"
    setup = " ; ".join(cluster["setup_commands"])
    assert re.search(r"pip install .*-e ~/phi4mm-batch", setup), "setup_commands must pip install -e the repo"
    # The Ray pinned on the nodes is the Ray this project is built against.
    major_minor = ".".join(ray.__version__.split(".")[:2])
    m = re.search(r'"ray\[([^\]]+)\]==([0-9.*]+)"', setup)
    assert m, "setup_commands should pin ray[default,...]"
    assert "default" in m.group(1).split(","), "ray[default] is needed for the job server / runtime envs"
    assert m.group(2).startswith(major_minor), f"nodes get ray {m.group(2)}, this env has {ray.__version__}"
    assert any("boto3" in c for c in cluster["head_setup_commands"]), "the AWS autoscaler needs boto3"
    # The rsync'ed copy must not drag in VCS, virtualenvs or weights.
    assert ".gitignore" in cluster.get("rsync_filter", [])
    for pattern in (".git", ".venv", "/models/", "/out/"):
        assert pattern in cluster.get("rsync_exclude", []), f"rsync_exclude should list {pattern}"


def test_spot_and_node_options(cluster):
    assert cluster["provider"].get("cache_stopped_nodes") is False
    for name, t in _worker_types(cluster).items():
        assert "IamInstanceProfile" in t["node_config"], f"{name}: workers need an instance profile for S3"
        market = t["node_config"].get("InstanceMarketOptions")
        if market:
            assert "MaxPrice" not in market.get("SpotOptions", {}), f"{name}: leave MaxPrice unset (on-demand cap)"


def test_node_labels_are_valid_ray_labels(cluster):
    from ray._private.label_utils import validate_label_key, validate_label_value, validate_node_labels

    for name, t in _node_types(cluster).items():
        labels = t.get("labels", {})
        validate_node_labels(labels)  # refuses the reserved ray.io/ prefix
        for k, v in labels.items():
            assert validate_label_key(k) is None, f"{name}: {validate_label_key(k)}"
            validate_label_value(v)


# -------------------------------------------------------------------------------- runtime_env.yaml


def test_runtime_env_yaml_is_accepted_by_ray(monkeypatch):
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    monkeypatch.chdir(REPO)
    # Exactly what `ray job submit --working-dir . --runtime-env runtime_env.yaml` builds.
    env = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV_YAML), working_dir=".")
    raw = _load(RUNTIME_ENV_YAML)
    assert "working_dir" not in raw, "--working-dir sets it; a second one only triggers an override warning"
    try:
        parsed = RuntimeEnv(**env)
    except (TypeError, ValueError) as e:
        pytest.fail(f"RuntimeEnv refuses runtime_env.yaml: {e}")
    assert parsed.working_dir() == "."
    env_vars = parsed.env_vars()
    # pipeline/model/source.py reads PHI4MM_CACHE; huggingface_hub reads HF_HOME.
    for key in ("HF_HOME", "PHI4MM_CACHE"):
        assert env_vars.get(key), f"{key} should point at the node-local model cache"
    assert all(isinstance(v, str) for v in env_vars.values())
    for field in ("pip", "uv"):
        for pkg in raw.get(field) or []:
            assert not re.match(r"-e\s+\.", str(pkg)), f"{field}: '-e .' does not work from a working dir"



def test_node_setup_caches_match_runtime_env(cluster):
    # The setup's prefetch writes where the job will look: the exports appended to ~/.bashrc (seen by
    # `ray start` and so by every Ray process) equal runtime_env.yaml's env_vars.
    setup = " ".join(cluster["setup_commands"])
    exported = dict(re.findall(r"'export ([A-Z0-9_]+)=([^']*)'", setup))
    env_vars = _load(RUNTIME_ENV_YAML)["env_vars"]
    for key in ("HF_HOME", "PHI4MM_CACHE"):
        assert key in exported, f"cluster.yaml setup_commands should export {key}"
        assert exported[key].replace("$HOME", "${HOME}") == env_vars[key], f"{key} differs from runtime_env.yaml"
    assert "resolve_model" in setup, "setup_commands should prefetch the checkpoint through pipeline.model.source"

# ------------------------------------------------------------------------------ upload / .rayignore


def _ray_would_skip(rel: str, matchers) -> bool:
    # Ray walks the tree and prunes at the first excluded path component.
    parts = Path(rel).parts
    return any(m(REPO.joinpath(*parts[: i + 1])) for i in range(len(parts)) for m in matchers)


def test_rayignore_excludes_vcs_envs_weights_and_outputs():
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    assert RAYIGNORE.is_file(), ".rayignore is missing"
    # .rayignore alone (no .gitignore, no Ray defaults) prunes VCS and virtualenvs at the top.
    only_rayignore = get_excludes_from_ignore_files(REPO, include_gitignore=False)
    for d in (".git", ".venv"):
        assert any(m(REPO / d) for m in only_rayignore), f".rayignore should exclude {d} (the directory itself)"
    both = get_excludes_from_ignore_files(REPO, include_gitignore=True)
    for rel in (
        ".git/objects/pack/pack-1.pack", ".venv/lib/python3.11/site-packages/torch/lib/libtorch_cuda.so",
        "out/task=asr/part-0.parquet", "models/phi4mm/model-00001-of-00003.safetensors",
        "pipeline/__pycache__/read.cpython-311.pyc", ".gpu-bundle/x.tar", "bench/out/trace.json",
        "results.parquet",
    ):
        assert _ray_would_skip(rel, both), f"{rel} would be uploaded with the working dir"
    for rel in (
        "jobs/transcribe.py", "pipeline/io/manifest.py", "schemas/results.py", "pyproject.toml",
        "samples/call.wav", "samples/manifest.parquet", "bench/RESULTS.md", "runtime_env.yaml",
    ):
        assert not _ray_would_skip(rel, both), f"{rel} would be left out of the working dir"


def test_working_dir_upload_is_well_under_ray_limit(tmp_path, monkeypatch):
    from ray._private.runtime_env.packaging import (
        GCS_STORAGE_MAX_SIZE,
        PACKAGE_SIZE_WARNING,
        create_package,
    )
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    monkeypatch.delenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", raising=False)
    monkeypatch.delenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", raising=False)
    seen = {}

    def capture(working_dir, excludes=None, is_file=False):
        seen.update(working_dir=working_dir, excludes=excludes)

    # Ray's own client path, with the upload replaced by a capture, then the same create_package
    # call the job SDK makes before its HTTP PUT.
    env = upload_working_dir_if_needed({"working_dir": str(REPO)}, include_gitignore=True, upload_fn=capture)
    assert env["working_dir"].startswith("gcs://_ray_pkg_")
    pkg = tmp_path / "pkg.zip"
    create_package(seen["working_dir"], pkg, include_gitignore=True, excludes=seen["excludes"])
    size = pkg.stat().st_size
    assert GCS_STORAGE_MAX_SIZE == 512 * 1024 * 1024
    assert size < PACKAGE_SIZE_WARNING, (
        f"working-dir package is {size / 2**20:.1f} MiB (Ray warns at {PACKAGE_SIZE_WARNING / 2**20:.0f} MiB, "
        f"refuses at 512 MiB): extend .rayignore"
    )
    names = zipfile.ZipFile(pkg).namelist()
    assert "cluster.yaml" in names and "pyproject.toml" in names
    leaked = [n for n in names if n.split("/")[0] in {".git", ".venv", "out", "models", ".gpu-bundle"}]
    assert not leaked, f"uploaded but should not be: {leaked[:10]}"


# ------------------------------------------------------------------------------------------ KubeRay

_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 6)]
_MONTHS = {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}
_DAYS = {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}


def _cron_field_ok(field: str, lo: int, hi: int, names: dict) -> bool:
    for part in field.split(","):
        base, slash, step = part.partition("/")
        if slash and (not step.isdigit() or int(step) == 0):
            return False
        if base == "*":
            continue
        bounds = []
        for v in base.split("-"):
            v = str(names.get(v.lower(), v))
            if not v.isdigit() or not lo <= int(v) <= hi:
                return False
            bounds.append(int(v))
        if len(bounds) > 2 or (len(bounds) == 2 and bounds[0] > bounds[1]):
            return False
    return True


def is_valid_cron(expr: str) -> bool:
    """A standard 5-field cron expression, as KubeRay parses it (robfig/cron ParseStandard)."""
    fields = expr.split()
    if len(fields) != 5:
        return False
    names = [{}, {}, {}, _MONTHS, _DAYS]
    return all(_cron_field_ok(f, lo, hi, n) for f, (lo, hi), n in zip(fields, _CRON_RANGES, names))


@pytest.mark.parametrize(
    "expr,ok",
    [
        ("0 2 * * *", True), ("*/15 * * * 1-5", True), ("0 0 1 jan,jul *", True), ("30 3 * * sun", True),
        ("0 2 * *", False), ("60 2 * * *", False), ("0 24 * * *", False), ("0 2 * * 7", False),
        ("0 2 */0 * *", False), ("@daily", False), ("0 2 5-1 * *", False),
    ],
)
def test_cron_validator(expr, ok):
    assert is_valid_cron(expr) is ok


def _containers(cluster_spec: dict):
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for g in cluster_spec.get("workerGroupSpecs", []):
        yield g["groupName"], g["template"]["spec"]["containers"][0]


def _check_rayjob_spec(spec: dict, where: str):
    from ray.runtime_env import RuntimeEnv

    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.transcribe"], f"{where}: entrypoint should run jobs.transcribe"
    paths = [a for a in argv[3:] if not a.startswith("--")]
    assert len(paths) == 2 and all(p.startswith("s3://") for p in paths), f"{where}: IN and OUT s3:// paths"
    assert "--resume" in argv, f"{where}: nightly runs must --resume"
    assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: shutdownAfterJobFinishes"
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] >= 0
    assert "jobId" not in spec, f"{where}: a fixed jobId collides between runs"
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds", "backoffLimit"):
        if key in spec:
            assert isinstance(spec[key], int) and spec[key] > 0, f"{where}: {key} must be a positive integer"

    env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**env)
    assert "working_dir" not in env, f"{where}: the code is in the image"
    assert env["env_vars"] == _load(RUNTIME_ENV_YAML)["env_vars"], f"{where}: env_vars differ from runtime_env.yaml"

    cs = spec["rayClusterSpec"]
    assert str(cs["rayVersion"]).startswith(".".join(ray.__version__.split(".")[:2])), f"{where}: rayVersion"
    assert cs["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{where}: head should run no tasks"
    images = {c["image"] for _, c in _containers(cs)}
    assert len(images) == 1, f"{where}: head and workers must run one image (same Ray/Python): {images}"
    # The driver (head), the CPU prompt stages and the GPU actors all resolve the checkpoint: every pod
    # needs the caches on a volume, not in the container's writable layer.
    caches = [env["env_vars"][k].replace("${HOME}", "/home/ray") for k in ("HF_HOME", "PHI4MM_CACHE")]
    for group, c in _containers(cs):
        mounts = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts", [])]
        for cache in caches:
            assert any(cache.startswith(m) for m in mounts), f"{where}/{group}: no volume holds {cache}"
    gpu_groups = []
    for g in cs["workerGroupSpecs"]:
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], f"{where}/{g['groupName']}: replicas"
        c = g["template"]["spec"]["containers"][0]
        limits = c.get("resources", {}).get("limits", {})
        requests = c.get("resources", {}).get("requests", {})
        if "nvidia.com/gpu" in limits:
            gpu_groups.append(g["groupName"])
            assert int(limits["nvidia.com/gpu"]) >= 1
            if "nvidia.com/gpu" in requests:
                assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"], "extended resources: requests == limits"
            assert any(t.get("key") == "nvidia.com/gpu" for t in g["template"]["spec"].get("tolerations", []))
    assert gpu_groups, f"{where}: no worker group with nvidia.com/gpu limits"


def _check_metadata(doc: dict, kind: str, max_name: int):
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    name = doc["metadata"]["name"]
    assert len(name) <= max_name and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name


def test_kuberay_rayjob():
    doc = _load(RAYJOB_YAML)
    _check_metadata(doc, "RayJob", 47)  # KubeRay's MaxRayJobNameLength
    _check_rayjob_spec(doc["spec"], "rayjob.yaml")


def test_kuberay_raycronjob():
    doc = _load(RAYCRONJOB_YAML)
    # The RayJobs it creates are named "<name>-<5 chars>" and must fit in 47 characters.
    _check_metadata(doc, "RayCronJob", 47 - 6)
    spec = doc["spec"]
    assert is_valid_cron(spec["schedule"]), f"schedule {spec['schedule']!r} is not a 5-field cron"
    assert spec["schedule"] == "0 2 * * *"
    assert spec.get("suspend", False) is False
    assert "timeZone" not in spec, "spec.timeZone needs KubeRay 1.7; the file targets >= 1.6"
    _check_rayjob_spec(spec["jobTemplate"], "raycronjob.yaml jobTemplate")
    # The nightly template and the one-off RayJob are the same job.
    assert spec["jobTemplate"] == _load(RAYJOB_YAML)["spec"], "raycronjob jobTemplate drifted from rayjob.yaml spec"


def test_kuberay_entrypoint_module_path_is_the_repo_module():
    # jobs/transcribe.py may not exist yet: check only that the module name maps into jobs/.
    module = shlex.split(_load(RAYJOB_YAML)["spec"]["entrypoint"])[2]
    pkg, _, mod = module.partition(".")
    assert (REPO / pkg / "__init__.py").is_file(), f"{pkg}/ is not a package in the repo"
    assert mod == "transcribe"
    if (REPO / pkg / f"{mod}.py").exists():
        assert os.access(REPO / pkg / f"{mod}.py", os.R_OK)
