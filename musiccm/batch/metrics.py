"""Per-clip metric rows, their Parquet schema, newest-row-per-id dedupe, atomic shards and the driver's sink."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from musiccm import audio_io, storage
from musiccm.batch.config import BatchConfig

# Core columns of every metric row; carried-through manifest columns follow them.
METRIC_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("duration_s", pa.float64()),
        ("num_samples", pa.int64()),
        ("sample_rate", pa.int32()),
        ("seed", pa.int64()),
        ("steps", pa.int64()),
        ("guidance_scale", pa.float64()),  # null when the model ignores guidance (student without w-embedding)
        ("format", pa.string()),
        ("model", pa.string()),  # the model's name (model_index.json "musiccm.name", else what was passed)
        ("model_uri", pa.string()),
        ("model_hash", pa.string()),  # musiccm.model.content_hash of the loaded directory
        ("audio_uri", pa.string()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),  # of the audio file's bytes
        ("peak_dbfs", pa.float64()),
        ("rms_dbfs", pa.float64()),
        ("clipped_fraction", pa.float64()),
        ("silent_fraction", pa.float64()),
        ("clap_score", pa.float64()),  # cosine(CLAP text, CLAP audio); null without an audio front end
        ("prompt_truncated", pa.bool_()),
        ("generation_s", pa.float64()),  # this clip's share of its generate() call
        ("clap_s", pa.float64()),  # its share of the CLAP scoring after it
        ("encode_s", pa.float64()),  # encoding and sha256 of this clip (CPU, beside the next generation)
        ("write_s", pa.float64()),  # the storage write of its audio
        ("rtf", pa.float64()),  # real-time factor: generation_s / duration_s (< 1: faster than real time)
        ("batch_clips", pa.int32()),  # clips generated together in that call
        ("node_id", pa.string()),
        ("device", pa.string()),
        ("finished_at", pa.timestamp("ms", tz="UTC")),  # newest row per id wins on dedupe
    ]
)
METRIC_FIELDS = tuple(METRIC_SCHEMA.names)
ERROR_FIELD = pa.field("error", pa.string())  # stage output only: null for a clip that was written
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string())])
# Every column name the job and the readers give a meaning to: a manifest may not carry a column of these names.
RESERVED_COLUMNS = frozenset({*METRIC_FIELDS, ERROR_FIELD.name, *ERROR_SCHEMA.names})


@dataclass(frozen=True)
class AudioFile:
    """Where a clip was written and what its bytes are."""

    uri: str
    bytes: int
    sha256: str
    encode_s: float = 0.0
    write_s: float = 0.0


def metric_schema(carried: pa.Schema) -> pa.Schema:
    """Schema of metric shards: the core columns, then the carried-through manifest columns."""
    return pa.schema([*METRIC_SCHEMA, *carried])


def stage_schema(carried: pa.Schema) -> pa.Schema:
    """Schema of the generator stage's output: metric columns plus `error`."""
    return pa.schema([*metric_schema(carried), ERROR_FIELD])


def clap_scores(components, prompts: list[str], waveforms: np.ndarray, sample_rate: int) -> list[float | None]:
    """Cosine similarity of each prompt's and clip's CLAP embeddings (both L2-normalised); None without audio tower."""
    from musiccm import external

    audio = external.encode_audio(components, list(waveforms), sample_rate)
    if audio is None:
        return [None] * len(prompts)
    text, _ = external.encode_text(components, prompts)
    return [float(s) for s in (text.to(audio.device) * audio).sum(-1).cpu()]


def metric_row(
    request: dict,
    *,
    waveform: np.ndarray,
    sample_rate: int,
    audio: AudioFile,
    model: dict,
    guidance_scale: float | None,
    truncated: bool,
    clap: float | None,
    generation_s: float,
    clap_s: float,
    batch_clips: int,
    node_id: str,
    device: str,
) -> dict:
    """One metric row for a written clip; `request` is the checked manifest row (carried columns included)."""
    duration = len(waveform) / sample_rate
    return {
        **request,
        "duration_s": duration if request.get("duration_s") is None else request["duration_s"],
        "num_samples": len(waveform),
        "sample_rate": sample_rate,
        "guidance_scale": guidance_scale,
        "model": model["name"],
        "model_uri": model["uri"],
        "model_hash": model["hash"],
        "audio_uri": audio.uri,
        "bytes": audio.bytes,
        "sha256": audio.sha256,
        **audio_io.stats(waveform),
        "clap_score": clap,
        "prompt_truncated": truncated,
        "generation_s": generation_s,
        "clap_s": clap_s,
        "encode_s": audio.encode_s,
        "write_s": audio.write_s,
        "rtf": generation_s / duration if duration > 0 else None,
        "batch_clips": batch_clips,
        "node_id": node_id,
        "device": device,
        "finished_at": datetime.now(UTC),
        "error": None,
    }


def failure_row(request: dict, error: BaseException, node_id: str, device: str) -> dict:
    """A stage output row for a clip that could not be generated (goes to errors/, never to metrics/)."""
    first_line = (str(error).strip().splitlines() or [""])[0][:500]
    return {**request, "node_id": node_id, "device": device, "finished_at": datetime.now(UTC),
            "error": f"generation failed: {type(error).__name__}: {first_line}"}


def to_table(rows: Sequence[dict], schema: pa.Schema) -> pa.Table:
    """Rows → table of exactly `schema` (missing keys are null, extra keys dropped)."""
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)


def dedupe_newest(table: pa.Table) -> pa.Table:
    """One row per id: the latest `finished_at`, ties going to the later row (later shard)."""
    if table.num_rows == 0:
        return table
    # The bookkeeping lives in a table of its own, so no carried column name can collide with it.
    keys = {"id": table.column("id"), "order": np.arange(table.num_rows)}
    if "finished_at" in table.column_names:
        keys["time"] = table.column("finished_at")
    recency = [("time", "ascending")] if "time" in keys else []
    ranked = pa.table(keys).sort_by([*recency, ("order", "ascending")])
    ranked = ranked.append_column("rank", pa.array(np.arange(ranked.num_rows)))
    newest = ranked.group_by("id", use_threads=False).aggregate([("rank", "max")]).column("rank_max")
    rows = np.sort(ranked.column("order").take(newest).to_numpy())  # rank r sits at row r of `ranked`
    return table.take(pa.array(rows))


def table_bytes(table: pa.Table) -> bytes:
    """A table as Parquet bytes (zstd)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class ShardWriter:
    """Buffer rows and write them as atomic Parquet shards `{directory}/{prefix}-{n:05d}.parquet`.

    A shard is written when `rows_per_shard` rows are buffered, when `flush_s` has passed since the
    last write, and on :meth:`close`. With `unique_ids`, a newer row for an id still in the buffer
    replaces the older one (a retried task re-sends its rows); readers dedupe across shards.
    """

    def __init__(
        self, directory: str, prefix: str, schema: pa.Schema, rows_per_shard: int, flush_s: float,
        unique_ids: bool = True,
    ) -> None:
        self.directory, self.prefix, self.schema = directory, prefix, schema
        self.rows_per_shard, self.flush_s, self.unique_ids = rows_per_shard, flush_s, unique_ids
        self._buffer: dict[str, dict] | list[dict] = {} if unique_ids else []
        self._last_write = time.monotonic()
        self.shards: list[str] = []
        self.rows_written = 0

    def add(self, rows: Sequence[dict]) -> None:
        """Buffer rows; write full shards (and a partial one if `flush_s` has passed)."""
        for row in rows:
            if isinstance(self._buffer, dict):
                self._buffer.pop(row["id"], None)
                self._buffer[row["id"]] = row
            else:
                self._buffer.append(row)
        while len(self._buffer) >= self.rows_per_shard:
            self._write(self.rows_per_shard)
        if self._buffer and time.monotonic() - self._last_write >= self.flush_s:
            self._write(len(self._buffer))

    def close(self) -> None:
        """Write whatever is buffered."""
        if self._buffer:
            self._write(len(self._buffer))

    def _write(self, n: int) -> None:
        rows = list(self._buffer.values()) if isinstance(self._buffer, dict) else list(self._buffer)
        chunk, rest = rows[:n], rows[n:]
        uri = storage.join(self.directory, f"{self.prefix}-{len(self.shards):05d}.parquet")
        storage.write_bytes(uri, table_bytes(to_table(chunk, self.schema)))
        self.shards.append(uri)
        self.rows_written += len(chunk)
        self._buffer = {r["id"]: r for r in rest} if isinstance(self._buffer, dict) else rest
        self._last_write = time.monotonic()


# ---------------------------------------------------------------- the driver side of a run


STAGES = ("generation_s", "clap_s", "encode_s", "write_s")


class Sink:
    """Receives stage rows: metric rows → metric shards, failures → error rows; prints progress; adds up where the
    time went (:meth:`throughput`)."""

    def __init__(self, config: BatchConfig, attempt: str, total: int) -> None:
        self.config, self.total = config, total
        self.writer: ShardWriter | None = None
        self.attempt = attempt
        self.generated: dict[str, float] = {}  # id → audio seconds (unique: retried rows count once)
        self.failures: dict[str, str] = {}
        self.model_hash: str | None = None
        self.started = time.monotonic()
        self._last_print = 0.0
        self.stage_s = dict.fromkeys(STAGES, 0.0)  # summed over clips: each clip's share of its batch's stages
        self._batches: list[tuple[float, float, int, float]] = []  # (finished, audio s, clips, model s) per batch

    def add(self, batch: pa.Table) -> None:
        failed = pc.is_valid(batch.column("error"))
        for row in batch.filter(failed).select(["id", "error"]).to_pylist():
            self.failures[row["id"]] = row["error"]
        ok = batch.filter(pc.invert(failed)).drop_columns(["error"])
        if ok.num_rows:
            if self.writer is None:
                self.writer = ShardWriter(
                    storage.join(self.config.output, "metrics"), self.attempt, ok.schema,
                    self.config.metrics_rows_per_shard, self.config.metrics_flush_s)
            rows = ok.to_pylist()
            self.writer.add(rows)
            fresh = [r for r in rows if r["id"] not in self.generated]  # a retried clip's time counts once
            for row in fresh:
                for stage in STAGES:
                    self.stage_s[stage] += row.get(stage) or 0.0
            model_s = sum((r.get("generation_s") or 0.0) + (r.get("clap_s") or 0.0) for r in fresh)
            if fresh:  # when the actor finished the batch (its own clock: arrival at the driver can lag)
                done = max(r["finished_at"] for r in fresh).timestamp()
                self._batches.append((done, sum(r["duration_s"] for r in fresh), len(fresh), model_s))
            for row in rows:
                self.generated[row["id"]] = row["duration_s"]
                self.failures.pop(row["id"], None)
            self.model_hash = self.model_hash or rows[0]["model_hash"]
        self.progress()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.progress(force=True)

    def throughput(self, actors: int) -> dict:
        """Where the time went and the steady-state rate, for the summary.

        `stage_seconds` add up each clip's share of its batch's stages (model: generation, CLAP; CPU: encode,
        write). Steady state runs from the first batch an actor finished to the last (by the rows' `finished_at`),
        so actor start-up and model loading fall before it; it counts the clips of every later batch, and the
        actors' busy fraction is their model time over actors x its length.
        """
        out: dict = {"stage_seconds": {k.removesuffix("_s"): round(v, 3) for k, v in self.stage_s.items()},
                     "steady_state": None}
        batches = sorted(self._batches)
        if len(batches) >= 2:
            later = batches[1:]
            span = batches[-1][0] - batches[0][0]
            audio, clips, model_s = (sum(a[i] for a in later) for i in (1, 2, 3))
            out["steady_state"] = {
                "seconds": round(span, 3), "clips": clips, "audio_seconds": round(audio, 3),
                "clips_per_s": round(clips / span, 4) if span > 0 else None,
                "x_real_time": round(audio / span, 3) if span > 0 else None,
                "actor_busy_fraction": round(model_s / (actors * span), 4) if span > 0 and actors else None,
            }
        return out

    def progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_print < self.config.progress_s:
            return
        self._last_print = now
        done = len(self.generated) + len(self.failures)
        elapsed = now - self.started
        audio = sum(self.generated.values())
        eta = f", ETA {elapsed / done * (self.total - done):.0f} s" if 0 < done < self.total else ""
        print(f"[batch] {done}/{self.total} clips ({len(self.failures)} failed), {audio:.1f} audio-s in "
              f"{elapsed:.0f} s = {audio / max(elapsed, 1e-9):.2f} audio-s/s{eta}", flush=True)


def write_errors(output: str, attempt: str, rows: list[dict]) -> None:
    """This attempt's error shard(s); older attempts' error shards are removed once it is written."""
    directory = storage.join(output, "errors")
    old = storage.list_files(directory, suffix=".parquet")
    if rows:
        writer = ShardWriter(directory, attempt, ERROR_SCHEMA, 100_000, 1e9, unique_ids=False)
        writer.add(rows)
        writer.close()
    for uri in old:
        if not uri.rsplit("/", 1)[-1].startswith(attempt):
            storage.delete(uri)
