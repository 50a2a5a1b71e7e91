"""cluster/ is checked, not just written: configs parse, entrypoints run, resources fit, KubeRay field names match.

- every YAML under cluster/ parses; the AWS launcher config passes Ray's own config schema;
- every entrypoint (RayJob manifests, cluster/README.md commands, the local multi-node run) names a script
  that exists and whose `--help` lists each flag, with a value exactly where the flag takes one;
- the RayJob entrypoints are the README commands, word for word;
- GPUs and CPUs the jobs ask for fit the declared node types (KubeRay `nvidia.com/gpu` limits, AWS node
  types), and the batch job's GPUs exist when it starts (it sizes its pool from the GPUs it sees);
- ray.io objects validate against cluster/kuberay/schema.json (written from the KubeRay v1.7.0 API
  reference, additionalProperties: false), and that schema rejects misspelt fields;
- workers have an IAM instance profile / service account; RayJobs shut their cluster down when done;
- the Dockerfile installs the project like the README, with pins inside pyproject.toml's ranges.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAYJOBS = {"distill": KUBERAY / "rayjob-distill.yaml", "batch": KUBERAY / "rayjob-batch.yaml"}
SCRIPTS = {"ray_jobs/distill.py": "distill", "ray_jobs/batch_generate.py": "batch"}
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------- helpers


@functools.cache
def multinode():
    """cluster/multinode_local.py as a module (cluster/ is not a package)."""
    spec = importlib.util.spec_from_file_location("multinode_local", CLUSTER / "multinode_local.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def ray_objects() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{d['kind']}", d) for p in sorted(KUBERAY.glob("*.yaml")) for d in load_all(p)
            if d.get("apiVersion", "").startswith("ray.io/")]


@functools.cache
def schema() -> dict:
    return json.loads((KUBERAY / "schema.json").read_text())


def validate(doc: dict) -> None:
    jsonschema.validate(doc, schema(), cls=jsonschema.Draft202012Validator)


def readme_commands(path: Path) -> list[list[str]]:
    """argv of every `python ray_jobs/...` command in the fenced code blocks of a Markdown file."""
    text = path.read_text()
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            i = line.find("python ray_jobs/")
            if i >= 0:
                out.append(shlex.split(line[i:], comments=True))
    return out


def flags_of(argv: list[str]) -> dict[str, str | None]:
    """`--flag value` pairs after `python script` (None for a switch)."""
    return multinode().flag_values(argv)


@functools.cache
def help_flags(script: str) -> dict[str, bool]:
    """Flags listed by `python script --help` → whether each takes a value (argparse shows a metavar)."""
    res = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{script} --help failed:\n{res.stderr[-3000:]}"
    options = res.stdout.split("options:", 1)[-1]
    found: dict[str, bool] = {}
    # argparse indents option lines by exactly two spaces ("  --flag METAVAR   help", "  --on, --no-on");
    # wrapped help text is indented further and may mention flags too.
    for line in re.findall(r"^  (-\S.*?)(?:\s{2,}|$)", options, flags=re.M):
        for spec in line.split(", "):
            name, _, metavar = spec.partition(" ")
            if name.startswith("--"):
                found.setdefault(name, bool(metavar))
    assert found, f"{script} --help lists no options:\n{res.stdout[:2000]}"
    return found


def all_entrypoints() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command this directory asks a cluster to run."""
    mn = multinode()
    eps = [(f"{p.name}", shlex.split(load_all(p)[0]["spec"]["entrypoint"])) for p in RAYJOBS.values()]
    eps += [(f"cluster/README.md #{i}", argv) for i, argv in enumerate(readme_commands(CLUSTER / "README.md"))]
    eps += [(f"multinode_local:{job}", argv) for job, argv in mn.local_commands("s3://b", "run").items()]
    return eps


def skip_if_missing(script: str) -> None:
    if not (ROOT / script).exists():
        pytest.skip(f"{script} does not exist yet")


def cpu_of(quantity: str | int | float) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def pod_resources(group: dict) -> tuple[float, int]:
    """(CPUs, GPUs) a pod of a head/worker group gets from its containers' limits."""
    cpus, gpus = 0.0, 0
    for c in group["template"]["spec"]["containers"]:
        limits = c.get("resources", {}).get("limits", {})
        requests = c.get("resources", {}).get("requests", {})
        if GPU in requests:
            assert str(requests[GPU]) == str(limits.get(GPU)), f"{c['name']}: Kubernetes needs GPU requests == limits"
        cpus += cpu_of(limits.get("cpu", 0))
        gpus += int(limits.get(GPU, 0))
    if "num-cpus" in group.get("rayStartParams", {}):
        cpus = float(group["rayStartParams"]["num-cpus"])
    return cpus, gpus


def job_needs(argv: list[str]) -> tuple[int, float, int]:
    """(units, CPUs per unit, GPUs per unit): Train workers or generation actors the command asks for."""
    flags = flags_of(argv)
    if argv[1] == "ray_jobs/distill.py":
        return int(flags["--num-workers"]), 1.0, 1 if "--use-gpu" in flags else 0
    assert argv[1] == "ray_jobs/batch_generate.py", argv
    return int(flags.get("--num-actors") or 1), float(flags.get("--cpus-per-actor") or 1), 1


def fits(needs: tuple[int, float, int], nodes: list[tuple[int, float, int]]) -> bool:
    """Whether `units` x (cpu, gpu) pack onto nodes given as (count, cpus, gpus), one unit never split."""
    units, cpu, gpu = needs
    capacity = 0
    for count, cpus, gpus in nodes:
        per_node = min(int(cpus // cpu) if cpu else units, gpus // gpu if gpu else units)
        capacity += count * per_node
    return capacity >= units


# ---------------------------------------------------------------- parsing and entrypoints


def test_every_yaml_parses_and_kubernetes_objects_are_named():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {p.name for p in files} >= {"aws.yaml", "raycluster.yaml", "rayjob-distill.yaml", "rayjob-batch.yaml",
                                       "serviceaccount.yaml"}
    for path in files:
        docs = load_all(path)
        assert docs, f"{path} is empty"
        if path.parent == KUBERAY:
            for d in docs:
                assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), f"{path}: {d}"


@pytest.mark.parametrize("where,argv", all_entrypoints(), ids=lambda v: v if isinstance(v, str) else None)
def test_entrypoint_script_exists_and_accepts_its_flags(where, argv):
    assert argv[0] == "python" and argv[1] in SCRIPTS, f"{where}: {shlex.join(argv)}"
    skip_if_missing(argv[1])
    known = help_flags(argv[1])
    for flag, value in flags_of(argv).items():
        assert flag in known, f"{where}: {argv[1]} --help does not list {flag}"
        assert known[flag] == (value is not None), (
            f"{where}: {flag} {'needs a value' if known[flag] else 'is a switch'} but got {value!r}")


def test_help_parser_tells_switches_from_valued_flags():
    skip_if_missing("ray_jobs/batch_generate.py")
    known = help_flags("ray_jobs/batch_generate.py")
    assert known["--num-actors"] is True and known["--manifest"] is True and known["--dtype"] is True
    assert known["--strict"] is False and "--num-actor" not in known and "--help" in known


def test_rayjob_entrypoints_are_the_readme_commands_word_for_word():
    readme = readme_commands(CLUSTER / "README.md")
    for job, path in RAYJOBS.items():
        argv = shlex.split(load_all(path)[0]["spec"]["entrypoint"])
        assert argv in readme, f"{path.name}: entrypoint {shlex.join(argv)!r} is not a cluster/README.md command"
        root = (ROOT / "README.md").read_text()
        if f"python {argv[1]} --" in root and "s3://" in root:  # the project README shows the cluster command too
            assert argv in readme_commands(ROOT / "README.md"), f"{job}: README.md shows another cluster command"


def test_local_multinode_run_uses_the_manifest_commands():
    """Same script, same flags (values localised); only CPU tuning flags added, only --use-gpu dropped."""
    local = multinode().local_commands("s3://b", "run")
    for job, path in RAYJOBS.items():
        manifest = shlex.split(load_all(path)[0]["spec"]["entrypoint"])
        assert local[job][:2] == manifest[:2]
        missing = set(flags_of(manifest)) - set(flags_of(local[job]))
        assert missing <= {"--use-gpu"}, f"{job}: the local run drops {missing}"
        order = [f for f in flags_of(local[job]) if f in flags_of(manifest)]
        assert order == [f for f in flags_of(manifest) if f not in missing], f"{job}: flags reordered"


def test_localize_replaces_values_and_rejects_unknown_flags():
    localize = multinode().localize
    argv = ["python", "ray_jobs/x.py", "--a", "1", "--on", "--b", "s3://x"]
    assert localize(argv, {"--b": "s3://y"}, drop=("--on",), add=("--c", "2")) == [
        "python", "ray_jobs/x.py", "--a", "1", "--b", "s3://y", "--c", "2"]
    with pytest.raises(ValueError, match="--zz"):
        localize(argv, {"--zz": "1"})


# ---------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("name,doc", ray_objects(), ids=lambda v: v if isinstance(v, str) else None)
def test_kuberay_objects_validate_against_the_schema(name, doc):
    validate(doc)


def test_schema_cites_its_source_and_version():
    desc = schema()["description"]
    assert "v1.7.0" in desc and "docs/reference/api.md" in desc and "ray-project/kuberay" in desc


@pytest.mark.parametrize("path", [
    ("spec", "shutdownAfterJobFinish"),  # RayJobSpec
    ("spec", "rayClusterSpec", "enableInTreeAutoscale"),  # RayClusterSpec
    ("spec", "rayClusterSpec", "headGroupSpec", "rayStartParam"),  # HeadGroupSpec
    ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "maxReplica"),  # WorkerGroupSpec
    ("spec", "rayClusterSpec", "authOptions", "mod"),  # AuthOptions
    ("spec", "submitterConfig", "backofLimit"),  # SubmitterConfig
    ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "specs"),  # PodTemplateSpec
])
def test_schema_rejects_a_misspelt_field(path):
    doc = copy.deepcopy(load_all(RAYJOBS["distill"])[0])
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = True
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        validate(doc)


def test_schema_rejects_wrong_kind_and_values():
    doc = load_all(RAYJOBS["batch"])[0]
    for path, value in [(("apiVersion",), "ray.io/v1alpha1"), (("spec", "submissionMode"), "K8sMode"),
                        (("spec", "shutdownAfterJobFinishes"), "yes"),
                        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replicas"), -1)]:
        bad = copy.deepcopy(doc)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            validate(bad)


@pytest.mark.parametrize("job", sorted(RAYJOBS))
def test_rayjob_shuts_down_runs_the_image_workdir_and_uses_the_service_account(job):
    doc = load_all(RAYJOBS[job])[0]
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    workdir = re.search(r"^WORKDIR\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), flags=re.M).group(1)
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": workdir}
    groups = [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
    sa = {d["metadata"]["name"] for d in load_all(KUBERAY / "serviceaccount.yaml") if d["kind"] == "ServiceAccount"}
    for group in groups:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] in sa
        for c in pod["containers"]:
            assert {"secretRef": {"name": "musiccm-s3", "optional": True}} in c.get("envFrom", []), c["name"]
            assert any(e["name"] == "AWS_REGION" for e in c.get("env", [])), c["name"]


def test_service_account_is_irsa_annotated():
    (sa,) = [d for d in load_all(KUBERAY / "serviceaccount.yaml") if d["kind"] == "ServiceAccount"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/.+", sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])


@pytest.mark.parametrize("job", sorted(RAYJOBS))
def test_rayjob_resources_fit_its_worker_groups(job):
    spec = load_all(RAYJOBS[job])[0]["spec"]
    argv = shlex.split(spec["entrypoint"])
    units, cpu, gpu = job_needs(argv)
    assert gpu == 1, f"{job}: the cluster job must use GPUs"
    head_cpus, head_gpus = pod_resources(spec["rayClusterSpec"]["headGroupSpec"])
    assert head_cpus == 0 and head_gpus == 0, "no Ray work on the head"
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    # Capacity present when KubeRay submits (it waits for `replicas` pods): the batch pool is sized from it.
    at_start = [(g.get("replicas", g.get("minReplicas", 0)), *pod_resources(g)) for g in groups]
    assert all(count > 0 and gpus > 0 for count, _, gpus in at_start), at_start
    assert fits((units, cpu, gpu), at_start), f"{job}: {units} x ({cpu} CPU, {gpu} GPU) do not fit {at_start}"
    # distill.py's preflight also wants one CPU beyond the workers' for Ray Data's read tasks.
    assert units * cpu + 1 <= sum(count * cpus for count, cpus, _ in at_start) + head_cpus
    for g in groups:
        assert g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 2**31 - 1)


def test_rayjob_resource_check_can_fail():
    spec = load_all(RAYJOBS["distill"])[0]["spec"]
    units, cpu, gpu = job_needs(shlex.split(spec["entrypoint"]))
    nodes = [(g["replicas"], *pod_resources(g)) for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    assert fits((units, cpu, gpu), nodes)
    assert not fits((units + 1, cpu, gpu), nodes)
    assert not fits((units, 200.0, gpu), nodes)


def test_raycluster_fits_the_readme_commands_at_full_scale():
    (doc,) = load_all(KUBERAY / "raycluster.yaml")
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"]["mode"] == "token"
    assert pod_resources(spec["headGroupSpec"]) == (0.0, 0)
    nodes = [(g["maxReplicas"], *pod_resources(g)) for g in spec["workerGroupSpecs"]]
    assert all(gpus > 0 for _, _, gpus in nodes)
    for argv in readme_commands(CLUSTER / "README.md"):
        if any(v and v.startswith("s3://") for v in flags_of(argv).values()):
            assert fits(job_needs(argv), nodes), f"{shlex.join(argv)} does not fit raycluster.yaml at maxReplicas"


# ---------------------------------------------------------------- AWS cluster launcher


@functools.cache
def aws_config() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((CLUSTER / "aws.yaml").read_text()))
    validate_config(config)  # Ray's own ray-schema.json: unknown or misspelt keys fail here
    return config


def test_aws_yaml_passes_ray_launcher_schema_and_rejects_typos():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = aws_config()
    assert config["provider"]["type"] == "aws" and config["docker"]["image"]
    bad = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    bad["available_node_types"]["gen_1x"]["min_worker"] = bad["available_node_types"]["gen_1x"].pop("min_workers")
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(bad))


def test_aws_every_node_has_an_instance_profile_and_gpu_workers_declare_gpus():
    config = aws_config()
    head = config["head_node_type"]
    for name, node in config["available_node_types"].items():
        profile = node["node_config"].get("IamInstanceProfile", {})
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/.+", profile.get("Arn", "")), name
        if name == head:
            assert node["resources"].get("CPU") == 0 and not node["resources"].get("GPU")
        else:
            assert node["resources"].get("GPU", 0) >= 1 and node["max_workers"] >= 1, name
    workers = sum(n["max_workers"] for k, n in config["available_node_types"].items() if k != head)
    assert workers <= config["max_workers"]
    # Token auth: every node gets the client's token and the mode (DESIGN.md §5).
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert any(o.startswith("-e AWS_REGION=") for o in config["docker"]["run_options"])


def test_aws_node_types_fit_the_readme_commands():
    config = aws_config()
    nodes = [(n["max_workers"], n["resources"].get("CPU", 0), n["resources"].get("GPU", 0))
             for k, n in config["available_node_types"].items() if k != config["head_node_type"]]
    commands = [a for a in readme_commands(CLUSTER / "README.md")
                if any(v and v.startswith("s3://") for v in flags_of(a).values())]
    assert {a[1] for a in commands} == set(SCRIPTS), "cluster/README.md shows both cluster commands"
    for argv in commands:
        assert fits(job_needs(argv), nodes), f"{shlex.join(argv)} does not fit aws.yaml's node types"


# ---------------------------------------------------------------- container image


def test_dockerfile_installs_the_project_like_the_readme_with_pins_inside_pyproject():
    from packaging.requirements import Requirement

    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, flags=re.M).group(1)
    assert re.fullmatch(r"rayproject/ray:2\.60\.\d+-py311(-gpu|-cu\d+)", base), base
    assert "pip install --no-cache-dir -e ." in text
    assert "--no-deps audioldm_eval==0.0.3 ssr_eval==0.0.7" in text
    assert "[dev]" not in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {Requirement(r).name.lower().replace("_", "-"): Requirement(r) for r in project["dependencies"]}
    pins = dict(re.findall(r'"?([A-Za-z0-9_.\-]+)(?:\[[\w,]+\])?==([0-9][\w.]*)"?', text))
    pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    for name, req in wanted.items():
        assert name in pins, f"Dockerfile does not pin {name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"
    for directory in ("musiccm/", "ray_jobs/"):
        assert re.search(rf"^COPY .*{directory}", text, flags=re.M), directory
