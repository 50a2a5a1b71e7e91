"""metrics.json and the Markdown comparison table laid out like MusicCM Table 1.

`{out}/metrics.json` (schema_version 1):

    status           "ok", or "failed: ..." when no generated clip could be read (exit code 1)
    label            the table row's name (--label, else the batch run's name, else the output's last part)
    created_at, wall_seconds
    model            {name, hash, uri, trained} of the generating model (from the metric rows / _SUMMARY.json)
    steps            sampling steps: an int, or a sorted list when the run mixed several
    latency          {seconds_per_clip_mean, rtf_mean, batch_clips_mean, device, clips} from the metric rows:
                     each clip's share of its generate() call (batched: lower than batch-1 latency)
    metrics          key → number or null; audioldm_eval's names where it has the metric:
                     frechet_distance (FD_pann), frechet_audio_distance (FD_vgg), inception_score_mean/_std,
                     kullback_leibler_divergence_softmax/_sigmoid, kernel_inception_distance_mean/_std,
                     clap_text_audio_mean/_std, clap_text_audio_reference_mean/_std,
                     sim_aa@0.90, sim_aa@0.95, sim_aa_max_mean; with --classifier also frechet_distance_cls,
                     kernel_inception_distance_cls_mean/_std, inception_score_cls_mean/_std,
                     kullback_leibler_divergence_cls_softmax/_sigmoid
    attribute_accuracy            {head: fraction of generated clips whose predicted class equals their label}
                                  for the classifier heads that are label columns of the metric rows ({} else)
    attribute_accuracy_mean       the mean over those heads, or null
    reference_attribute_accuracy  the same on the reference set (the classifier's own accuracy on real audio),
                                  when the reference carries label columns; reference_attribute_accuracy_mean
    unavailable      key → {reason, how_to_provide?} for every null metric
    counts           {generated, reference, train, paired_for_kl, unreadable, missing_audio, vggish_clips_generated}
    unreadable       [{set, id, uri, error}]: files that could not be read or decoded (never zero-filled)
    missing_audio    generated ids with a metric row but no audio file
    notes            plain-language caveats (partial pairing, short clips, few clips, ...)
    networks         pann / vggish / clap / classifier: {uri, sha256_16, ...} of the weights used, or
                     {reason, how_to_provide}
    inputs, config, versions, table_row

The table (`{out}/table.md` or --table) has one row per label; evaluating again under the same label
replaces its row, a new label appends one, so several runs compare side by side. Runs with a label
classifier add the columns FD_cls, IS_cls, KL_cls and Acc (attribute accuracy); once one row has them the
table does, and rows without them show n/a.
"""

from __future__ import annotations

import json
import platform
from collections import Counter
from datetime import UTC, datetime
from pathlib import PurePosixPath

import numpy as np

from musiccm import storage

SCHEMA_VERSION = 1
COLUMNS = ("Model", "Steps", "FD_pann ↓", "FD_vgg ↓", "IS ↑", "KL ↓", "Latency (s/clip) ↓", "Clips", "Run")
CLS_COLUMNS = ("FD_cls ↓", "IS_cls ↑", "KL_cls ↓", "Acc (%) ↑")  # with a label classifier, before latency
WIDE_COLUMNS = (*COLUMNS[:6], *CLS_COLUMNS, *COLUMNS[6:])
NA = "n/a"  # a cell whose metric is unavailable, or a column the row's run did not have
CLS_METRICS = ("frechet_distance_cls", "inception_score_cls_mean", "kullback_leibler_divergence_cls_softmax")
TITLE = "# MusicCM evaluation (laid out like MusicCM Table 1)"
LEGEND = (
    "FD_pann: Fréchet distance of Cnn14 (PANNs 16 kHz) embeddings; FD_vgg: Fréchet distance of VGGish frame "
    "embeddings; IS: Inception Score over Cnn14 logits; KL: KL(reference ‖ generated) of Cnn14 softmax, paired by "
    "id (audioldm_eval 0.0.3). Latency: mean generation seconds per clip as recorded by the batch job (each "
    "clip's share of its batched call). n/a: not available, see metrics.json."
)
CLS_LEGEND = (
    "FD_cls, IS_cls, KL_cls: the same metrics on the label classifier's embedding and logits (--classifier); "
    "Acc: mean attribute accuracy (%) of the classifier's predictions against the prompts' labels."
)


def default_label(generated: str, summary: dict | None) -> str:
    """The batch run's name, else the last part of the generated path."""
    name = (summary or {}).get("run_name") or PurePosixPath(generated.rstrip("/")).name or generated
    return str(name).replace("|", "/").replace("\n", " ")


def _model(generation: list[dict], summary: dict | None) -> dict:
    info = dict((summary or {}).get("model", {}))
    names = Counter(r.get("model") for r in generation if r.get("model"))
    hashes = Counter(r.get("model_hash") for r in generation if r.get("model_hash"))
    if names:
        info["name"] = " + ".join(sorted(names)) if len(names) > 1 else next(iter(names))
    if hashes:
        info["hash"] = " + ".join(sorted(hashes)) if len(hashes) > 1 else next(iter(hashes))
    return {k: info.get(k) for k in ("name", "hash", "uri", "trained")}


def _latency(generation: list[dict]) -> dict | None:
    secs = [r["generation_s"] for r in generation if r.get("generation_s") is not None]
    if not secs:
        return None
    rtf = [r["rtf"] for r in generation if r.get("rtf") is not None]
    batch = [r["batch_clips"] for r in generation if r.get("batch_clips") is not None]
    devices = sorted({r["device"] for r in generation if r.get("device")})
    return {"seconds_per_clip_mean": float(np.mean(secs)), "rtf_mean": float(np.mean(rtf)) if rtf else None,
            "batch_clips_mean": float(np.mean(batch)) if batch else None, "device": " + ".join(devices) or None,
            "clips": len(secs)}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("musiccm", "torch", "torchaudio", "transformers", "audioldm_eval", "torchvggish", "scipy", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def build(
    *, status: str, config: dict, label: str, inputs: dict, counts: dict, generation: list[dict], summary: dict | None,
    values: dict, unavailable: dict, notes: list[str], networks: dict, unreadable: list[dict],
    missing_audio: list[str], started_at: str, wall_seconds: float, attributes: dict | None = None,
) -> dict:
    """The metrics.json document (see the module docstring); `attributes`: the attribute_accuracy keys."""
    steps = sorted({int(r["steps"]) for r in generation if r.get("steps") is not None})
    result = {
        "schema_version": SCHEMA_VERSION, "status": status, "label": label, "created_at": datetime.now(UTC).isoformat(),
        "started_at": started_at, "wall_seconds": wall_seconds,
        "model": _model(generation, summary), "steps": steps[0] if len(steps) == 1 else (steps or None),
        "latency": _latency(generation), "metrics": values, "unavailable": unavailable, "counts": counts,
        "unreadable": unreadable, "missing_audio": missing_audio, "notes": notes, "networks": networks,
        "inputs": inputs, "config": config, "versions": _versions(), **(attributes or {}),
    }
    result["table_row"] = table_row(result)
    return result


def _num(value: float | None, digits: int = 2) -> str:
    return NA if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _has_classifier(result: dict) -> bool:
    """Whether the run had a label classifier (its metrics, its accuracy, or its network entry)."""
    m = result["metrics"]
    return (any(m.get(k) is not None for k in CLS_METRICS) or result.get("attribute_accuracy_mean") is not None
            or "uri" in result.get("networks", {}).get("classifier", {}))


def table_row(result: dict) -> dict[str, str]:
    """One Table-1 row: model, steps, FD_pann, FD_vgg, IS, KL (softmax), [FD_cls, IS_cls, KL_cls, Acc],
    latency, clips, run label; the bracketed cells only for a run with a label classifier."""
    m, steps, latency = result["metrics"], result["steps"], result.get("latency") or {}
    cells = [
        result["model"].get("name") or "unknown",
        "n/a" if steps is None else (",".join(map(str, steps)) if isinstance(steps, list) else str(steps)),
        _num(m.get("frechet_distance")), _num(m.get("frechet_audio_distance")),
        _num(m.get("inception_score_mean")), _num(m.get("kullback_leibler_divergence_softmax")),
        _num(latency.get("seconds_per_clip_mean"), 3), str(result["counts"]["generated"]), result["label"],
    ]
    columns = COLUMNS
    if _has_classifier(result):
        accuracy = result.get("attribute_accuracy_mean")
        cells[6:6] = [*(_num(m.get(k)) for k in CLS_METRICS), _num(None if accuracy is None else 100 * accuracy, 1)]
        columns = WIDE_COLUMNS
    return dict(zip(columns, (c.replace("|", "/").replace("\n", " ") for c in cells), strict=True))


def table_columns(rows: list[dict[str, str]]) -> tuple[str, ...]:
    """The header: Table 1's columns, widened by the classifier columns when any row has them."""
    return WIDE_COLUMNS if any(c in r for r in rows for c in CLS_COLUMNS) else COLUMNS


def format_table(rows: list[dict[str, str]]) -> str:
    """The whole Markdown file: title, table, legend (rows lacking a column show n/a there)."""
    columns = table_columns(rows)
    lines = [TITLE, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r.get(c, NA) for c in columns) + " |" for r in rows]
    legend = [LEGEND, "", CLS_LEGEND] if columns == WIDE_COLUMNS else [LEGEND]
    return "\n".join([*lines, "", *legend, ""])


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of a table written by `format_table` (ValueError for a file laid out otherwise)."""
    rows, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            if tuple(header) not in (COLUMNS, WIDE_COLUMNS):
                raise ValueError(f"the table's columns {header} are not {list(COLUMNS)} (or those with "
                                 f"{list(CLS_COLUMNS)} before latency); use another --table")
        elif not all(set(c) <= {"-", ":"} for c in cells):
            rows.append(dict(zip(header, cells, strict=False)))
    return rows


def upsert_row(table_uri: str, row: dict[str, str]) -> str:
    """Add `row` to the table at `table_uri` (replacing a row with the same Run label); return the new text.

    Older rows without the classifier columns keep them empty (n/a) when `row` has them, and the reverse.
    Read-modify-write: two evaluations appending to one table at the same instant can lose a row.
    """
    rows = parse_table(storage.read_bytes(table_uri).decode()) if storage.exists(table_uri) else []
    run = row["Run"]
    rows = [r for r in rows if r.get("Run") != run] + [row]
    text = format_table(rows)
    storage.write_bytes(table_uri, text.encode())
    return text


def write(result: dict, out: str, table_uri: str) -> None:
    """`{out}/metrics.json` (atomic) and the table row."""
    storage.write_bytes(storage.join(out, "metrics.json"), json.dumps(result, indent=2, default=str).encode())
    upsert_row(table_uri, result["table_row"])


def summary_text(result: dict) -> str:
    """A few lines for the terminal: the table row, unavailable metrics, unreadable files, notes."""
    row = result["table_row"]
    lines = [" | ".join(f"{k.split(' ')[0]} {v}" for k, v in row.items())]
    if result["status"] != "ok":
        lines.insert(0, f"STATUS: {result['status']}")
    extra = {k: v for k, v in result["metrics"].items() if v is not None and k not in CLS_METRICS and not
             k.startswith(("frechet", "inception_score_mean", "kullback_leibler_divergence_softmax"))}
    if extra:
        lines.append("also: " + ", ".join(f"{k} {v:.4g}" for k, v in extra.items()))
    for key in ("attribute_accuracy", "reference_attribute_accuracy"):
        if result.get(key):
            lines.append(f"{key.replace('_', ' ')}: " + ", ".join(f"{h} {v:.1%}" for h, v in result[key].items()))
    groups: dict[str, list[str]] = {}
    for key, why in result["unavailable"].items():
        groups.setdefault(f"{why['reason']}" + (f" ({why['how_to_provide']})" if why.get("how_to_provide") else ""),
                          []).append(key)
    lines += [f"unavailable: {', '.join(keys)}: {reason}" for reason, keys in groups.items()]
    if result["unreadable"]:
        lines.append(f"unreadable files ({len(result['unreadable'])}): "
                     + ", ".join(u["uri"] for u in result["unreadable"][:5]))
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)
