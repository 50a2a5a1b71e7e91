"""The generator stage as a pipeline: concurrent calls share one model (one generates at a time) while the
others encode and write, and the stage times add up to the summary's busy fraction."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from musiccm import storage
from musiccm.batch import metrics
from musiccm.batch.config import BatchConfig
from musiccm.batch.generator_stage import GeneratorStage
from musiccm.batch.manifest import check_batch


@pytest.fixture
def one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def batch(prefix: str, n: int) -> pa.Table:
    table = pa.table({"id": [f"{prefix}{i}" for i in range(n)], "prompt": [f"calm piano {i}" for i in range(n)]})
    return check_batch(table, max_duration=600).drop_columns(["reason"])


def test_concurrent_calls_generate_one_at_a_time_and_write_beside_the_next(
        tmp_path: Path, untrained_student_dir: str, one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    config = BatchConfig(manifest="unused", output=str(tmp_path / "out"), model=untrained_student_dir,
                         clap_score=False)
    stage = GeneratorStage(config, device="cpu", torch_threads=1)
    events: list[tuple[str, str, float]] = []
    generate, write = stage.generator.generate, storage.write_bytes

    def timed_generate(prompts, *args, **kwargs):
        events.append(("generate-start", prompts[0], time.monotonic()))
        out = generate(prompts, *args, **kwargs)
        events.append(("generate-end", prompts[0], time.monotonic()))
        return out

    def slow_write(uri: str, data: bytes) -> None:
        events.append(("write", uri.rsplit("/", 1)[-1], time.monotonic()))
        time.sleep(0.5)  # storage latency: the other call must generate meanwhile
        write(uri, data)

    monkeypatch.setattr(stage.generator, "generate", timed_generate)
    monkeypatch.setattr(storage, "write_bytes", slow_write)
    results: dict[str, pa.Table] = {}
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, stage(batch(p, 2)))) for p in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == ["a", "b"] and all(results[p].num_rows == 2 for p in results)
    assert all(e is None for p in results for e in results[p].column("error").to_pylist())
    starts = sorted(t for kind, _, t in events if kind == "generate-start")
    ends = sorted(t for kind, _, t in events if kind == "generate-end")
    assert len(starts) == 2 and ends[0] <= starts[1], "two generate() calls overlapped on one model"
    # The first batch's writes (0.5 s each) overlap the second batch's generation.
    overlapping = [t for kind, _, t in events if kind == "write" and t < ends[1] and t + 0.5 > starts[1]]
    assert overlapping, events
    for table in results.values():
        row = table.to_pylist()[0]
        assert row["generation_s"] > 0 and row["encode_s"] > 0 and row["write_s"] >= 0.5 and row["clap_s"] >= 0


def test_sink_throughput_counts_each_clip_once_and_measures_the_steady_state(tmp_path: Path) -> None:
    config = BatchConfig(manifest="m", output=str(tmp_path / "out"), progress_s=3600)
    sink = metrics.Sink(config, "A1", total=6)
    t0 = datetime(2026, 12, 7, tzinfo=UTC)
    schema = metrics.stage_schema(pa.schema([]))

    def rows(ids: list[str], finished: float) -> pa.Table:
        return metrics.to_table([{"id": i, "duration_s": 10.0, "generation_s": 1.5, "clap_s": 0.5, "encode_s": 0.1,
                                  "write_s": 0.2, "finished_at": t0 + timedelta(seconds=finished), "error": None}
                                 for i in ids], schema)

    sink.add(rows(["a", "b"], 100.0))  # the first batch: start-up is before it
    sink.add(rows(["c", "d"], 104.0))
    sink.add(rows(["e", "f"], 108.0))
    sink.add(rows(["e", "f"], 109.0))  # a retried batch re-sends its rows: not counted again
    sink.close()
    out = sink.throughput(actors=1)
    assert out["stage_seconds"] == {"generation": 9.0, "clap": 3.0, "encode": pytest.approx(0.6),
                                    "write": pytest.approx(1.2)}
    steady = out["steady_state"]
    assert (steady["seconds"], steady["clips"], steady["audio_seconds"]) == (8.0, 4, 40.0)
    assert steady["clips_per_s"] == 0.5 and steady["x_real_time"] == 5.0
    assert steady["actor_busy_fraction"] == 1.0  # 4 clips x 2 s of model time over 8 s
