"""Both jobs on a two-node Ray cluster on this machine, submitted exactly as the KubeRay manifests submit them.

    python cluster/multinode_local.py [--jobs batch distill] [--workdir DIR] [--report report.json]

1. A real S3 server (SeaweedFS, `musiccm.testing.seaweed`) with bucket `musiccm`; a tiny teacher, a tiny
   student, a prompt manifest and a captioned training manifest are uploaded to it.
2. Two Ray nodes as separate process groups: `ray start --head --block` and `ray start --address=HEAD
   --block`, each with its own free ports, logical CPUs and a custom resource naming it (`head`, `node2`),
   token authentication on (RAY_AUTH_MODE=token with a fresh RAY_AUTH_TOKEN, as DESIGN.md §5 describes; the
   token never touches ~/.ray).
3. Each job is submitted with `ray job submit --working-dir . --runtime-env-json '{"env_vars": {AWS_*}}'
   -- python ray_jobs/...`, whose argv is the manifest's `spec.entrypoint` (cluster/kuberay/rayjob-*.yaml)
   with the S3 URIs and sizes replaced for this machine and CPU-only tuning flags added (`localize`).
4. Checks: the job succeeded; its results are on S3; work ran on BOTH nodes (node ids of the batch metric
   rows; node ids of the Train workers in the distillation's reports).
5. Teardown kills the process groups it started (and any stray process carrying this run's marker in its
   environment), never `ray stop`, which would stop every Ray instance on the machine.

Exit code 0 when every check passes, 1 otherwise; the report (JSON) goes to stdout and to --report.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from musiccm.testing.seaweed import SeaweedFS, free_ports, worker_port_ranges

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = {job: ROOT / f"cluster/kuberay/rayjob-{job}.yaml" for job in ("batch", "distill")}
BUCKET = "musiccm"
MARKER = "MUSICCM_MULTINODE_RUN"  # set in every process this script starts (for the final sweep)
# Logical CPUs: a batch actor takes 2 (`--cpus-per-actor 2`), so exactly one fits on each node and the
# head keeps one CPU for Ray Data's read tasks; Train workers take 1 each.
HEAD_CPUS, NODE2_CPUS = 3, 2
OBJECT_STORE_BYTES = 200 * 1024**2


# ---------------------------------------------------------------- entrypoints from the manifests


def manifest_argv(job: str) -> list[str]:
    """The argv of a RayJob manifest's `spec.entrypoint` (`python ray_jobs/... --flag value ...`)."""
    import yaml

    doc = yaml.safe_load(MANIFESTS[job].read_text())
    return shlex.split(doc["spec"]["entrypoint"])


def flag_values(argv: list[str]) -> dict[str, str | None]:
    """`--flag value` pairs of an argv after `python script` (a switch maps to None)."""
    out: dict[str, str | None] = {}
    rest = argv[2:]
    for i, tok in enumerate(rest):
        if tok.startswith("--"):
            nxt = rest[i + 1] if i + 1 < len(rest) else None
            out[tok] = nxt if nxt is not None and not nxt.startswith("--") else None
        elif i == 0 or not rest[i - 1].startswith("--"):
            raise ValueError(f"entrypoint {shlex.join(argv)!r}: stray argument {tok!r}")
    return out


def localize(
    argv: list[str], replace: dict[str, str], drop: tuple[str, ...] = (), add: tuple[str, ...] = ()
) -> list[str]:
    """The manifest's command with flag values replaced, switches in `drop` removed and `add` appended."""
    flags = flag_values(argv)
    missing = sorted(set(replace) - set(flags))
    if missing:
        raise ValueError(f"entrypoint {shlex.join(argv)!r} has no {missing}; the manifest and this script disagree")
    out = argv[:2]
    for flag, value in flags.items():
        if flag in drop:
            continue
        out.append(flag)
        if flag in replace:
            out.append(replace[flag])
        elif value is not None:
            out.append(value)
    return [*out, *add]


def local_commands(s3: str, run: str) -> dict[str, list[str]]:
    """The two local entrypoints: the manifests' commands on this machine's S3 and CPUs."""
    batch = localize(
        manifest_argv("batch"),
        {"--manifest": f"{s3}/manifests/prompts.parquet", "--output": f"{s3}/gen/{run}",
         "--model": f"{s3}/models/tiny-student", "--num-actors": "2"},
        # CPU-only: one actor per node (2 logical CPUs each), one torch thread, one clip per block so the
        # four rows make four blocks that the two actors share.
        add=("--cpus-per-actor", "2", "--torch-threads", "1", "--batch-size", "1", "--progress-s", "5"),
    )
    distill = localize(
        manifest_argv("distill"),
        {"--teacher": f"{s3}/models/tiny-teacher", "--train-manifest": f"{s3}/manifests/train.parquet",
         "--storage": f"{s3}/runs", "--name": f"distill-{run}", "--num-workers": "2", "--max-steps": "2"},
        drop=("--use-gpu",),
        add=DISTILL_LOCAL_FLAGS,
    )
    return {"batch": batch, "distill": distill}


# Tiny-run flags for the distillation: two gloo workers of 2 logical CPUs each, so Train's PACK placement
# cannot put both on the head (3 CPUs) and the head keeps one CPU for Ray Data's read tasks; a checkpoint at
# every step, no validation audio, the small test ViT as discriminator features.
DISTILL_LOCAL_FLAGS: tuple[str, ...] = (
    "--cpus-per-worker", "2", "--batch-size", "1", "--checkpoint-every", "1", "--validate-every", "0",
    "--tiny-feature-network",
)


# ---------------------------------------------------------------- inputs on S3


def stage_inputs(s3_uri: str, workdir: Path) -> dict[str, int]:
    """Upload a tiny teacher and student and the two manifests; returns row counts."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from musiccm import audio_io, model, storage
    from musiccm.build import build_components
    from musiccm.student import as_student

    torch.set_num_threads(1)
    teacher = build_components("tiny", seed=0)
    for name, comps in (("tiny-teacher", teacher), ("tiny-student", as_student(teacher))):
        local = model.save(comps, workdir / "models" / name)
        storage.upload_dir(str(local), f"{s3_uri}/models/{name}")
    prompts = pa.table({
        "id": [f"clip-{i}" for i in range(4)],
        "prompt": ["calm solo piano", "upbeat jazz trio", "ambient drone", "rock drums and bass"],
        "duration_s": [1.28, 1.28, 1.28, 1.28],
        "seed": [0, 1, 2, 3],
        "steps": [1, 1, 1, 1],
    })
    sr = teacher.geometry.sample_rate
    t = np.arange(int(1.28 * sr)) / sr
    clips = [audio_io.encode((0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32), sr, "wav", {})
             for f in (220.0, 330.0, 440.0, 550.0)]
    train = pa.table({"audio": pa.array(clips, pa.binary()),
                      "caption": ["a low tone", "a mid tone", "a high tone", ""]})
    for name, table in (("prompts", prompts), ("train", train)):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(f"{s3_uri}/manifests/{name}.parquet", buf.getvalue())
    return {"prompts": prompts.num_rows, "train": train.num_rows}


# ---------------------------------------------------------------- a two-node Ray cluster


@dataclass
class LocalRay:
    """A head and a second node, each `ray start --block` in its own process group."""

    workdir: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    def _node_ports(self, prefix: str) -> list[str]:
        names = ["node-manager-port", "object-manager-port", "metrics-export-port", "runtime-env-agent-port",
                 "dashboard-agent-grpc-port", "dashboard-agent-listen-port"]
        ports = free_ports(len(names))
        self.ports.update({f"{prefix}.{n}": p for n, p in zip(names, ports, strict=True)})
        return [f"--{n}={p}" for n, p in zip(names, ports, strict=True)]

    def _spawn(self, name: str, args: list[str], worker_ports: tuple[int, int]) -> None:
        ray = str(Path(sys.executable).parent / "ray")
        cmd = [ray, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
               f"--object-store-memory={OBJECT_STORE_BYTES}",
               f"--min-worker-port={worker_ports[0]}", f"--max-worker-port={worker_ports[1]}", *args]
        with open(self.workdir / f"ray-{name}.log", "wb") as log:  # the child keeps its own descriptor
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env=self.env, cwd=self.workdir, start_new_session=True)

    def start(self) -> None:
        """Spawn the head, then (once its GCS port answers) the second node; `wait_nodes(2)` waits for both."""
        gcs, dash, client = free_ports(3)
        self.ports.update(gcs=gcs, dashboard=dash, client=client)
        head_workers, node2_workers = worker_port_ranges(2)
        self._spawn("head", ["--head", f"--port={gcs}", f"--temp-dir={self.workdir / 'ray'}",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--ray-client-server-port={client}", f"--num-cpus={HEAD_CPUS}", "--num-gpus=0",
                             '--resources={"head": 1}', *self._node_ports("head")], head_workers)
        self._wait_port(gcs, "head", timeout_s=60)
        # Its own temp dir: two nodes sharing one would share runtime_resources/, and one node's runtime-env
        # agent would delete the job's working dir under the other node's driver.
        self._spawn("node2", [f"--address=127.0.0.1:{gcs}", f"--temp-dir={self.workdir / 'ray2'}",
                              f"--num-cpus={NODE2_CPUS}", "--num-gpus=0", '--resources={"node2": 1}',
                              *self._node_ports("node2")], node2_workers)

    def _wait_port(self, port: int, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"ray {name} exited with {self.procs[name].returncode}:\n{self.log_tail(name)}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            time.sleep(0.2)
        raise RuntimeError(f"ray {name}: port {port} not open after {timeout_s:.0f} s\n{self.log_tail(name)}")

    def nodes(self) -> list[dict[str, Any]]:
        """Alive nodes from the dashboard's state API: node_id, is_head_node, resources_total."""
        out = self.ray_cli(["list", "nodes", "--address", self.dashboard, "--format", "json", "--detail"], timeout=60)
        return [n for n in json.loads(out) if n.get("state") == "ALIVE"]

    def wait_nodes(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"ray {name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                if len(self.nodes()) >= n:
                    return
            except (subprocess.SubprocessError, json.JSONDecodeError, OSError) as exc:
                last = str(exc)
            time.sleep(1.0)
        raise RuntimeError(f"{n} Ray node(s) not up after {timeout_s:.0f} s ({last})\n{self.log_tail('head')}")

    def ray_cli(self, args: list[str], timeout: float) -> str:
        ray = str(Path(sys.executable).parent / "ray")
        res = subprocess.run([ray, *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            what = " ".join(args[:2])
            raise subprocess.SubprocessError(f"ray {what} failed ({res.returncode}): {res.stderr[-2000:]}")
        return res.stdout

    def log_tail(self, name: str, n: int = 3000) -> str:
        path = self.workdir / f"ray-{name}.log"
        return path.read_bytes()[-n:].decode(errors="replace") if path.exists() else "(no log)"

    def stop(self) -> None:
        """SIGTERM each process group, then SIGKILL what is left; never `ray stop`."""
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def sweep(marker: str) -> list[str]:
    """SIGKILL every process whose environment carries this run's marker (job drivers run in their own
    sessions; Ray workers may outlive a killed raylet for a moment). Returns `pid cmdline` of each."""
    killed, names = [], []
    needle = f"{MARKER}={marker}".encode()
    for _ in range(3):
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
                    names.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:80])
            except OSError:
                continue
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed += found
        if not found:
            break
        time.sleep(0.5)
    return [f"{pid} {name}" for pid, name in zip(killed, names, strict=False)]


# ---------------------------------------------------------------- jobs


def submit(cluster: LocalRay, name: str, argv: list[str], env_vars: dict[str, str], timeout_s: float) -> dict:
    """`ray job submit --working-dir . --runtime-env-json ... -- <argv>`, blocking; returns status and log tail."""
    runtime_env = {"env_vars": env_vars, "excludes": [".git", ".venv", "outputs", "**/__pycache__"]}
    sub_id = f"{name}-{uuid.uuid4().hex[:8]}"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.dashboard,
           "--submission-id", sub_id, "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env),
           "--", *argv]
    log_path = cluster.workdir / f"job-{name}.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(subprocess.SubprocessError):
                cluster.ray_cli(["job", "stop", "--address", cluster.dashboard, sub_id], timeout=30)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -1
    text = log_path.read_bytes().decode(errors="replace")
    return {"submission_id": sub_id, "command": shlex.join(argv), "returncode": rc,
            "wall_s": round(time.monotonic() - t0, 1), "log": str(log_path), "log_tail": text[-4000:]}


def check_batch(s3: str, run: str, nodes: dict[str, str], rows: int) -> dict:
    """Every clip's audio and metric row on S3; the metric rows' node ids cover both nodes."""
    from musiccm import results, storage

    out = f"{s3}/gen/{run}"
    metrics = results.read_metrics(out)
    audio = storage.list_files(f"{out}/audio")
    summary = results.read_summary(out)
    seen = sorted(set(metrics.column("node_id").to_pylist()))
    per_node = {role: metrics.column("node_id").to_pylist().count(nid) for role, nid in nodes.items()}
    return {
        "output": out, "metric_rows": metrics.num_rows, "audio_files": len(audio), "status": summary["status"],
        "node_ids_in_metrics": seen, "rows_per_node": per_node,
        "ok_results": metrics.num_rows == rows and len(audio) == rows and summary["status"] == "ok",
        "ok_both_nodes": set(seen) == set(nodes.values()),
    }


def check_distill(cluster: LocalRay, s3: str, run: str, nodes: dict[str, str]) -> dict:
    """Checkpoints (with every rank's file) and the exported student on S3; Train workers on both nodes.

    The job's own records (summary.json, checkpoints, metric shards) carry no node ids, so the Train
    workers' nodes come from Ray's state API (`ray list actors`, class RayTrainWorker), which keeps
    finished actors; any `node_id(s)` the job records in its JSON files are reported beside them."""
    from musiccm import storage

    run_dir = f"{s3}/runs/distill-{run}"
    files = storage.list_files(run_dir)
    summary = json.loads(storage.read_bytes(f"{run_dir}/summary.json"))
    rank_files = sorted({f.rsplit("/", 1)[-1] for f in files if "/checkpoint-" in f and "/rank-" in f})
    exported = storage.exists(f"{run_dir}/export/model_index.json")
    actors = json.loads(cluster.ray_cli(["list", "actors", "--address", cluster.dashboard, "--format", "json",
                                         "--detail", "--limit", "10000", "--filter", "class_name=RayTrainWorker"],
                                        timeout=60))
    state_api = sorted({a["node_id"] for a in actors})
    recorded = sorted(set(distill_worker_nodes(files)))
    return {
        "run_dir": run_dir, "status": summary.get("status"), "step": summary.get("step"),
        "checkpoints": summary.get("checkpoints"), "rank_files": rank_files, "export": summary.get("export"),
        "train_workers": len(actors), "train_worker_node_ids": state_api,
        "train_worker_node_ids_recorded_by_job": recorded or None,
        "ok_results": summary.get("status") == "ok" and exported and len(rank_files) >= 2,
        "ok_both_nodes": set(state_api) == set(nodes.values()) and (not recorded or set(recorded) == set(state_api)),
    }


def distill_worker_nodes(files: list[str]) -> list[str]:
    """Node ids the distillation job records in the JSON files of its run (if it ever does)."""
    from musiccm import storage

    ids: list[str] = []
    for uri in files:
        if uri.endswith(".json"):
            with contextlib.suppress(ValueError, storage.StorageError):
                ids += _find_node_ids(json.loads(storage.read_bytes(uri)))
    return ids


def _find_node_ids(doc: Any) -> list[str]:
    """Values of any `node_id` / `node_ids` / `worker_node_ids` key in a JSON document."""
    found: list[str] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k in ("node_id", "node_ids", "worker_node_ids") and isinstance(v, str):
                found.append(v)
            elif k in ("node_ids", "worker_node_ids") and isinstance(v, list):
                found += [x for x in v if isinstance(x, str)]
            else:
                found += _find_node_ids(v)
    elif isinstance(doc, list):
        for v in doc:
            found += _find_node_ids(v)
    return found


# ---------------------------------------------------------------- main


def run(jobs: list[str], workdir: Path, timeout_s: float) -> dict:
    """Start S3 and the two nodes, stage the inputs, run and check each job, tear everything down."""
    marker = uuid.uuid4().hex
    report: dict[str, Any] = {"jobs": {}, "workdir": str(workdir)}
    t0 = time.monotonic()
    s3 = SeaweedFS(data_dir=str(workdir / "s3"))
    cluster: LocalRay | None = None
    try:
        s3.start()
        s3.make_bucket(BUCKET)
        # The Ray nodes get no S3 settings: the jobs receive them through runtime_env env_vars, as on a
        # cluster without instance profiles (DESIGN.md §5).
        venv_bin = str(Path(sys.executable).parent)
        dropped = ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in dropped}
        env.update({MARKER: marker, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
                    "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                    "HF_HUB_OFFLINE": "1"})
        cluster = LocalRay(workdir, env)
        cluster.start()  # boots while the inputs are staged
        os.environ.update(s3.env)  # this process stages inputs and reads results through musiccm.storage
        s3_uri = f"s3://{BUCKET}"
        report["inputs"] = stage_inputs(s3_uri, workdir)
        report["staged_s"] = round(time.monotonic() - t0, 1)
        cluster.wait_nodes(2, timeout_s=120)
        nodes = {("head" if n["is_head_node"] else "node2"): n["node_id"] for n in cluster.nodes()}
        report.update(cluster_up_s=round(time.monotonic() - t0, 1), nodes=nodes)
        run_id = uuid.uuid4().hex[:8]
        commands = local_commands(s3_uri, run_id)
        # The batch pool waits for both actors before handing out blocks, so the four rows are shared.
        job_env = {**s3.env, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120", "OMP_NUM_THREADS": "1",
                   "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        for job in jobs:
            res = submit(cluster, job, commands[job], job_env, timeout_s)
            if res["returncode"] == 0:
                if job == "batch":
                    res["checks"] = check_batch(s3_uri, run_id, nodes, report["inputs"]["prompts"])
                else:
                    res["checks"] = check_distill(cluster, s3_uri, run_id, nodes)
            report["jobs"][job] = res
    finally:
        if cluster is not None:
            cluster.stop()
        report["swept_pids"] = sweep(marker)
        s3.stop()
    report["total_s"] = round(time.monotonic() - t0, 1)
    report["ok"] = bool(report["jobs"]) and all(
        j["returncode"] == 0 and j.get("checks", {}).get("ok_results") and j.get("checks", {}).get("ok_both_nodes")
        for j in report["jobs"].values())
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", nargs="+", choices=["batch", "distill"], default=["batch", "distill"])
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, S3 data)")
    p.add_argument("--timeout-s", type=float, default=420.0, help="per-job limit in seconds (default 420)")
    p.add_argument("--report", default=None, help="also write the JSON report to this file")
    args = p.parse_args(argv)
    # Short paths: Ray's unix sockets live under the temp dir and must stay under 108 characters.
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mcm-mn-", dir="/tmp")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args.jobs, workdir, args.timeout_s)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        Path(args.report).write_text(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
