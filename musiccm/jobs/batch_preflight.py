"""Checks of a batch job before Ray starts: each failure is one line and exit 2, and nothing is written.

Order: the manifest's files and their schemas (footers only), the model (its configs and weight headers: what the
actors' load would refuse), `--hop-frames` / `--taper` against the model's window, the output's writability; then,
once the job holds the output's lease (:mod:`musiccm.batch.ownership`), :func:`claim_output` records or checks
the generation settings in `_RUN.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from musiccm import model, storage
from musiccm.batch import manifest
from musiccm.batch.config import BatchConfig, resolve_default_steps
from musiccm.batch.manifest import ManifestError
from musiccm.model import ModelError


class RunConflict(ValueError):
    """The output already belongs to a run with different generation settings."""



def manifest_files(uri: str) -> list[str]:
    """The Parquet files of a manifest: the file itself, or every file under a prefix (skipping `_*`, `.*`)."""
    try:
        if storage.exists(uri):
            return [uri]
        files = storage.list_files(uri)
    except storage.StorageError as exc:
        raise ManifestError(f"manifest {exc}") from None
    files = [f for f in files if not f.rsplit("/", 1)[-1].startswith(("_", "."))]
    if not files:
        raise ManifestError(f"manifest {uri}: no such file, and no files under that prefix")
    return files


def manifest_schema(files: list[str]) -> pa.Schema:
    """Read (footers only) and check every file's schema; return the carried-through columns' schema."""
    schemas = []
    for uri in files:
        fs, path = storage.pyarrow_fs(uri)
        try:
            schemas.append((uri, pq.read_schema(path, filesystem=fs)))
        except (pa.ArrowInvalid, OSError) as exc:
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ManifestError(f"manifest {uri}: not a readable Parquet file ({cause})") from None
    schema = manifest.unify_schemas(schemas)
    return manifest.check_schema(schema, files[0] if len(files) == 1 else f"manifest {files[0]} (+{len(files) - 1})")


def inspect_model(uri: str) -> dict:
    """Name, trained flag, kind and (local models) content hash, without loading weights; ModelError if unusable.

    `consistency` is True for a distilled student, False for a teacher, None for a hub id (not read here).
    """
    return dict(_inspect_model(uri))


def is_consistency(index: dict) -> bool | None:
    """Whether a model_index.json describes a consistency student (its scheduler); None if it names none."""
    entry = index.get("scheduler")
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)):
        return None
    return entry[1] in model.CONSISTENCY_SCHEDULERS


@functools.lru_cache(maxsize=8)
def _inspect_model(uri: str) -> dict:
    info: dict[str, Any] = {"uri": uri, "name": uri.rstrip("/").rsplit("/", 1)[-1], "hash": None, "trained": None,
                            "consistency": None}
    if storage.is_s3(uri):
        try:
            index = json.loads(storage.read_bytes(storage.join(uri, "model_index.json")))
        except storage.StorageError as exc:
            raise ModelError(f"model {uri}: cannot read model_index.json ({str(exc).partition(': ')[2]})") from None
        model.check_loadable(uri, uri)  # configs and safetensors headers only (ranged reads), no weights
    elif os.path.exists(os.path.expanduser(uri)):
        info["uri"] = os.path.abspath(os.path.expanduser(uri))  # readable from any working directory
        directory = model.resolve(uri)
        model.check_loadable(directory, uri)  # what the actors' load would refuse, refused before Ray starts
        index = json.loads(open(os.path.join(directory, "model_index.json")).read())
        info["hash"] = model.content_hash(directory)
    else:
        return info  # a hub id: the actors resolve it (with --local-files-only, from the local cache only)
    extra = index.get("musiccm", {})
    info.update(name=extra.get("name", info["name"]), trained=extra.get("trained"), note=extra.get("note"),
                consistency=is_consistency(index))
    return info


def with_model_steps(config: BatchConfig, model_info: dict) -> BatchConfig:
    """The config with `default_steps` resolved for the model's kind; ValueError if it is out of range for it."""
    try:
        steps = resolve_default_steps(config.default_steps, model_info["consistency"])
    except ValueError as exc:
        raise ValueError(f"model {model_info['name']}: {exc}") from None
    return dataclasses.replace(config, default_steps=steps)


def check_claim(config: BatchConfig, model_info: dict) -> tuple[dict, dict | None]:
    """(this run's `_RUN.json` record without attempts, the output's current one or None); RunConflict when the
    output holds a run with other generation settings. Reads only."""
    uri = storage.join(config.output, "_RUN.json")
    fingerprint = {**config.fingerprint(), "model": model_info["hash"] or model_info["uri"]}
    record = {"run_name": config.run_name, "fingerprint": fingerprint, "config": config.to_dict()}
    previous = json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None
    old = (previous or {}).get("fingerprint", {})
    changed = [f"{k}: {old.get(k)!r} → {v!r}" for k, v in fingerprint.items() if previous and old.get(k) != v]
    if changed:
        raise RunConflict(
            f"{config.output} holds a run with other generation settings ({'; '.join(changed)}); "
            "resuming would mix them. Use a new --output (or --run-name)."
        )
    return record, previous


def claim_output(config: BatchConfig, model_info: dict, attempt: str) -> None:
    """Write `_RUN.json`, or check that the run which owns the output used the same generation settings."""
    record, previous = check_claim(config, model_info)
    record["attempts"] = [*(previous or {}).get("attempts", []), attempt]
    storage.write_bytes(storage.join(config.output, "_RUN.json"), json.dumps(record, indent=2, default=str).encode())



def preflight(config: BatchConfig) -> tuple[BatchConfig, list[str], pa.Schema, dict]:
    """Everything that can fail fast, before Ray: manifest files and schema, output writability (a dry run writes
    nothing, so it skips that probe), model.

    Returns the config with the model's default steps filled in (what `_RUN.json` and the summary record).
    """
    files = manifest_files(config.manifest)
    carried = manifest_schema(files)
    model_info = inspect_model(config.model)
    check_crop_fusion(config, model_info)
    if not config.dry_run:
        storage.check_writable(config.output)
    config = with_model_steps(config, model_info)
    return config, files, carried, model_info


def check_crop_fusion(config: BatchConfig, model_info: dict) -> None:
    """--hop-frames and --taper against the model's native window (from its UNet config; hub ids: by the actors)."""
    if config.hop_frames is None and config.taper is None:
        return
    uri = model_info["uri"]
    if not (storage.is_s3(uri) or os.path.isdir(uri)):
        return
    try:
        unet = json.loads(storage.read_bytes(storage.join(uri, "unet", "config.json")))
        size = unet["sample_size"]
        window = int(size[0] if isinstance(size, list) else size)
    except (storage.StorageError, ValueError, KeyError, TypeError, IndexError):
        return  # the model check reports an unreadable UNet config
    if config.hop_frames is not None and config.hop_frames > window:
        raise ValueError(f"--hop-frames {config.hop_frames} is invalid for model {model_info['name']}; allowed: "
                         f"1..{window} (its native window in latent frames)")
    if config.taper is not None and config.taper > window // 2:
        raise ValueError(f"--taper {config.taper} is invalid for model {model_info['name']}; allowed: "
                         f"0..{window // 2} (half its native window in latent frames)")
