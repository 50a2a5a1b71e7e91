"""Periodic validation of a distillation run: the fixed prompt set sampled with 1, 2 and 4 steps.

Export-free: the current EMA student is wrapped as consistency-student components in memory and sampled
through the generation core (``MusicCM``). Outputs, at deterministic keys (a retried validation
overwrites the same objects):

    {run}/validation/step-000400/1-step/00.flac   one clip per (sampling steps, prompt index)
    {run}/validation/step-000400/metrics.parquet  one row per clip (prompt, seed, timings, level stats,
                                                  CLAP text-audio similarity, audio uri)
"""

from __future__ import annotations

import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from musiccm import audio_io, external, storage
from musiccm.distill.config import DistillConfig
from musiccm.model import MusicLDMComponents
from musiccm.pipeline import GenerationConfig, MusicCM


def validation_dir(run: str, step: int) -> str:
    return storage.join(run, "validation", f"step-{step:06d}")


def clap_similarity(c: MusicLDMComponents, prompts: list[str], waveforms: np.ndarray) -> list[float | None]:
    """Cosine similarity of the CLAP text embedding of each prompt and the CLAP audio embedding of its clip."""
    audio = external.encode_audio(c, list(waveforms), c.geometry.sample_rate)
    if audio is None:
        return [None] * len(prompts)
    text, _ = external.encode_text(c, prompts)
    return [float(x) for x in (text.to(audio.device) * audio).sum(-1).cpu()]


@torch.no_grad()
def validate(student: MusicLDMComponents, config: DistillConfig, step: int, run: str) -> dict[str, float]:
    """Sample every prompt with every step count, write audio + metrics.parquet; return mean figures."""
    prompts = list(config.validation_prompts)
    if not prompts:
        return {}
    pipe = MusicCM(student)
    duration = student.geometry.native_duration
    seeds = [config.seed + i for i in range(len(prompts))]  # the same noise at every validation
    out_dir = validation_dir(run, step)
    rows: list[dict] = []
    summary: dict[str, float] = {}
    for n_steps in config.validation_steps:
        gen_cfg = GenerationConfig(steps=n_steps, guidance_scale=config.guidance_scale)
        start = time.perf_counter()
        result = pipe.generate(prompts, duration, seeds, config=gen_cfg)
        seconds = (time.perf_counter() - start) / len(prompts)
        clap = clap_similarity(student, prompts, result.waveforms)
        for i, (prompt, wav) in enumerate(zip(prompts, result.waveforms, strict=True)):
            uri = storage.join(out_dir, f"{n_steps}-step", f"{i:02d}.flac")
            tags = {"prompt": prompt, "seed": seeds[i], "sampling_steps": n_steps, "train_step": step,
                    "run": config.name}
            storage.write_bytes(uri, audio_io.encode(wav, result.sample_rate, "flac", tags))
            rows.append({"train_step": step, "sampling_steps": n_steps, "prompt_index": i, "prompt": prompt,
                         "seed": seeds[i], "duration_s": duration, "num_samples": int(wav.shape[-1]),
                         "seconds_per_clip": seconds, "clap_score": clap[i], "uri": uri,
                         **audio_io.stats(wav)})
        scores = [s for s in clap if s is not None]
        if scores:
            summary[f"val_clap_{n_steps}step"] = float(np.mean(scores))
        summary[f"val_rms_dbfs_{n_steps}step"] = float(np.mean([r["rms_dbfs"] for r in rows[-len(prompts):]]))
        summary[f"val_seconds_per_clip_{n_steps}step"] = seconds
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    storage.write_bytes(storage.join(out_dir, "metrics.parquet"), buf.getvalue())
    return summary
