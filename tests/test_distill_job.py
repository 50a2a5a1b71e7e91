"""The distillation job end to end: `ray_jobs/distill.py`'s main() on local Ray, a real S3 server (SeaweedFS).

Fast tests: the CLI (every DistillConfig field is a documented flag) and the preflight errors (exit 2, one
line, nothing started). Slow tests: a 2-worker CPU TorchTrainer (gloo DDP) on the tiny teacher and a tiny
captioned data set in S3 (bytes rows, uri rows, one corrupt row): an injected rank-1 failure is recovered
from the last checkpoint with no repeated step, a rerun with the same name resumes, checkpoints and
validation land in S3, and the exported student generates audio through the foundation's API.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from musiccm import model, storage
from musiccm.defaults import DEFAULT_MODEL
from musiccm.distill.config import DistillConfig
from musiccm.jobs import distill_args
from musiccm.jobs.distill_loop import ShardStream, next_batch
from musiccm.testing.seaweed import SeaweedFS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "ray_jobs" / "distill.py"
RUNS = "s3://runs/distill"
MANIFEST = "s3://data/train.parquet"
NAME = "t1"
RUN = f"{RUNS}/{NAME}"
PROMPTS = ["calm piano", "fast drums"]
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def load_script():
    spec = importlib.util.spec_from_file_location("distill_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


distill = load_script()


def run_main(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """main(argv) in-process with extra env vars; (exit code, captured stdout)."""
    out = io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out):
            rc = distill.main(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rc, out.getvalue()


# ---------------------------------------------------------------- data


def clip_bytes(seed: int, fmt: str, sample_rate: int, channels: int, seconds: float = 2.0) -> bytes:
    """A sine chord + noise mixture, encoded with soundfile."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    freqs = rng.uniform(110, 880, size=3)
    x = sum(0.2 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in freqs) + 0.05 * rng.standard_normal(t.size)
    data = np.stack([x * (1 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, data, sample_rate, format=fmt)
    return buf.getvalue()


def write_manifest(uri: str, rows: list[dict]) -> None:
    schema = pa.schema([("uri", pa.string()), ("audio", pa.binary()), ("caption", pa.string())])
    fs, path = storage.pyarrow_fs(uri)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, filesystem=fs)


def training_rows() -> list[dict]:
    """8 rows (an even split over 2 workers): 4 as bytes, 3 as S3 uris, 1 corrupt; 2 without caption."""
    rows = []
    captions = ["calm piano melody", "", "upbeat drums and bass", "ambient synth pad", "jazz trio", "",
                "rock guitar riff"]
    for i, caption in enumerate(captions):
        data = clip_bytes(i, "FLAC" if i % 2 else "WAV", 22050 if i % 3 else 16000, 1 + i % 2)
        if i < 4:
            rows.append({"uri": None, "audio": data, "caption": caption})
        else:
            uri = f"s3://data/audio/clip-{i}.{'flac' if i % 2 else 'wav'}"
            storage.write_bytes(uri, data)
            rows.append({"uri": uri, "audio": None, "caption": caption})
    rows.append({"uri": None, "audio": b"this is not audio", "caption": "corrupt"})
    return rows


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def s3() -> Iterator[SeaweedFS]:
    """SeaweedFS with buckets `data` (manifest, audio) and `runs`; the AWS env points at it for the module."""
    with SeaweedFS() as server:
        server.make_bucket("data")
        server.make_bucket("runs")
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            write_manifest(MANIFEST, training_rows())
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def ray_local(s3: SeaweedFS) -> Iterator[None]:
    """A private local Ray instance (started after the AWS env is set, so its workers inherit it)."""
    import ray

    # Ray 2.60's Train PlacementGroupCleaner (a detached actor) asks the state API whether the controller is
    # alive, locating the API server by auto-detection, not through its own cluster. On a machine where someone
    # else ran `ray start`, it asks THAT cluster, does not find our controller, declares it dead and removes our
    # live placement group, killing the workers. An unreachable API server address (inherited by every Ray
    # process of this instance) makes it report "state API unavailable" and keep monitoring instead.
    saved = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = "http://127.0.0.1:9"
    ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False,
             log_to_driver=os.environ.get("MUSICCM_TEST_RAY_LOGS") == "1")
    try:
        yield
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = saved


def job_argv(teacher: str, max_steps: int) -> list[str]:
    return [
        "--teacher", teacher, "--train-manifest", MANIFEST, "--storage", RUNS, "--name", NAME,
        "--num-workers", "2", "--cpus-per-worker", "0.5", "--max-steps", str(max_steps), "--batch-size", "2",
        "--checkpoint-every", "2", "--keep-checkpoints", "2", "--validate-every", "4",
        "--validation-prompts", *PROMPTS, "--validation-steps", "1", "2", "4", "--max-failures", "1",
        "--tiny-feature-network", "--warmup-steps", "2", "--lr", "1e-4", "--seed", "0",
        "--student-init", teacher,  # the worker's load_unet path (the same weights, so nothing else changes)
        "--dmd-weight", "0.5", "--fake-updates", "1",  # the fake score: a third DDP module, checkpointed and resumed
        "--gan-weight", "0.1",  # and DMD2's classifier on it, a fourth
    ]


@dataclass
class Outcome:
    rc: int
    stdout: str
    summary: dict
    history: list[dict]


def read_history() -> list[dict]:
    rows = []
    for uri in storage.list_files(f"{RUN}/metrics", suffix=".parquet"):
        rows += pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()
    return sorted(rows, key=lambda r: r["step"])


@pytest.fixture(scope="module")
def first_run(ray_local: None, tiny_teacher_dir: str) -> Outcome:
    """4 steps, checkpoints every 2, rank 1 fails once at step 3 (test hook), max_failures=1."""
    rc, out = run_main(job_argv(str(tiny_teacher_dir), 4), {distill_args.FAIL_HOOK_ENV: "1:3"})
    summary = json.loads(storage.read_bytes(f"{RUN}/summary.json"))
    return Outcome(rc, out, summary, read_history())


@pytest.fixture(scope="module")
def rerun(first_run: Outcome, tiny_teacher_dir: str) -> Outcome:
    """The same command with --max-steps 6: resumes from the first run's last checkpoint.

    With --report-every-s 3600 step 5 (no checkpoint, no validation) is not reported to Ray Train: its metrics
    must still reach the history."""
    rc, out = run_main([*job_argv(str(tiny_teacher_dir), 6), "--report-every-s", "3600"])
    summary = json.loads(storage.read_bytes(f"{RUN}/summary.json"))
    return Outcome(rc, out, summary, read_history())


# ---------------------------------------------------------------- CLI (fast)


def test_help_documents_every_config_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert distill.main(["--help"]) == 0
    text = capsys.readouterr().out
    for f in fields(DistillConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert f.name in distill_args.HELP, f"no help text for {f.name}"
    assert "guidance_scale = w + 1" in " ".join(text.split())  # --w names its convention


def test_flags_map_onto_the_config() -> None:
    parser = distill_args.build_parser()
    args = parser.parse_args(["--train-manifest", "m.parquet"])
    assert distill_args.to_config(args) == DistillConfig(train_manifest="m.parquet")
    assert distill_args.to_config(args).teacher == DEFAULT_MODEL
    args = parser.parse_args(["--train-manifest", "m", "--w-min", "1", "--w-max", "3", "--use-gpu", "--lora-rank",
                              "8", "--validation-steps", "1", "4", "--disc-layers", "1", "3", "--loss-type", "l2",
                              "--adv-timesteps", "699", "359", "--report-every-s", "0"])
    c = distill_args.to_config(args)
    assert (c.w_min, c.w_max, c.use_gpu, c.lora_rank, c.loss_type) == (1.0, 3.0, True, 8, "l2")
    assert c.report_every_s == 0.0
    assert c.validation_steps == (1, 4) and c.disc_layers == (1, 3) and c.adv_timesteps == (699, 359)
    assert distill_args.fail_hook({}) is None and distill_args.fail_hook({distill_args.FAIL_HOOK_ENV: "1:3"}) == (1, 3)
    with pytest.raises(ValueError, match="RANK:STEP"):
        distill_args.fail_hook({distill_args.FAIL_HOOK_ENV: "x"})


# ---------------------------------------------------------------- preflight (fast: no Ray worker starts)


def local_manifest(tmp_path: Path, rows: list[dict] | None = None, schema: pa.Schema | None = None) -> str:
    path = str(tmp_path / "train.parquet")
    schema = schema or pa.schema([("uri", pa.string()), ("caption", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows or [], schema=schema), path)
    return path


def expect_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    assert distill.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_preflight_teacher_without_unet(tmp_path: Path, tiny_teacher_dir: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    broken = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, broken)
    shutil.rmtree(broken / "unet")
    manifest = local_manifest(tmp_path, [{"uri": "a.wav", "caption": "x"}])
    expect_usage_error(["--teacher", str(broken), "--train-manifest", manifest, "--storage", str(tmp_path / "r")],
                       capsys, "--teacher", "unet")
    (broken / "unet").mkdir()  # a unet folder without weights is refused too
    (broken / "unet" / "config.json").write_text("{}")
    expect_usage_error(["--teacher", str(broken), "--train-manifest", manifest, "--storage", str(tmp_path / "r")],
                       capsys, "--teacher", "safetensors")


def test_preflight_student_init(tmp_path: Path, tiny_teacher_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    manifest = local_manifest(tmp_path, [{"uri": "a.wav", "caption": "x"}])
    argv = ["--teacher", tiny_teacher_dir, "--train-manifest", manifest, "--storage", str(tmp_path / "r")]
    expect_usage_error([*argv, "--student-init", str(tmp_path / "nowhere")], capsys, "--student-init", "nowhere")
    other = tmp_path / "other"
    shutil.copytree(tiny_teacher_dir, other)
    config = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**config, "layers_per_block": 3}))
    expect_usage_error([*argv, "--student-init", str(other)], capsys, "--student-init", "layers_per_block = 3",
                       "teacher's architecture")


def test_preflight_manifests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ["--storage", str(tmp_path / "runs")]
    empty = local_manifest(tmp_path)
    expect_usage_error(["--train-manifest", empty, *store], capsys, "0 rows")
    wrong = local_manifest(tmp_path, [{"path": "a.wav"}], pa.schema([("path", pa.string())]))
    expect_usage_error(["--train-manifest", wrong, *store], capsys, "neither `uri` nor `audio`")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    expect_usage_error(["--train-manifest", str(junk), *store], capsys, "not a readable Parquet")
    expect_usage_error(["--train-manifest", str(tmp_path / "missing.parquet"), *store], capsys, "no such file")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.json"))


def test_preflight_num_workers_and_storage(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           s3: SeaweedFS) -> None:
    manifest = local_manifest(tmp_path, [{"uri": "a.wav", "caption": "x"}])
    expect_usage_error(["--train-manifest", manifest, "--num-workers", "0"], capsys, "num_workers", "an integer in 1..")
    expect_usage_error(["--train-manifest", manifest, "--num-workers", "2", "--storage", str(tmp_path / "r")], capsys,
                       "1 rows", "--num-workers is 2")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    expect_usage_error(["--train-manifest", manifest, "--storage", str(blocker / "runs")], capsys, "--storage",
                       "not writable")
    err = expect_usage_error(["--train-manifest", manifest, "--storage", "s3://no-such-bucket/runs"], capsys,
                             "--storage", "no-such-bucket")
    assert s3.secret_key not in err and s3.access_key not in err


def test_preflight_damaged_model_weights(tmp_path: Path, tiny_teacher_dir: str, broken_models: dict[str, str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Weights that cannot load are refused before Ray, naming the flag and the component; --student-init gives
    only its UNet, so only its UNet is checked."""
    from musiccm.jobs.distill_preflight import preflight

    store = ["--train-manifest", local_manifest(tmp_path, [{"uri": "a.wav", "caption": "x"}]),
             "--storage", str(tmp_path / "r")]
    expect_usage_error(["--teacher", broken_models["unet_shape"], *store], capsys, "--teacher", "unet",
                       "conv_in.weight")
    expect_usage_error(["--teacher", broken_models["vae_truncated"], *store], capsys, "--teacher", "vae", "truncated")
    expect_usage_error(["--teacher", tiny_teacher_dir, "--student-init", broken_models["unet_missing"], *store], capsys,
                       "--student-init", "unet", "conv_in.bias")
    args = ["--teacher", tiny_teacher_dir, "--student-init", broken_models["vae_truncated"], *store]
    preflight(distill_args.to_config(distill_args.build_parser().parse_args(args)))


def test_a_model_that_fails_to_load_in_the_workers_exits_2(tmp_path: Path, tiny_teacher_dir: str,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A load that fails only on the workers (a hub id missing from a node's cache, a file changed after the
    preflight) ends the job with exit 2 and one line, not exit 1 (Ray Train hands the workers' ModelError over)."""
    import ray
    from ray.train import WorkerGroupError

    from musiccm.jobs import distill_run

    class Trainer:
        def fit(self) -> None:
            raise WorkerGroupError("[Rank 0 Error Snippet]: ...", {
                0: model.ModelError("could not get model 'acme/tiny' from the local hub cache: not found"),
                1: RuntimeError("peer gone")})

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # no Ray: the trainer is a stand-in
    monkeypatch.setattr(distill_run, "build_trainer", lambda *a, **k: Trainer())
    manifest = local_manifest(tmp_path, [{"uri": "a.wav", "caption": "x"}])
    expect_usage_error(["--teacher", tiny_teacher_dir, "--train-manifest", manifest, "--storage",
                        str(tmp_path / "r"), "--no-resource-check"], capsys,
                       "a training worker could not load its model", "acme/tiny", "local hub cache")


def test_preflight_refuses_a_teacher_whose_clap_cannot_embed_training_clips(
        tmp_path: Path, tiny_teacher_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Rows without a caption are conditioned on their own CLAP audio embedding: a teacher whose CLAP cannot embed a
    training-length clip (here its feature extractor makes 20 s inputs, twice what the HTSAT tower takes) is
    refused when the manifest has such rows, and accepted when every row is captioned."""
    import shutil

    from musiccm.jobs.distill_preflight import preflight

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    fe = teacher / "feature_extractor" / "preprocessor_config.json"
    fe.write_text(json.dumps({**json.loads(fe.read_text()), "max_length_s": 20, "nb_max_samples": 960_000}))
    manifests = {}
    for name, rows, schema in (
        ("blank", [{"uri": "a.wav", "caption": "jazz"}, {"uri": "b.wav", "caption": "  "}], None),
        ("null", [{"uri": "a.wav", "caption": "jazz"}, {"uri": "b.wav", "caption": None}], None),
        ("no-column", [{"uri": "a.wav"}], pa.schema([("uri", pa.string())])),
        ("captioned", [{"uri": "a.wav", "caption": "jazz"}, {"uri": "b.wav", "caption": "rock"}], None),
    ):
        (tmp_path / name).mkdir()
        manifests[name] = local_manifest(tmp_path / name, rows, schema)
    store = ["--teacher", str(teacher), "--storage", str(tmp_path / "r")]
    for name in ("blank", "null"):
        expect_usage_error([*store, "--train-manifest", manifests[name]], capsys,
                           f"--teacher {teacher}: its CLAP audio tower cannot embed a training clip of 1.28 s",
                           "swin input size", "caption every row or use a teacher whose CLAP takes that length")
    expect_usage_error([*store, "--train-manifest", manifests["no-column"], "--crop-seconds", "0.64"], capsys,
                       "cannot embed a training clip of 0.64 s")

    def config(*argv: str) -> DistillConfig:
        return distill_args.to_config(distill_args.build_parser().parse_args(list(argv)))

    preflight(config(*store, "--train-manifest", manifests["captioned"]))  # text conditioning only: no CLAP audio
    preflight(config("--teacher", tiny_teacher_dir, "--storage", str(tmp_path / "r"), "--train-manifest",
                     manifests["blank"]))  # a CLAP that takes the length


@pytest.mark.slow
def test_preflight_use_gpu_without_gpus(ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = local_manifest(tmp_path, [{"uri": "a.wav", "caption": "x"}, {"uri": "b.wav", "caption": "y"}])
    expect_usage_error(["--train-manifest", manifest, "--storage", str(tmp_path / "r"), "--use-gpu"], capsys,
                       "--use-gpu", "no GPUs")
    expect_usage_error(["--train-manifest", manifest, "--storage", str(tmp_path / "r"), "--num-workers", "2"],
                       capsys, "Ray Data needs at least 1 free")  # 2 workers x 1 CPU leave none on 2 CPUs


# ---------------------------------------------------------------- data stream (fast, no Ray)


class FakeShard:
    """A dataset shard stand-in: iter_batches over fixed rows, counting epoch starts."""

    def __init__(self, n: int):
        self.n, self.epochs = n, 0

    def iter_batches(self, batch_size: int, **_: object) -> Iterator[dict[str, np.ndarray]]:
        self.epochs += 1
        for i in range(0, self.n, batch_size):
            yield {"i": np.arange(i, min(i + batch_size, self.n))}


def test_shard_stream_resumes_position_and_syncs_epochs() -> None:
    @dataclass
    class Prepared:
        size: int
        skipped: int = 0
        reasons: list = None  # type: ignore[assignment]

    def prepare(rows: dict[str, np.ndarray]) -> Prepared:  # rows with an even first index are all "corrupt"
        bad = rows["i"][0] % 2 == 0 and len(rows["i"]) == 1
        return Prepared(0 if bad else len(rows["i"]), int(bad), ["bad"] if bad else [])

    shard = FakeShard(5)
    # 1. Resume inside epoch 3 after 3 rows: the stream skips them (across a batch boundary).
    stream = ShardStream(shard, batch_size=2, seed=0, rank=0, epoch=3, skip_rows=3)
    assert list(stream.next_rows()["i"]) == [3] and (stream.epoch, stream.rows) == (3, 4)
    # 2. The next batch is [4] alone: "corrupt", skipped and counted; the shard then runs dry, so all ranks
    #    (here: one) start epoch 4 together and the batch comes from there.
    got = next_batch(stream, prepare, any_rank=lambda flag: flag)
    assert (list(got.batch.__dict__.values())[0], got.skipped, got.reasons) == (2, 1, ["bad"])
    assert (stream.epoch, stream.rows, shard.epochs) == (4, 2, 2)
    # 3. Another rank ran dry while this one still had rows: this rank drops its batch and follows.
    answers = iter([True, False])
    got = next_batch(stream, prepare, any_rank=lambda flag: next(answers))
    assert (stream.epoch, stream.rows, shard.epochs) == (5, 2, 3)
    # 4. A shard with no usable row at all stops the run with a clear error instead of spinning.
    with pytest.raises(RuntimeError, match="no usable training rows"):
        next_batch(ShardStream(FakeShard(1), 1, 0, 0), prepare, any_rank=lambda flag: flag)


# ---------------------------------------------------------------- the job on Ray + S3 (slow)


@pytest.mark.slow
def test_run_finishes_with_export_and_summary(first_run: Outcome, s3: SeaweedFS, tiny_teacher_dir: str) -> None:
    assert first_run.rc == 0, first_run.stdout[-3000:]
    s = first_run.summary
    assert (s["status"], s["step"], s["export"], s["run"]) == ("ok", 4, f"{RUN}/export", RUN)
    assert f'"export": "{RUN}/export"' in first_run.stdout  # the printed summary names the export
    assert s["config"]["max_steps"] == 4 and s["config"]["storage"] == RUNS and s["manifest"]["rows"] == 8
    assert s["config"]["student_init"] == str(Path(tiny_teacher_dir).resolve())
    assert len(s["worker_node_ids"]) == 2 and all(len(n) == 56 for n in s["worker_node_ids"])  # hex node ids
    for text in (json.dumps(s), first_run.stdout):  # no credentials in what the job prints or writes
        assert s3.secret_key not in text and s3.access_key not in text


@pytest.mark.slow
def test_checkpoints_in_s3_are_safetensors_and_json(first_run: Outcome, tmp_path: Path) -> None:
    files = storage.list_files(RUN)
    names = {f[len(RUN) + 1:] for f in files}
    for step in (2, 4):  # every 2 steps; the last step (4) too
        for part in ("state.safetensors", "meta.json", "rank-00000.json", "rank-00001.json"):
            assert f"checkpoint-{step:06d}/{part}" in names, sorted(names)
    assert "checkpoint_manager_snapshot.json" in names  # Ray Train's index: a rerun resumes from it
    assert first_run.summary["checkpoint"] == f"{RUN}/checkpoint-000004"
    assert not any(n.endswith((".pt", ".pth", ".pkl", ".bin")) for n in names)  # never pickle
    meta = json.loads(storage.read_bytes(f"{RUN}/checkpoint-000004/meta.json"))
    assert meta["step"] == 4 and meta["config"]["name"] == NAME
    assert meta["job"]["epoch"] == 1 and meta["job"]["attempt"] == 1 and meta["job"]["world_size"] == 2
    assert meta["job"]["samples"] >= 4 * 2 * 2 - 2 and meta["job"]["skipped_rows"] >= 1  # the corrupt row
    assert meta["optimizers"] and meta["rng"]["torch"]
    rank1 = json.loads(storage.read_bytes(f"{RUN}/checkpoint-000004/rank-00001.json"))
    assert (rank1["rank"], rank1["step"], rank1["epoch"], rank1["rows"]) == (1, 4, 1, 4)
    local = Path(storage.download_dir(f"{RUN}/checkpoint-000004", str(tmp_path / "ck")))
    tensors = load_file(str(local / "state.safetensors"))
    groups = {k.split("/", 1)[0] for k in tensors}
    assert {"student", "target", "heads", "opt_g", "opt_d", "fake", "opt_fake", "gan"} <= groups, groups


@pytest.mark.slow
def test_injected_failure_resumes_from_checkpoint_without_repeating_steps(first_run: Outcome) -> None:
    assert storage.exists(f"{RUN}/test-hooks/failed-rank1-step3")  # the hook did fire
    steps = [r["step"] for r in first_run.history]
    assert steps == [1, 2, 3, 4], steps  # each step exactly once in the committed history
    by_step = {r["step"]: r for r in first_run.history}
    assert [by_step[s]["attempt"] for s in steps] == [0, 0, 1, 1]  # steps 3-4 ran in the restarted group
    assert by_step[3]["resumed_from"] == 2 and by_step[4]["resumed_from"] == 2
    assert [by_step[s]["epoch"] for s in steps] == [0, 0, 1, 1]  # epoch 0 was used up at the checkpoint
    for r in first_run.history:
        for key in ("distill_loss", "adv_g_loss", "adv_d_loss", "r1", "dmd_loss", "fake_loss", "lr", "samples_per_s",
                    "skipped_rows"):
            assert np.isfinite(r[key]), (key, r)
        assert r["dmd_loss"] > 0 and r["fake_loss"] > 0, r  # --dmd-weight: distribution matching ran every step
        assert r["gan_g_loss"] > 0 and r["gan_cls_loss"] > 0, r  # --gan-weight: so did the GAN term
    assert by_step[4]["skipped_rows"] >= by_step[1]["skipped_rows"] and by_step[4]["skipped_rows"] >= 1
    assert by_step[4]["lr"] == pytest.approx(1e-4)  # warm-up over 2 steps is over, across the restart


@pytest.mark.slow
def test_validation_audio_and_metrics_under_the_run(first_run: Outcome) -> None:
    base = f"{RUN}/validation/step-000004"
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{base}/metrics.parquet"))).to_pylist()
    assert sorted((r["sampling_steps"], r["prompt_index"]) for r in table) == [(s, i) for s in (1, 2, 4)
                                                                             for i in range(2)]
    assert {r["prompt"] for r in table} == set(PROMPTS)
    for r in table:
        audio, sr = sf.read(io.BytesIO(storage.read_bytes(r["uri"])))
        assert sr == 16000 and audio.shape == (r["num_samples"],) == (20480,)
        assert np.isfinite(r["rms_dbfs"]) and -1 <= r["clap_score"] <= 1
    assert "val_clap_1step" in first_run.history[-1]


@pytest.mark.slow
def test_exported_student_generates_audio(first_run: Outcome, tmp_path: Path) -> None:
    from musiccm.pipeline import MusicCM

    student = model.load(first_run.summary["export"], cache_dir=str(tmp_path / "cache"))
    assert student.is_consistency and student.extra["distill"]["step"] == 4
    out = MusicCM(student).generate(["calm piano"], duration=1.28, seeds=[0])
    assert out.waveforms.shape == (1, 20480) and np.isfinite(out.waveforms).all() and out.sample_rate == 16000
    # The export is the EMA target of the last checkpoint (no step happened between them).
    local = Path(storage.download_dir(f"{RUN}/checkpoint-000004", str(tmp_path / "ck")))
    target = {k.split("/", 1)[1]: v for k, v in load_file(str(local / "state.safetensors")).items()
              if k.startswith("target/")}
    exported = dict(student.unet.named_parameters())
    assert target and set(target) <= set(exported)
    assert all(torch.equal(exported[k].detach().cpu(), v) for k, v in target.items())


@pytest.mark.slow
def test_musiccm_export_of_the_run_matches_the_jobs_own_export(first_run: Outcome, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`musiccm export RUN` finds the run's latest checkpoint on S3, rebuilds the run from it (adversarial heads
    included) and writes the student the job itself exported at that step."""
    from musiccm.cli import main

    out = f"{RUNS}/exported-{NAME}"
    assert main(["export", RUN, "--output", out]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (info["checkpoint"], info["step"], info["output"]) == (f"{RUN}/checkpoint-000004", 4, out)
    ours = model.load(out, cache_dir=str(tmp_path / "ours"))
    job = model.load(first_run.summary["export"], cache_dir=str(tmp_path / "job"))
    assert ours.is_consistency and ours.extra["distill"]["step"] == 4
    a, b = ours.unet.state_dict(), job.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_rerun_with_the_same_name_resumes(rerun: Outcome) -> None:
    assert rerun.rc == 0, rerun.stdout[-3000:]
    steps = [r["step"] for r in rerun.history]
    assert steps == [1, 2, 3, 4, 5, 6], steps
    by_step = {r["step"]: r for r in rerun.history}
    assert by_step[5]["resumed_from"] == 4 and by_step[5]["attempt"] == 2 and by_step[6]["epoch"] == 2
    assert rerun.summary["step"] == 6 and rerun.summary["checkpoint"] == f"{RUN}/checkpoint-000006"
    # keep_checkpoints=2: checkpoint-000002 was deleted once 6 was written.
    assert [c.rsplit("/", 1)[1] for c in rerun.summary["checkpoints"]] == ["checkpoint-000004", "checkpoint-000006"]
    assert not storage.list_files(f"{RUN}/checkpoint-000002")
    assert storage.exists(f"{RUN}/validation/step-000006/metrics.parquet")
    meta = json.loads(storage.read_bytes(f"{RUN}/export/model_index.json"))
    assert meta["musiccm"]["distill"]["step"] == 6


def test_summary_of_a_failed_run_names_the_error(tmp_path: Path) -> None:
    from musiccm.jobs.distill_preflight import ManifestInfo, resolve_locations
    from musiccm.jobs.distill_run import summarize

    config = resolve_locations(DistillConfig(train_manifest="m.parquet", storage=str(tmp_path / "runs"), name="r"))
    manifest = ManifestInfo(path="m.parquet", rows=3, files=1, columns=("uri",))
    error = RuntimeError("Training failed due to worker errors:\n[Rank 1 Error Snippet]:\nTraceback (most recent "
                         "call last):\n  File \"x.py\", line 1\nValueError: bad row\n")
    s = summarize(config, manifest, None, error, 1.5)
    assert (s["status"], s["export"], s["checkpoint"]) == ("failed", None, None)
    assert s["error"] == "RuntimeError: Training failed due to worker errors: | ValueError: bad row"
    assert s["run"] == str(tmp_path / "runs" / "r") and s["config"]["output"] == str(tmp_path / "runs" / "r" / "export")
