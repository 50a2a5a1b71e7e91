"""Read a batch run's results (local or S3): metric table, errors, summary, audio by id; `musiccm results`.

    from musiccm import results
    table = results.read_metrics("s3://bucket/gen/run1")        # pyarrow.Table, one row per id
    df = table.to_pandas()
    wav, sr = results.read_audio("s3://bucket/gen/run1", "clip-0001")
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from musiccm import storage
from musiccm.batch.manifest import ID_RE
from musiccm.batch.metrics import ERROR_SCHEMA, METRIC_SCHEMA, dedupe_newest

FORMATS = ("flac", "wav")


def _read_shard(uri: str, columns: list[str] | None) -> pa.Table:
    pf = pq.ParquetFile(pa.BufferReader(storage.read_bytes(uri)))
    names = pf.schema_arrow.names if columns is None else [c for c in columns if c in pf.schema_arrow.names]
    return pf.read(columns=names)


def _read_shards(uris: list[str], columns: list[str] | None, empty: pa.Schema, workers: int = 16) -> pa.Table:
    if not uris:
        return empty.empty_table() if columns is None else empty.empty_table().select(
            [c for c in columns if c in empty.names])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        tables = list(pool.map(lambda u: _read_shard(u, columns), uris))
    return pa.concat_tables(tables, promote_options="permissive")


def attempt_of(shard_uri: str) -> str:
    """The attempt tag of a shard named `<attempt>-<n>.parquet` (attempt tags sort by start time)."""
    return shard_uri.rsplit("/", 1)[-1].rsplit("-", 1)[0]


def read_metrics(output: str, columns: list[str] | None = None) -> pa.Table:
    """All metric rows of a run, one per id (the newest when a retried clip was recorded twice)."""
    uris = storage.list_files(storage.join(output, "metrics"), suffix=".parquet")
    uris.sort(key=lambda u: (attempt_of(u), u))
    wanted = None if columns is None else list(dict.fromkeys([*columns, "id", "finished_at"]))
    table = dedupe_newest(_read_shards(uris, wanted, METRIC_SCHEMA))
    return table if columns is None else table.select([c for c in columns if c in table.column_names])


def read_errors(output: str) -> pa.Table:
    """Rejected and failed rows (id, reason) of the latest attempt on this output."""
    uris = storage.list_files(storage.join(output, "errors"), suffix=".parquet")
    if uris:
        latest = max(attempt_of(u) for u in uris)
        uris = [u for u in uris if attempt_of(u) == latest]
    return _read_shards(uris, None, ERROR_SCHEMA)


def read_summary(output: str) -> dict:
    """The run's `_SUMMARY.json` (FileNotFoundError when the run never finished an attempt)."""
    uri = storage.join(output, "_SUMMARY.json")
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: no summary (no finished attempt of a batch run here)")
    return json.loads(storage.read_bytes(uri))


def read_audio(output: str, clip_id: str) -> tuple[np.ndarray, int]:
    """(waveform float32 (S,), sample rate) of one clip; FileNotFoundError when it has no audio."""
    import soundfile as sf

    if not isinstance(clip_id, str) or not ID_RE.fullmatch(clip_id):
        raise ValueError(f"invalid clip id {clip_id!r}: 1-128 characters of A-Z a-z 0-9 . _ - not starting with '.'")
    for fmt in FORMATS:
        uri = storage.join(output, "audio", f"{clip_id}.{fmt}")
        if storage.exists(uri):
            data, sr = sf.read(io.BytesIO(storage.read_bytes(uri)), dtype="float32")
            return data, int(sr)
    raise FileNotFoundError(f"{storage.join(output, 'audio')}: no audio for id {clip_id!r}")


def _table(rows: list[dict], columns: list[str]) -> str:
    """A small Markdown table."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)[:80]

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def format_report(output: str, top: int = 5) -> str:
    """Summary, slowest clips by real-time factor, and rejected/failed rows of a run, as text."""
    parts = []
    try:
        s = read_summary(output)
        model = s.get("model", {})
        parts.append(f"run {s.get('run_name')!r} at {output} — {s.get('status')} (attempt {s.get('attempt')})")
        warning = f" — {s['warning']}" if s.get("warning") else ""
        parts.append(f"model {model.get('name')} (hash {model.get('hash')}){warning}")
        c = s.get("counts", {})
        parts.append(
            f"rows: {c.get('requested')} requested, {c.get('generated')} generated, {c.get('skipped_done')} already "
            f"done, {c.get('rejected')} rejected, {c.get('failed')} failed; {c.get('in_metrics')} clips in metrics"
        )
        parts.append(f"audio: {s.get('audio_seconds', 0):.1f} s generated in {s.get('wall_seconds', 0):.1f} s wall "
                     f"({s.get('audio_seconds_per_second', 0):.2f} audio-s/s)")
    except FileNotFoundError as exc:
        parts.append(f"{exc}; showing what is on storage")
    table = read_metrics(output, ["id", "duration_s", "generation_s", "rtf", "clap_score", "prompt"])
    if table.num_rows:
        slow = table.sort_by([("rtf", "descending")]).slice(0, top).to_pylist()
        total = sum(table.column("duration_s").to_pylist())
        parts.append(f"\n{table.num_rows} clips, {total:.1f} s of audio. Slowest by real-time factor:")
        parts.append(_table(slow, ["id", "duration_s", "generation_s", "rtf", "clap_score", "prompt"]))
    errors = read_errors(output)
    if errors.num_rows:
        parts.append(f"\n{errors.num_rows} rejected/failed rows (first {min(top, errors.num_rows)}):")
        parts.append(_table(errors.slice(0, top).to_pylist(), ["id", "reason"]))
    return "\n".join(parts)


def results_main(argv: list[str] | None = None) -> int:
    """`musiccm results OUTPUT [--top N]`: print a run's summary, slowest and rejected rows."""
    parser = argparse.ArgumentParser(prog="musiccm results", description=format_report.__doc__)
    parser.add_argument("output", help="the run's output directory or s3:// prefix")
    parser.add_argument("--top", type=int, default=5, help="rows to show per table (default 5)")
    args = parser.parse_args(argv)
    try:
        if not any(storage.exists(storage.join(args.output, name)) for name in ("_SUMMARY.json", "_RUN.json")):
            print(f"musiccm results: error: no batch run at {args.output} (no _SUMMARY.json or _RUN.json)",
                  file=sys.stderr)
            return 2
        report = format_report(args.output, args.top)
    except (storage.StorageError, ValueError) as exc:
        print(f"musiccm results: error: {exc}", file=sys.stderr)
        return 2
    print(report)
    return 0
