"""Prompt manifests: schema check, per-row validation, duplicate ids, deterministic seeds, batch plans.

Pure pyarrow: no Ray, no model, no storage. A manifest is one or more Parquet files with

    id              string, required: 1–128 of [A-Za-z0-9._-], not starting with '.', unique
    prompt          string, required: non-empty (over-long prompts are truncated by the model's tokenizer)
    duration_s      number, optional: > 0 and ≤ max_duration (null: the model's native window)
    seed            integer, optional: 0..2^63-1 (null: derived from the id, see :func:`derive_seed`)
    steps           integer, optional: 1..8 for a distilled student (default 4), 1..1000 for a DDIM teacher
                    (default 50); null: the run's default (--default-steps, else the model's)
    guidance_scale  number, optional: ≥ 1, diffusers convention: a teacher's classifier-free guidance (default
                    2.0), or a student's guidance embedding (students without one ignore it)
    format          string, optional: flac | wav (null: the run's default)

Every other column is carried through to the metric rows, unless its name is one the job writes itself
(:data:`RESERVED`: the metric columns, `error` and `reason`), which stops the run before any work. A wrong
file or column type is a :class:`ManifestError` (the whole run stops); a bad value rejects only its row,
with a reason.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from musiccm.batch.config import FORMATS, MAX_STEPS, steps_range
from musiccm.batch.metrics import RESERVED_COLUMNS

ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
MAX_SEED = 2**63 - 1
REQUIRED = ("id", "prompt")
# Column -> kind of Arrow type it must have.
KINDS = {
    "id": "string",
    "prompt": "string",
    "duration_s": "number",
    "seed": "integer",
    "steps": "integer",
    "guidance_scale": "number",
    "format": "string",
}
# Columns of a checked manifest, in order; carried-through columns follow, then nothing else.
CHECKED = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("duration_s", pa.float64()),  # null: the model's native window
        ("seed", pa.int64()),
        ("steps", pa.int64()),
        ("guidance_scale", pa.float64()),  # null: the model's default
        ("format", pa.string()),
        ("reason", pa.string()),  # null for a valid row
    ]
)
# Names a carried-through column may not have: the job's metric, error and checking columns.
RESERVED = frozenset({*RESERVED_COLUMNS, *CHECKED.names})
_TYPE_HINT = {
    "string": "a string type",
    "number": "an integer or floating-point type",
    "integer": "an integer type (with pandas, use the nullable 'Int64' dtype when values are missing)",
}


class ManifestError(ValueError):
    """A manifest that cannot be used at all (not Parquet, missing column, wrong column type)."""


def derive_seed(row_id: str) -> int:
    """Seed of a row without one: the first 8 bytes of sha256(id), big-endian, masked to 0..2^63-1."""
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "big") & MAX_SEED


def _kind_ok(kind: str, dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    if pa.types.is_null(dtype):
        return True  # an all-null column: every row takes the default (or is rejected, for id/prompt)
    if kind == "string":
        return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)
    if kind == "integer":
        return pa.types.is_integer(dtype)
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype)


def check_schema(schema: pa.Schema, source: str) -> pa.Schema:
    """Check column names and types; return the schema of the carried-through columns."""
    missing = [name for name in REQUIRED if name not in schema.names]
    if missing:
        raise ManifestError(
            f"{source}: missing required column(s) {', '.join(missing)}; found {', '.join(schema.names) or 'none'}"
        )
    dupes = sorted(n for n, c in Counter(schema.names).items() if c > 1)
    if dupes:
        raise ManifestError(f"{source}: column name(s) {', '.join(dupes)} appear more than once")
    for field in schema:
        kind = KINDS.get(field.name)
        if kind is not None and not _kind_ok(kind, field.type):
            raise ManifestError(
                f"{source}: column {field.name!r} has type {field.type}; expected {_TYPE_HINT[kind]}"
            )
    carried = [f for f in schema if f.name not in KINDS]
    clashes = [f.name for f in carried if f.name in RESERVED]
    if clashes:
        raise ManifestError(
            f"{source}: column(s) {', '.join(clashes)} clash with columns the job writes; rename them "
            f"(reserved: {', '.join(sorted(RESERVED))})"
        )
    return pa.schema(carried)


def unify_schemas(schemas: list[tuple[str, pa.Schema]]) -> pa.Schema:
    """The one schema of a multi-file manifest; ManifestError naming the file that disagrees."""
    first_source, unified = schemas[0]
    for source, schema in schemas[1:]:
        try:
            unified = pa.unify_schemas([unified, schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ManifestError(f"{source}: schema does not match {first_source}: {exc}") from None
    return unified


def checked_schema(carried: pa.Schema) -> pa.Schema:
    """Schema of :func:`check_batch`'s output for a manifest with these carried-through columns."""
    return pa.schema([*CHECKED, *carried])


def _row_reasons(
    row: dict, max_duration: float, default_steps: int | None, max_steps: int, default_format: str
) -> tuple[dict, list[str]]:
    """Normalise one row; return (normalised values, reasons it is rejected)."""
    reasons: list[str] = []
    row_id, prompt = row.get("id"), row.get("prompt")
    if row_id is None:
        reasons.append("id is missing")
    elif not ID_RE.fullmatch(row_id):
        shown = row_id if len(row_id) <= 40 else row_id[:37] + "..."
        reasons.append(f"id {shown!r} is invalid: use 1-128 characters of A-Z a-z 0-9 . _ - not starting with '.'")
    if prompt is None or not prompt.strip():
        reasons.append("prompt is empty")
    duration = row.get("duration_s")
    if duration is not None:
        duration = float(duration)
        if not math.isfinite(duration) or duration <= 0:
            reasons.append(f"duration_s must be a finite number > 0, got {duration}")
        elif duration > max_duration:
            reasons.append(f"duration_s {duration} is above the limit of {max_duration} s (--max-duration)")
    seed = row.get("seed")
    if seed is None and row_id is not None and not reasons:
        seed = derive_seed(row_id)
    elif seed is not None and not 0 <= seed <= MAX_SEED:
        reasons.append(f"seed must be in 0..2^63-1, got {seed}")
        seed = None
    steps = row.get("steps")
    steps = default_steps if steps is None else steps  # None: the model's default, chosen by the actor
    if steps is not None and not 1 <= steps <= max_steps:
        reasons.append(f"steps must be in {steps_range(max_steps)}, got {steps}")
        steps = None
    guidance = row.get("guidance_scale")
    if guidance is not None:
        guidance = float(guidance)
        if not math.isfinite(guidance) or guidance < 1.0:
            reasons.append(f"guidance_scale must be a finite number ≥ 1, got {guidance}")
    fmt = row.get("format")
    fmt = default_format if fmt is None else fmt.strip().lower()
    if fmt not in FORMATS:
        reasons.append(f"format must be one of {' | '.join(FORMATS)}, got {row.get('format')!r}")
    values = {"id": row_id, "prompt": prompt, "duration_s": duration, "seed": seed, "steps": steps,
              "guidance_scale": guidance, "format": fmt}
    return values, reasons


def check_batch(
    batch: pa.Table,
    *,
    max_duration: float,
    default_steps: int | None = 4,
    max_steps: int = MAX_STEPS,
    default_format: str = "flac",
) -> pa.Table:
    """Validate and normalise manifest rows: CHECKED columns (with `reason`) + carried columns, same row order.

    `max_steps` is the model's limit (:func:`musiccm.batch.config.steps_limit`: 8 for a distilled student,
    1000 for a DDIM teacher or a hub id of unknown kind); `default_steps` None leaves `steps` null for the
    actor's model to choose.
    """
    carried = check_schema(batch.schema, "manifest")
    core = [name for name in KINDS if name in batch.column_names]
    rows = batch.select(core).to_pylist()
    out: dict[str, list] = {name: [] for name in CHECKED.names}
    for row in rows:
        values, reasons = _row_reasons(row, max_duration, default_steps, max_steps, default_format)
        for name, value in values.items():
            out[name].append(value)
        out["reason"].append("; ".join(reasons) if reasons else None)
    table = pa.Table.from_pydict(out, schema=CHECKED)
    for field in carried:
        table = table.append_column(field, batch.column(field.name))
    return table


def duplicate_ids(ids: Iterable[str | None]) -> dict[str, int]:
    """Ids that occur more than once, with their counts (missing ids are not duplicates)."""
    counts = Counter(i for i in ids if i is not None)
    return {i: n for i, n in counts.items() if n > 1}


def split(checked: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(valid rows without `reason`, rejected rows as (id, reason)); every copy of a duplicate id is rejected."""
    dupes = duplicate_ids(checked.column("id").to_pylist())
    reasons = checked.column("reason").to_pylist()
    if dupes:
        for i, row_id in enumerate(checked.column("id").to_pylist()):
            if row_id in dupes:
                note = f"duplicate id: {dupes[row_id]} rows have id {row_id!r}"
                reasons[i] = f"{reasons[i]}; {note}" if reasons[i] else note
    rejected = pa.array([r is not None for r in reasons], pa.bool_())
    errors = pa.table(
        {"id": pc.filter(checked.column("id"), rejected), "reason": pa.array(reasons, pa.string()).filter(rejected)}
    )
    valid = checked.filter(pc.invert(rejected)).drop_columns(["reason"])
    return valid, errors


def plan_batches(rows: pa.Table, batch_size: int, max_blocks: int = 20_000) -> list[pa.Table]:
    """Sort rows by (duration_s, steps, guidance_scale) and cut them into blocks of whole batches.

    Sorting makes almost every batch homogeneous (one generate() call). Each block is one batch
    (`batch_size` rows), so every actor gets work and a retried task redoes one batch; past
    `max_blocks` batches, blocks hold several batches to bound the number of Ray objects.
    """
    if rows.num_rows == 0:
        return []
    keys = [(name, "ascending") for name in ("duration_s", "steps", "guidance_scale")]
    ordered = rows.sort_by(keys)  # null duration (native window) sorts last
    n_batches = math.ceil(ordered.num_rows / batch_size)
    per_block = batch_size * math.ceil(n_batches / max_blocks)
    return [ordered.slice(i, per_block) for i in range(0, ordered.num_rows, per_block)]
