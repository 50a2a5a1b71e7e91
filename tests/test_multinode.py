"""Both jobs on a real two-node Ray cluster (two `ray start` process groups) with a real S3 server.

Runs `cluster/multinode_local.py` as a user would and checks its report: the jobs were submitted with the
manifests' entrypoints, they succeeded, their results are on S3, and BOTH nodes did work: the batch metric
rows carry both node ids, and the two Train workers ran one on each node. Then checks that nothing of the
cluster is left running. About 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def leftover_processes(workdir: Path) -> list[str]:
    """Command lines of processes that still mention the run's scratch dir (raylet, GCS, dashboard...)."""
    needle = str(workdir).encode()
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmdline:
                text = cmdline.replace(b"\0", b" ")[:200].decode(errors="replace")
                out.append(f"{entry.name}: {text}")
    return out


@pytest.fixture(scope="module")
def report():
    # A short path under /tmp: Ray's unix sockets live below it and must stay under 108 characters.
    workdir = Path(tempfile.mkdtemp(prefix="mcm-mn-", dir="/tmp"))
    out = workdir / "report.json"
    try:
        res = subprocess.run(
            [sys.executable, "cluster/multinode_local.py", "--workdir", str(workdir), "--report", str(out),
             "--timeout-s", "420"],
            cwd=ROOT, capture_output=True, text=True, timeout=900,
        )
        assert out.exists(), f"no report (exit {res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
        data = json.loads(out.read_text())
        data["_returncode"], data["_leftovers"] = res.returncode, leftover_processes(workdir)
        yield data
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def describe(report: dict) -> str:
    return json.dumps(report, indent=1)[-6000:]


def test_both_jobs_succeed_with_the_manifest_entrypoints(report):
    assert report["_returncode"] == 0 and report["ok"], describe(report)
    assert set(report["jobs"]) == {"batch", "distill"}
    scripts = {"batch": "ray_jobs/batch_generate.py", "distill": "ray_jobs/distill.py"}
    for job, res in report["jobs"].items():
        argv = shlex.split(res["command"])
        assert argv[:2] == ["python", scripts[job]] and res["returncode"] == 0, res.get("log_tail")


def test_two_distinct_nodes(report):
    nodes = report["nodes"]
    assert set(nodes) == {"head", "node2"} and len(set(nodes.values())) == 2, nodes


def test_batch_results_on_s3_and_metric_rows_from_both_nodes(report):
    checks = report["jobs"]["batch"]["checks"]
    rows = report["inputs"]["prompts"]
    assert checks["metric_rows"] == rows and checks["audio_files"] == rows and checks["status"] == "ok", checks
    assert set(checks["node_ids_in_metrics"]) == set(report["nodes"].values()), checks
    assert all(n >= 1 for n in checks["rows_per_node"].values()) and sum(checks["rows_per_node"].values()) == rows


def test_distillation_checkpoints_export_and_train_workers_on_both_nodes(report):
    checks = report["jobs"]["distill"]["checks"]
    assert checks["status"] == "ok" and checks["step"] == 2, checks
    assert [c.rsplit("/", 1)[-1] for c in checks["checkpoints"]] == ["checkpoint-000001", "checkpoint-000002"]
    assert checks["rank_files"] == ["rank-00000.json", "rank-00001.json"], checks
    assert checks["export"] and checks["export"].startswith("s3://"), checks
    assert checks["train_workers"] == 2, checks
    assert set(checks["train_worker_node_ids"]) == set(report["nodes"].values()), checks


def test_nothing_left_running(report):
    assert report["_leftovers"] == [], report["_leftovers"]
