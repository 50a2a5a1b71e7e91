"""Pure parts of batch generation: manifest rules, seeds, batch plans, metric dedupe, shards, resume, config."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from musiccm import storage
from musiccm.batch import manifest, metrics, resume
from musiccm.batch.config import (
    MAX_STEPS,
    MAX_TEACHER_STEPS,
    BatchConfig,
    default_run_name,
    plan_resources,
    resolve_default_steps,
    steps_limit,
)
from musiccm.batch.manifest import ManifestError
from musiccm.results import read_audio, read_metrics

MAX = 600.0


def check(**columns) -> list[dict]:
    """check_batch on a table built from columns; rows as dicts."""
    return manifest.check_batch(pa.table(columns), max_duration=MAX, default_steps=4).to_pylist()


def reason_of(**columns) -> str | None:
    return check(**columns)[0]["reason"]


# ---------------------------------------------------------------- seeds


def test_derived_seed_is_sha256_prefix_masked_to_int63() -> None:
    expected = int.from_bytes(hashlib.sha256(b"clip-1").digest()[:8], "big") & (2**63 - 1)
    assert manifest.derive_seed("clip-1") == expected
    seeds = {manifest.derive_seed(f"clip-{i}") for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)


def test_missing_seed_is_derived_and_given_seed_kept() -> None:
    rows = check(id=["a", "b"], prompt=["x", "y"], seed=pa.array([None, 5], pa.int64()))
    assert rows[0]["seed"] == manifest.derive_seed("a")
    assert rows[1]["seed"] == 5


# ---------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pa.table({"id": ["a"]}), "missing required column(s) prompt"),
        (pa.table({"prompt": ["a"]}), "missing required column(s) id"),
        (pa.table({"id": [1], "prompt": ["a"]}), "column 'id' has type int64; expected a string type"),
        (pa.table({"id": ["a"], "prompt": ["a"], "duration_s": ["10"]}), "column 'duration_s' has type string"),
        (pa.table({"id": ["a"], "prompt": ["a"], "seed": [1.0]}), "'Int64'"),
        (pa.table({"id": ["a"], "prompt": ["a"], "steps": [4.0]}), "column 'steps' has type double"),
        (pa.table({"id": ["a"], "prompt": ["a"], "format": [1]}), "column 'format' has type int64"),
        (pa.table({"id": ["a"], "prompt": ["a"], "sha256": ["x"]}), "clash with columns the job writes"),
    ],
)
def test_schema_errors_name_the_column_and_what_is_allowed(table: pa.Table, message: str) -> None:
    with pytest.raises(ManifestError, match="m.parquet") as info:
        manifest.check_schema(table.schema, "m.parquet")
    assert message in str(info.value)


def test_schema_accepts_variants_and_returns_carried_columns() -> None:
    table = pa.table({
        "id": pa.array(["a"]).dictionary_encode(),
        "prompt": pa.array(["p"], pa.large_string()),
        "duration_s": pa.array([3], pa.int32()),
        "seed": pa.array([None], pa.null()),
        "steps": pa.array([2], pa.uint8()),
        "genre": ["jazz"],
        "tags": [[1, 2]],
    })
    carried = manifest.check_schema(table.schema, "m")
    assert carried.names == ["genre", "tags"]
    rows = manifest.check_batch(table, max_duration=MAX).to_pylist()
    assert rows[0]["reason"] is None and rows[0]["duration_s"] == 3.0 and rows[0]["steps"] == 2
    assert rows[0]["genre"] == "jazz" and rows[0]["tags"] == [1, 2]


def test_unify_schemas_names_the_disagreeing_file() -> None:
    a = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64())])
    b = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.string())])
    with pytest.raises(ManifestError, match="b.parquet: schema does not match a.parquet"):
        manifest.unify_schemas([("a.parquet", a), ("b.parquet", b)])


# ---------------------------------------------------------------- row rules


@pytest.mark.parametrize(
    "row_id",
    ["a b", ".hidden", "", "x" * 129, "a/b", "../up", "é", "a\\b", "semi;colon"],
)
def test_bad_ids_are_rejected(row_id: str) -> None:
    assert "invalid" in reason_of(id=[row_id], prompt=["p"])


@pytest.mark.parametrize("row_id", ["a", "A-b_c.9", "x" * 128, "a..b", "-", "_x", "9"])
def test_good_ids_pass_and_cannot_escape_the_output(row_id: str) -> None:
    assert reason_of(id=[row_id], prompt=["p"]) is None
    key = storage.join("s3://bucket/out", "audio", f"{row_id}.flac")
    assert key.startswith("s3://bucket/out/audio/") and key.count("/") == 5


def test_null_id_and_empty_prompts_are_rejected() -> None:
    rows = check(id=pa.array([None, "b", "c", "d"], pa.string()), prompt=pa.array(["p", "", "  \n", None]))
    assert rows[0]["reason"] == "id is missing"
    assert all(r["reason"] == "prompt is empty" for r in rows[1:])


@pytest.mark.parametrize(
    ("column", "value", "needle"),
    [
        ("duration_s", 0.0, "duration_s must be a finite number > 0"),
        ("duration_s", -1.0, "duration_s must be a finite number > 0"),
        ("duration_s", float("nan"), "finite"),
        ("duration_s", float("inf"), "finite"),
        ("duration_s", MAX + 0.5, "above the limit of 600.0 s"),
        ("seed", -1, "seed must be in 0..2^63-1"),
        ("steps", 0, "steps must be in 1..8"),
        ("steps", 9, "steps must be in 1..8"),
        ("guidance_scale", 0.5, "guidance_scale must be a finite number ≥ 1"),
        ("guidance_scale", float("nan"), "guidance_scale"),
        ("format", "mp3", "format must be one of flac | wav"),
    ],
)
def test_bad_values_are_rejected_with_a_reason(column: str, value: object, needle: str) -> None:
    assert needle in reason_of(id=["a"], prompt=["p"], **{column: [value]})


def test_seed_above_int63_is_rejected() -> None:
    assert "2^63-1" in reason_of(id=["a"], prompt=["p"], seed=pa.array([2**63], pa.uint64()))
    assert reason_of(id=["a"], prompt=["p"], seed=pa.array([2**63 - 1], pa.uint64())) is None


def test_defaults_and_normalisation() -> None:
    rows = check(id=["a", "b"], prompt=["p", "q"], duration_s=[None, MAX], format=[None, " WAV "],
                 steps=pa.array([None, 8], pa.int64()), guidance_scale=[None, 1.0])
    assert rows[0] | {"reason": None} == {"id": "a", "prompt": "p", "duration_s": None,
                                          "seed": manifest.derive_seed("a"), "steps": 4, "guidance_scale": None,
                                          "format": "flac", "reason": None}
    assert rows[1]["format"] == "wav" and rows[1]["steps"] == 8 and rows[1]["duration_s"] == MAX


def test_step_limits_depend_on_the_model_kind() -> None:
    student = steps_limit(True)
    teacher = steps_limit(False)
    assert (student, teacher, steps_limit(None)) == (MAX_STEPS, MAX_TEACHER_STEPS, MAX_TEACHER_STEPS) == (8, 1000, 1000)

    def reasons(steps: list[int | None], max_steps: int, default: int | None) -> list[tuple[int | None, str | None]]:
        table = pa.table({"id": [f"r{i}" for i in range(len(steps))], "prompt": ["p"] * len(steps),
                          "steps": pa.array(steps, pa.int64())})
        rows = manifest.check_batch(table, max_duration=MAX, default_steps=default, max_steps=max_steps).to_pylist()
        return [(r["steps"], r["reason"]) for r in rows]

    # A distilled student keeps the old rule and message.
    assert reasons([8, 9, None], student, 4) == [(8, None), (None, "steps must be in 1..8, got 9"), (4, None)]
    # A DDIM teacher: its 50-step baseline passes, more steps than training timesteps do not.
    assert reasons([50, 1000, 1001, 0, None], teacher, 50) == [
        (50, None), (1000, None), (None, "steps must be in 1..1000 for a DDIM teacher, got 1001"),
        (None, "steps must be in 1..1000 for a DDIM teacher, got 0"), (50, None)]
    # A hub id of unknown kind: no default here (the actor's model picks it), the teacher's limit.
    assert reasons([20, None], steps_limit(None), None) == [(20, None), (None, None)]


def test_default_steps_resolve_per_model_kind() -> None:
    assert [resolve_default_steps(None, kind) for kind in (True, False, None)] == [4, 50, None]
    assert [resolve_default_steps(8, True), resolve_default_steps(50, False), resolve_default_steps(50, None)] == [
        8, 50, 50]
    with pytest.raises(ValueError, match=r"--default-steps 20 is invalid for a distilled consistency student; "
                                         r"allowed: 1\.\.8 \(default 4\)"):
        resolve_default_steps(20, True)
    with pytest.raises(ValueError, match=r"invalid for a DDIM teacher; allowed: 1\.\.1000 \(default 50\)"):
        resolve_default_steps(1001, False)


def test_model_kind_is_read_from_model_index_scheduler() -> None:
    from musiccm.defaults import DEFAULT_MODEL
    from musiccm.jobs.batch_preflight import inspect_model, is_consistency

    assert is_consistency({"scheduler": ["diffusers", "LCMScheduler"]}) is True
    assert is_consistency({"scheduler": ["diffusers", "DDIMScheduler"]}) is False
    assert is_consistency({}) is None and is_consistency({"scheduler": None}) is None
    assert inspect_model(DEFAULT_MODEL)["consistency"] is True  # the bundled tiny student
    assert inspect_model("ucsd-reach/musicldm")["consistency"] is None  # a hub id: not read on the driver


def test_several_problems_are_all_reported() -> None:
    reason = reason_of(id=[".x"], prompt=[""], steps=[0])
    assert "invalid" in reason and "prompt is empty" in reason and "steps" in reason


def test_split_rejects_every_copy_of_a_duplicate_id() -> None:
    checked = manifest.check_batch(
        pa.table({"id": ["a", "b", "a", "c", "bad id"], "prompt": ["1", "2", "3", "", "5"], "genre": list("vwxyz")}),
        max_duration=MAX,
    )
    valid, errors = manifest.split(checked)
    assert valid.column("id").to_pylist() == ["b"]
    assert valid.column_names == [*manifest.CHECKED.names[:-1], "genre"]
    assert errors.column("id").to_pylist() == ["a", "a", "c", "bad id"]
    reasons = errors.column("reason").to_pylist()
    assert all("duplicate id: 2 rows" in r for r in reasons[:2])
    assert reasons[2] == "prompt is empty" and "invalid" in reasons[3]


# ---------------------------------------------------------------- batch plans


def test_plan_batches_sorts_into_homogeneous_batches_and_keeps_every_row() -> None:
    durations = [10.0, 30.0, None, 10.0, 30.0, 10.0, None, 10.0, 5.0]
    rows = manifest.check_batch(
        pa.table({"id": [f"r{i}" for i in range(9)], "prompt": ["p"] * 9, "duration_s": durations}),
        max_duration=MAX,
    ).drop_columns(["reason"])
    blocks = manifest.plan_batches(rows, batch_size=2)
    assert [b.num_rows for b in blocks] == [2, 2, 2, 2, 1]
    ids = [i for b in blocks for i in b.column("id").to_pylist()]
    assert sorted(ids) == sorted(rows.column("id").to_pylist())
    flat = [d for b in blocks for d in b.column("duration_s").to_pylist()]
    assert flat == [5.0, 10.0, 10.0, 10.0, 10.0, 30.0, 30.0, None, None]
    assert manifest.plan_batches(rows.slice(0, 0), 4) == []
    capped = manifest.plan_batches(rows, batch_size=2, max_blocks=2)  # 5 batches → 2 blocks of 3 batches max
    assert [b.num_rows for b in capped] == [6, 3]


# ---------------------------------------------------------------- metric rows, dedupe, shards


def _metric_rows(ids: list[str], start: datetime, **extra) -> list[dict]:
    return [{"id": i, "finished_at": start + timedelta(seconds=k), "bytes": k, **extra} for k, i in enumerate(ids)]


def test_dedupe_keeps_the_newest_row_per_id() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    rows = _metric_rows(["a", "b", "c"], t0) + [
        {"id": "a", "finished_at": t0 + timedelta(seconds=10), "bytes": 99},  # a retry: newer
        {"id": "b", "finished_at": t0 - timedelta(seconds=10), "bytes": 98},  # an older copy
        {"id": "c", "finished_at": t0 + timedelta(seconds=2), "bytes": 97},  # a tie: the later row wins
    ]
    table = metrics.to_table(rows, metrics.METRIC_SCHEMA)
    out = {r["id"]: r["bytes"] for r in metrics.dedupe_newest(table).to_pylist()}
    assert out == {"a": 99, "b": 1, "c": 97}


def test_shard_writer_sizes_shards_and_replaces_buffered_duplicates(tmp_path: Path) -> None:
    directory = str(tmp_path / "metrics")
    writer = metrics.ShardWriter(directory, "att", metrics.METRIC_SCHEMA, rows_per_shard=3, flush_s=1e9)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    writer.add(_metric_rows(["a", "b"], t0))
    writer.add([{"id": "a", "finished_at": t0 + timedelta(seconds=9), "bytes": 42}])  # retried: replaces "a"
    assert writer.shards == []
    writer.add(_metric_rows(["c", "d", "e"], t0))
    writer.close()
    assert [Path(s).name for s in writer.shards] == ["att-00000.parquet", "att-00001.parquet"]
    raw = pa.concat_tables([pq.read_table(s) for s in writer.shards])
    assert sorted(raw.column("id").to_pylist()) == ["a", "b", "c", "d", "e"]
    assert raw.schema.equals(metrics.METRIC_SCHEMA)
    assert {r["id"]: r["bytes"] for r in raw.to_pylist()}["a"] == 42


# ---------------------------------------------------------------- resume


def _fake_run(output: Path, clips: dict[str, bytes], recorded: dict[str, bytes]) -> None:
    """Audio files `clips`; metric rows claiming the bytes in `recorded`."""
    for clip_id, data in clips.items():
        storage.write_bytes(str(output / "audio" / f"{clip_id}.flac"), data)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [{"id": i, "format": "flac", "bytes": len(d), "sha256": hashlib.sha256(d).hexdigest(),
             "finished_at": t0} for i, d in recorded.items()]
    writer = metrics.ShardWriter(str(output / "metrics"), "att", metrics.METRIC_SCHEMA, 100, 1e9)
    writer.add(rows)
    writer.close()


def test_resume_needs_metric_row_and_matching_audio(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _fake_run(
        out,
        clips={"ok": b"1234", "other-size": b"123", "same-size": b"abcd", "no-row": b"zz"},
        recorded={"ok": b"1234", "other-size": b"1234", "same-size": b"1234", "no-audio": b"1"},
    )
    (out / "audio" / f"partial.flac.tmp-{'0' * 32}").write_bytes(b"x")  # an interrupted write
    state = resume.resume_state(str(out))
    assert state.done == {"ok", "same-size"}  # size check only: cheap, one listing
    assert (state.recorded, state.missing_audio, state.mismatched) == (4, 1, 1)
    verified = resume.resume_state(str(out), verify=True)
    assert verified.done == {"ok"} and verified.mismatched == 2
    assert resume.resume_state(str(tmp_path / "fresh")).done == set()


def test_read_audio_refuses_ids_that_could_escape(tmp_path: Path) -> None:
    for bad in ("../x", ".x", "a/b"):
        with pytest.raises(ValueError, match="invalid clip id"):
            read_audio(str(tmp_path), bad)
    with pytest.raises(FileNotFoundError, match="no audio for id 'x'"):
        read_audio(str(tmp_path), "x")


def test_read_metrics_of_an_empty_output_is_an_empty_table(tmp_path: Path) -> None:
    table = read_metrics(str(tmp_path / "nothing"))
    assert table.num_rows == 0 and table.schema.equals(metrics.METRIC_SCHEMA)


# ---------------------------------------------------------------- config and placement


def test_config_validates_and_round_trips() -> None:
    config = BatchConfig(manifest="m.parquet", output="out", num_actors=2, hop_frames=16)
    assert BatchConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert set(config.fingerprint()) == {"model", "default_steps", "default_format", "hop_frames", "taper",
                                         "max_timestep", "dtype"}
    assert config.stall_timeout_s == 36000.0
    assert config.default_steps is None  # the model's default, resolved before the run (4 or 50)
    assert BatchConfig(manifest="m", output="o", default_steps=1000).default_steps == 1000  # a teacher's limit
    for bad in ({"num_actors": 0}, {"batch_size": 1.5}, {"default_steps": 1001}, {"default_steps": 0},
                {"max_timestep": 1000}, {"max_timestep": -1},
                {"default_steps": 4.0}, {"default_format": "mp3"},
                {"long_threshold_s": float("nan")}, {"max_duration": -1}, {"dtype": "int8"}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}=.*allowed"):
            BatchConfig(manifest="m", output="o", **bad)
    with pytest.raises(ValueError, match="unknown BatchConfig field"):
        BatchConfig.from_dict({"manifest": "m", "output": "o", "nope": 1})


def test_default_run_name_is_path_safe() -> None:
    assert default_run_name("s3://b/in/prompts.parquet", "musiccm-untrained-tiny") == "prompts-musiccm-untrained-tiny"
    assert default_run_name("data/my prompts/", "org/model v2") == "my-prompts-model-v2"


def test_resources_leave_cpu_headroom_and_pin_one_gpu_per_actor() -> None:
    config = BatchConfig(manifest="m", output="o", num_actors=4)
    cpu2 = plan_resources(config, {"CPU": 2.0})
    # One Ray CPU is kept free for Ray's tasks, but torch threads use every core of the machine.
    assert (cpu2.actors, cpu2.num_gpus, cpu2.num_cpus, cpu2.device, cpu2.torch_threads) == (1, 0, 1, "cpu", 2)
    assert cpu2.notes  # the clamp is reported
    cpu16 = plan_resources(config, {"CPU": 16.0})
    assert (cpu16.actors, cpu16.num_cpus, cpu16.torch_threads) == (4, 3, 4)
    assert cpu16.actors * cpu16.num_cpus <= 15
    two_nodes = plan_resources(config, {"CPU": 32.0}, [{"CPU": 16.0}] * 2)  # 2 actors a node share its 16 cores
    assert (two_nodes.actors, two_nodes.torch_threads) == (4, 8)
    assert plan_resources(BatchConfig(manifest="m", output="o", torch_threads=1), {"CPU": 2.0}).torch_threads == 1
    gpu = plan_resources(config, {"CPU": 32.0, "GPU": 8.0})  # 31 CPUs over 8 GPUs: 3 each, encoding beside the GPU
    assert (gpu.actors, gpu.num_gpus, gpu.num_cpus, gpu.device, gpu.io_threads) == (4, 1, 3, "cuda", 6)
    big = plan_resources(BatchConfig(manifest="m", output="o", num_actors=8), {"CPU": 192.0, "GPU": 8.0})
    assert (big.num_cpus, big.io_threads) == (8, 16)  # at most 8 a GPU actor
    assert plan_resources(BatchConfig(manifest="m", output="o", cpus_per_actor=2), {"CPU": 4.0, "GPU": 1.0}).num_cpus \
        == 2
    # A CPU-only head with many CPUs does not make GPU actors ask for more than a GPU node has.
    nodes = [{"CPU": 64.0}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert plan_resources(config, {"CPU": 72.0, "GPU": 2.0}, nodes).num_cpus == 3
    assert plan_resources(config, {"CPU": 32.0, "GPU": 2.0}).actors == 2
    with pytest.raises(ValueError, match="no GPUs"):
        plan_resources(BatchConfig(manifest="m", output="o", device="cuda"), {"CPU": 4.0})
    assert plan_resources(BatchConfig(manifest="m", output="o", device="cpu"), {"CPU": 8.0, "GPU": 1.0}).num_gpus == 0


def test_examples_manifest_is_valid_and_has_short_and_long_clips() -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "prompts.parquet"
    table = pq.read_table(path)
    assert manifest.check_schema(table.schema, str(path)).names == ["instrument", "tempo", "mode", "drums"]
    valid, errors = manifest.split(manifest.check_batch(table, max_duration=MAX))
    assert errors.num_rows == 0 and valid.num_rows >= 14
    durations = [d for d in valid.column("duration_s").to_pylist() if d is not None]
    assert sum(d >= 30 for d in durations) >= 2 and sum(d <= 10.24 for d in durations) >= 8
    assert os.path.getsize(path) < 20_000
