"""The Ray Data stage of batch generation: a callable class that loads the model once per actor.

`GeneratorStage(config)(batch)` takes checked manifest rows (a pyarrow Table), generates each
group of rows that share (duration, steps, guidance) in one `MusicCM.generate` call, writes every
clip straight to `{output}/audio/{id}.{format}` (atomic, deterministic key: a retried task
overwrites the same object) and returns only metric rows. Audio never travels through Ray's
object store. The class imports no Ray and runs the same in a plain loop.

A pipeline inside the actor: the job runs `config.calls_per_actor` calls of one actor at once (Ray Data's
threaded actors), and a lock lets one of them use the model at a time. While one batch generates, the
batch before it is encoded (FLAC/WAV), hashed, measured and written by the I/O threads, so the
accelerator does not wait for the CPU half. Each metric row records its clip's share of every stage
(`generation_s`, `clap_s`, `encode_s`, `write_s`) for the summary's busy fraction.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby

import numpy as np
import pyarrow as pa

from musiccm import audio_io, model, retry, storage
from musiccm.batch import metrics
from musiccm.batch.config import MAX_STEPS, BatchConfig
from musiccm.batch.manifest import CHECKED
from musiccm.logs import quiet_libraries
from musiccm.pipeline import GenerationConfig, MusicCM


def load_model(uri: str, device: str, dtype: str = "float32", local_files_only: bool = False):
    """Load a model and describe it; an s3:// model is fetched to a private temp dir, hashed, then removed.

    A private directory per actor (not the shared per-node cache) means two actors on a node never
    read each other's half-downloaded files.
    """
    import torch

    cache = tempfile.mkdtemp(prefix="musiccm-model-") if storage.is_s3(uri) else None
    try:
        components = model.load(uri, device=device, dtype=getattr(torch, dtype),
                                 local_files_only=local_files_only, cache_dir=cache)
        content = model.content_hash(components.path) if components.path else None
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    info = {
        "name": str(components.extra.get("name") or components.name),
        "uri": uri,
        "hash": content,
        "trained": components.extra.get("trained"),
    }
    return components, info


def node_identity() -> str:
    """The Ray node id inside a Ray worker, else the host name (no Ray import here)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            return ray.get_runtime_context().get_node_id()
        except Exception:  # best effort: fall back to the host name
            pass
    return socket.gethostname()


def device_name(device: str) -> str:
    """e.g. `cuda:0 (NVIDIA H100 80GB HBM3)` or `cpu`."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return dev.type


class GeneratorStage:
    """Callable class for `Dataset.map_batches`: one model replica per actor."""

    def __init__(self, config: BatchConfig, device: str | None = None, torch_threads: int | None = None,
                 io_threads: int = 4) -> None:
        import torch

        quiet_libraries()
        retry.set_budget(config.storage_retry_s)  # this actor's storage calls ride out outages as configured
        self.torch_threads = torch_threads
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.config = config
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.components, self.model_info = load_model(config.model, self.device, config.dtype,
                                                      config.local_files_only)
        # Steps come with every row (or are null: the model's default); a value the model refuses fails its
        # clips in _generate, never the actor.
        self.generator = MusicCM(self.components, GenerationConfig(
            hop_frames=config.hop_frames, taper=config.taper, crop_batch_size=config.crop_batch_size,
            max_duration=config.max_duration, max_timestep=config.max_timestep))
        self.native_s = self.components.geometry.native_duration
        self.uses_guidance = self.components.has_guidance_embedding or not self.components.is_consistency
        self.node_id = node_identity()
        self.device_label = device_name(self.device)
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="audio-write")
        self._model_lock = threading.Lock()  # one generate() at a time; the other calls encode and write

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Checked manifest rows → stage rows (metric columns + `error`), one per input row."""
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)  # per calling thread: OpenMP settings are thread-local
        carried = pa.schema([f for f in batch.schema if f.name not in CHECKED.names])
        rows = batch.to_pylist()
        out: list[dict] = []

        def key(row: dict) -> tuple:
            return (row["duration_s"] or self.native_s, row["steps"], row["guidance_scale"])

        for _, group in groupby(sorted(rows, key=lambda r: tuple(_sortable(k) for k in key(r))), key=key):
            out += self._generate(list(group))
        return metrics.to_table(out, metrics.stage_schema(carried))

    def _generate(self, rows: list[dict]) -> list[dict]:
        """One generate() call for rows sharing (duration, steps, guidance); write clips; metric rows."""
        first = rows[0]
        duration = first["duration_s"] or self.native_s
        cfg = GenerationConfig(
            steps=first["steps"], guidance_scale=first["guidance_scale"], hop_frames=self.config.hop_frames,
            taper=self.config.taper, crop_batch_size=self.config.crop_batch_size, max_duration=self.config.max_duration,
            max_timestep=self.config.max_timestep,
        )
        prompts = [r["prompt"] for r in rows]
        clap: list[float | None] = [None] * len(rows)
        with self._model_lock:  # 1. the model's part, one call at a time
            start = time.perf_counter()
            try:
                self._check_steps(first["steps"])
                result = self.generator.generate(prompts, duration, [r["seed"] for r in rows], cfg)
            except Exception as exc:  # a bad group (OOM, odd duration, steps) must not sink the job: its rows fail
                return [metrics.failure_row(r, exc, self.node_id, self.device_label) for r in rows]
            generated = time.perf_counter()
            if self.config.clap_score:
                try:
                    clap = metrics.clap_scores(self.components, prompts, result.waveforms, result.sample_rate)
                except Exception:  # a metric must never cost the clip: the score stays null
                    pass
            scored = time.perf_counter()
        rows = [{**r, "steps": result.config.steps} for r in rows]  # the steps used (a null row took the default)
        # 2. The CPU part, outside the lock: encode and write concurrently (S3 latency) while the next call
        # generates. A StorageError that outlasts the retry budget stops the job.
        written = list(self._io.map(self._write, rows, list(result.waveforms), [result.sample_rate] * len(rows)))
        guidance = result.config.guidance_scale if self.uses_guidance else None
        times = {"generation_s": (generated - start) / len(rows), "clap_s": (scored - generated) / len(rows)}
        return [
            metrics.metric_row(
                row, waveform=wav, sample_rate=result.sample_rate, audio=audio, model=self.model_info,
                guidance_scale=guidance, truncated=truncated, clap=score, batch_clips=len(rows),
                node_id=self.node_id, device=self.device_label, **times,
            )
            for row, wav, audio, truncated, score in zip(
                rows, result.waveforms, written, result.truncated, clap, strict=True
            )
        ]

    def _check_steps(self, steps: int | None) -> None:
        """A student's step limit, for models whose kind the driver could not read (hub ids)."""
        if self.components.is_consistency and steps is not None and not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be in 1..{MAX_STEPS} for a distilled student, got {steps}")

    def _write(self, row: dict, waveform: np.ndarray, sample_rate: int) -> metrics.AudioFile:
        """Encode one clip and write it atomically to its deterministic key."""
        tags = {"prompt": row["prompt"], "id": row["id"], "seed": row["seed"], "steps": row["steps"],
                "model": self.model_info["name"], "model_hash": self.model_info["hash"]}
        start = time.perf_counter()
        data = audio_io.encode(waveform, sample_rate, row["format"], tags)
        digest = hashlib.sha256(data).hexdigest()
        encoded = time.perf_counter()
        uri = storage.join(self.config.output, "audio", f"{row['id']}.{row['format']}")
        storage.write_bytes(uri, data)
        return metrics.AudioFile(uri=uri, bytes=len(data), sha256=digest, encode_s=encoded - start,
                                 write_s=time.perf_counter() - encoded)


def _sortable(value: object) -> tuple:
    """Sort key that puts None first and never compares None with a number."""
    return (value is not None, value if value is not None else 0)

