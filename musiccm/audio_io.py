"""Audio encoding and atomic audio-file writes (soundfile, 16-bit PCM, tags where the format allows)."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

FORMATS = {"flac": "FLAC", "wav": "WAV"}


def format_of(path: str) -> str:
    """Audio format from a file name's extension (flac | wav), or a ValueError naming what is allowed."""
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in FORMATS:
        raise ValueError(f"output must end in .flac or .wav, got {path!r}")
    return ext


def encode(waveform: np.ndarray, sample_rate: int, fmt: str, tags: dict | None = None) -> bytes:
    """Encode a mono float waveform as 16-bit PCM FLAC/WAV bytes; ``tags`` go in title/comment/software."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    data = np.clip(np.asarray(waveform, dtype=np.float32).reshape(-1), -1.0, 1.0)
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=sample_rate, channels=1, format=FORMATS[fmt], subtype="PCM_16") as f:
        tags = dict(tags or {})
        if "prompt" in tags:
            f.title = str(tags.pop("prompt"))[:1000]
        f.software = "musiccm"
        if tags:
            f.comment = json.dumps(tags, sort_keys=True, default=str)
        f.write(data)
    return buf.getvalue()


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to ``path`` via a temporary sibling and a rename: a failure leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_tags(path: str | os.PathLike) -> dict:
    """Tags written by :func:`encode`: prompt plus the JSON comment fields."""
    with sf.SoundFile(path) as f:
        meta = f.copy_metadata()
    tags = json.loads(meta["comment"]) if meta.get("comment") else {}
    if meta.get("title"):
        tags["prompt"] = meta["title"]
    return tags


def stats(waveform: np.ndarray, silence_dbfs: float = -60.0) -> dict:
    """Peak and RMS in dBFS, fraction of clipped samples (|x| ≥ 1) and of silent samples."""
    x = np.asarray(waveform, dtype=np.float64).reshape(-1)
    floor = 1e-10
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    rms = float(np.sqrt(np.mean(x**2))) if x.size else 0.0
    thresh = 10 ** (silence_dbfs / 20)
    return {
        "peak_dbfs": 20 * np.log10(max(peak, floor)),
        "rms_dbfs": 20 * np.log10(max(rms, floor)),
        "clipped_fraction": float(np.mean(np.abs(x) >= 1.0 - 1 / 32768)) if x.size else 0.0,
        "silent_fraction": float(np.mean(np.abs(x) < thresh)) if x.size else 0.0,
    }
