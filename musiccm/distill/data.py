"""Training data: manifest rows (audio bytes or a uri, optional caption) → latents, conditions and mels.

Every row goes through MusicLDM's own data path: decode (soundfile) → downmix → resample to the model
rate → random crop / zero-pad to the training window → DC removal and peak normalisation to 0.5
(AudioLDM/MusicLDM ``normalize_wav``) → log-mel (:mod:`musiccm.mel`) → frozen VAE encoder × scaling_factor.
The condition is the CLAP text embedding of the caption, or, for a row without caption, the clip's own
CLAP audio embedding (MusicLDM was trained on audio embeddings). A row that cannot be read or decoded, or
whose embedding fails (the CLAP tower raises for it, or gives non-finite values), is skipped and counted with
its reason; it never stops the run.

A clip no longer than the window is never cropped, so its latents are the same every epoch: a
:class:`LatentCache` keeps them (keyed by the SHA-256 of the clip's bytes) and the VAE encoder, most of a
CPU step's data time, runs once per clip instead of once per epoch.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from musiccm import external, storage
from musiccm.distill.config import DistillConfig
from musiccm.geometry import AudioGeometry
from musiccm.mel import MelConfig, fit_frames, log_mel
from musiccm.model import MusicLDMComponents

MAX_REASON = 240  # characters kept of one skip reason


class ManifestError(ValueError):
    """A training manifest that cannot be used, with what is allowed."""


ALLOWED = (
    "a training manifest needs a `uri` column (string: local path or s3:// uri) or an `audio` column "
    "(binary: encoded audio, e.g. FLAC/WAV/OGG bytes), and may have a `caption` column (string; "
    "missing or empty captions condition on the clip's own CLAP audio embedding); other columns are ignored"
)


def check_manifest_schema(schema: pa.Schema) -> None:
    """Raise :class:`ManifestError` unless ``schema`` has a usable ``uri``/``audio`` column (and a string caption)."""
    names = set(schema.names)
    problems = []
    if "uri" not in names and "audio" not in names:
        problems.append(f"it has neither `uri` nor `audio` (columns: {sorted(names) or 'none'})")
    if "uri" in names and not (pa.types.is_string(schema.field("uri").type) or
                               pa.types.is_large_string(schema.field("uri").type)):
        problems.append(f"`uri` has type {schema.field('uri').type}, not string")
    if "audio" in names and not (pa.types.is_binary(schema.field("audio").type) or
                                 pa.types.is_large_binary(schema.field("audio").type)):
        problems.append(f"`audio` has type {schema.field('audio').type}, not binary")
    if "caption" in names and not (pa.types.is_string(schema.field("caption").type) or
                                   pa.types.is_large_string(schema.field("caption").type) or
                                   pa.types.is_null(schema.field("caption").type)):
        problems.append(f"`caption` has type {schema.field('caption').type}, not string")
    if problems:
        raise ManifestError(f"bad training manifest: {'; '.join(problems)}. Allowed: {ALLOWED}")


@dataclass
class PreparedBatch:
    """One training batch on the model's device; B may be 0 when every row was bad."""

    latents: torch.Tensor  # (B, C, T, F) float32, VAE latents × scaling_factor
    cond: torch.Tensor  # (B, D) float32, L2-normalised CLAP embeddings
    mel: torch.Tensor  # (B, T_mel, n_mels) float32, MusicLDM log-mel of the same crops
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)
    audio_conditioned: int = 0  # rows conditioned on their own CLAP audio embedding (no caption)
    cached: int = 0  # rows whose latents came from the LatentCache

    @property
    def size(self) -> int:
        return int(self.latents.shape[0])


def window_samples(frozen: MusicLDMComponents, crop_seconds: float | None) -> int:
    """Samples of one training crop: a whole number of latent frames (the UNet's multiple) in samples."""
    return crop_samples(frozen.geometry, crop_seconds)


def crop_samples(g: AudioGeometry, crop_seconds: float | None) -> int:
    """:func:`window_samples` from a model's geometry (e.g. read from its configs, no model loaded)."""
    latent = g.window_frames if crop_seconds is None else g.latent_frames(crop_seconds)
    return latent * g.vae_factor * g.hop_length


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [0, high] (inclusive)."""
    return int(torch.randint(0, high + 1, (1,), generator=generator).item()) if high > 0 else 0


def _row_bytes(rows: dict[str, Any], i: int) -> tuple[bytes, str]:
    audio = rows["audio"][i] if "audio" in rows else None
    if audio is not None and not (isinstance(audio, float) and math.isnan(audio)) and len(audio) > 0:
        return bytes(audio), "audio bytes"
    uri = rows["uri"][i] if "uri" in rows else None
    if isinstance(uri, str) and uri:
        return storage.read_bytes(uri), uri
    raise ValueError("row has no audio bytes and no uri")


def _source_need(src_rate: int, sample_rate: int, num_samples: int) -> int:
    """Source frames (at ``src_rate``) that make ``num_samples`` at the model's ``sample_rate``."""
    return math.ceil(num_samples * src_rate / sample_rate)


def decode_crop(
    data: bytes, sample_rate: int, num_samples: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Decode audio bytes, downmix, take a random crop (reading only that part) and resample → (≤ num_samples,).

    A clip shorter than the window comes back shorter: normalise it, then pad (:func:`load_clip`).
    """
    import soundfile as sf
    import torchaudio.functional as AF

    with sf.SoundFile(io.BytesIO(data)) as f:
        src_rate, total = int(f.samplerate), int(f.frames)
        if total <= 0:
            raise ValueError("no audio samples")
        need = _source_need(src_rate, sample_rate, num_samples)
        start = _randint(total - need, generator)  # random crop position, in source samples
        if start:
            f.seek(start)
        x = f.read(min(need, total), dtype="float32", always_2d=True)  # (S, channels)
    if x.shape[0] == 0:
        raise ValueError("no audio samples")
    if not np.isfinite(x).all():
        raise ValueError("non-finite samples")
    wav = torch.from_numpy(np.ascontiguousarray(x.mean(axis=1)))  # downmix
    if src_rate != sample_rate:
        wav = AF.resample(wav, src_rate, sample_rate)
    return wav[:num_samples]


def load_clip(data: bytes, sample_rate: int, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
    """One training clip (num_samples,): decoded, downmixed, cropped, resampled, normalised, zero-padded."""
    return fit_frames(normalize_wav(decode_crop(data, sample_rate, num_samples, generator)), num_samples, dim=0)


def normalize_wav(wav: torch.Tensor) -> torch.Tensor:
    """MusicLDM/AudioLDM ``normalize_wav`` (applied before padding, as there): remove the mean, peak to 0.5."""
    wav = wav - wav.mean()
    return 0.5 * wav / (wav.abs().max() + 1e-8)


def encode_mel(frozen: MusicLDMComponents, mel: torch.Tensor) -> torch.Tensor:
    """Log-mel (B, T, n_mels) → VAE latents (B, C, T/4, n_mels/4) × scaling_factor (posterior mode).

    The mode, not a sample: deterministic (the data target adds no noise of its own), and a trained
    VAE's posterior std is tiny next to the diffusion noise added right after.
    """
    vae = frozen.vae
    posterior = vae.encode(mel.unsqueeze(1).to(vae.dtype)).latent_dist
    return posterior.mode().float() * vae.config.scaling_factor


class LatentCache:
    """Latents of whole clips (no longer than the window, so never cropped), least recently used out first.

    The key is the SHA-256 of the clip's encoded bytes: the same bytes give the same samples, mel and VAE
    posterior mode, so a hit returns what the encoder would compute (to float rounding of a different batch).
    Latents live on the CPU; ``max_bytes`` bounds their memory per worker.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = self.hits = self.misses = 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def key(data: bytes, sample_rate: int, num_samples: int) -> str | None:
        """The cache key of a clip, or None when it is longer than the window (randomly cropped: not cacheable)."""
        import soundfile as sf

        info = sf.info(io.BytesIO(data))  # the header only
        whole = int(info.frames) <= _source_need(int(info.samplerate), sample_rate, num_samples)
        return hashlib.sha256(data).hexdigest() if whole else None

    def get(self, key: str | None) -> torch.Tensor | None:
        latent = self._items.get(key) if key is not None else None
        if latent is None:
            self.misses += key is not None
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return latent

    def put(self, key: str | None, latent: torch.Tensor) -> None:
        size = _nbytes(latent)
        if key is None or key in self._items or size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            self.bytes -= _nbytes(self._items.popitem(last=False)[1])
        self._items[key] = latent.detach().to("cpu", copy=True)
        self.bytes += size


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def encode_cached(frozen: MusicLDMComponents, mel: torch.Tensor, keys: list[str | None],
                  cache: LatentCache | None) -> tuple[torch.Tensor, int]:
    """:func:`encode_mel` of the rows the cache does not hold (then cached); returns (latents, rows from cache)."""
    if cache is None:
        return encode_mel(frozen, mel), 0
    found = {i: z for i, k in enumerate(keys) if (z := cache.get(k)) is not None}
    todo = [i for i in range(len(keys)) if i not in found]
    if todo:
        fresh = encode_mel(frozen, mel[todo])
        for j, i in enumerate(todo):
            found[i] = fresh[j]
            cache.put(keys[i], fresh[j])
    return torch.stack([found[i].to(mel.device) for i in range(len(keys))]), len(keys) - len(todo)


def _caption(rows: dict[str, Any], i: int) -> str:
    value = rows["caption"][i] if "caption" in rows else None
    return value.strip() if isinstance(value, str) else ""


def _fail(i: int, where: str, exc: BaseException) -> str:
    return f"row {i} ({where}): {type(exc).__name__}: {exc}"[:MAX_REASON]


@torch.no_grad()
def prepare_batch(
    rows: dict[str, Any],
    frozen: MusicLDMComponents,
    config: DistillConfig,
    generator: torch.Generator | None,
    cache: LatentCache | None = None,
) -> PreparedBatch:
    """Rows of a manifest batch (column → list/array) → :class:`PreparedBatch`; bad rows are skipped and counted.

    With ``cache``, whole clips' latents come from it when it has them and go into it when it does not.
    """
    g = frozen.geometry
    mel_cfg = MelConfig.from_components(frozen)
    n_samples = window_samples(frozen, config.crop_seconds)
    n_frames = n_samples // g.hop_length
    n_rows = len(next(iter(rows.values()))) if rows else 0
    waves: list[torch.Tensor] = []
    captions: list[str] = []
    keys: list[str | None] = []
    source: list[int] = []  # the row each clip came from
    reasons: list[str] = []
    # 1. Decode, downmix, crop, resample, normalise: one row at a time, never raising for a bad row.
    for i in range(n_rows):
        where = "row"
        try:
            data, where = _row_bytes(rows, i)
            wav = load_clip(data, g.sample_rate, n_samples, generator)
            key = cache.key(data, g.sample_rate, n_samples) if cache is not None else None
        except Exception as exc:  # a corrupt row of any kind is counted, not fatal
            reasons.append(_fail(i, where, exc))
            continue
        waves.append(wav)
        captions.append(_caption(rows, i))
        keys.append(key)
        source.append(i)
    # 2. Conditions: CLAP text embedding of the caption, else the clip's own CLAP audio embedding. A clip whose
    #    embedding fails (or is not finite) is skipped and counted like an unreadable row.
    conds, failed = conditions(frozen, waves, captions, g.sample_rate)
    reasons += [_fail(source[j], "conditioning", exc) for j, exc in sorted(failed.items())]
    kept = [j for j in range(len(waves)) if j not in failed]
    waves, captions, keys = [waves[j] for j in kept], [captions[j] for j in kept], [keys[j] for j in kept]
    device = frozen.device
    latent_shape = (0, g.latent_channels, n_frames // g.vae_factor, g.latent_bins)
    if not waves:
        empty = torch.zeros(latent_shape, device=device)
        cond_dim = int(frozen.unet.config.projection_class_embeddings_input_dim or 512)
        return PreparedBatch(empty, torch.zeros(0, cond_dim, device=device), torch.zeros(0, n_frames, g.n_mels,
                             device=device), len(reasons), reasons)
    cond = torch.stack([conds[j] for j in kept]).float().to(device)
    wav = torch.stack(waves).to(device)  # (B, S)
    # 3. MusicLDM log-mel, cropped to the window (the centred STFT gives one extra frame).
    mel = fit_frames(log_mel(wav, mel_cfg), n_frames)  # (B, T, n_mels)
    # 4. Frozen VAE encoder (posterior mode) × scaling_factor, or the cache's copy of it.
    latents, cached = encode_cached(frozen, mel, keys, cache)  # (B, C, T/4, F/4)
    return PreparedBatch(latents, cond, mel.float(), len(reasons), reasons,
                         audio_conditioned=sum(not c for c in captions), cached=cached)


def conditions(frozen: MusicLDMComponents, waves: list[torch.Tensor], captions: list[str],
               sample_rate: int) -> tuple[dict[int, torch.Tensor], dict[int, BaseException]]:
    """Each clip's condition (index → (D,)): the CLAP text embedding of its caption, or without one its own CLAP
    audio embedding; and the clips whose embedding failed (index → the reason). Never raises for a bad clip."""

    def text(ids: list[int]) -> torch.Tensor:
        return external.encode_text(frozen, [captions[i] for i in ids])[0]

    def audio(ids: list[int]) -> torch.Tensor:
        emb = external.encode_audio(frozen, [waves[i].numpy() for i in ids], sample_rate)
        if emb is None:  # no CLAP audio front end: fall back to the unconditional ("") embedding
            emb = external.encode_text(frozen, [""])[0].expand(len(ids), -1)
        return emb

    failed: dict[int, BaseException] = {}
    conds = _embed(text, [i for i, c in enumerate(captions) if c], "text", failed)
    conds.update(_embed(audio, [i for i, c in enumerate(captions) if not c], "audio", failed))
    return conds, failed


def _embed(embed: Callable[[list[int]], torch.Tensor], ids: list[int], kind: str,
           failed: dict[int, BaseException]) -> dict[int, torch.Tensor]:
    """``embed`` of all ``ids`` in one call; when that raises, one id at a time. An id whose embedding raises or is
    not finite goes into ``failed`` with the reason instead."""
    if not ids:
        return {}
    try:
        out = dict(zip(ids, embed(ids), strict=True))
    except Exception:  # some clip breaks the batch: find which, keep the others
        out = {}
        for i in ids:
            try:
                out[i] = embed([i])[0]
            except Exception as exc:
                failed[i] = exc
    for i in [i for i, e in out.items() if not bool(torch.isfinite(e).all())]:
        failed[i] = ValueError(f"non-finite CLAP {kind} embedding")
        del out[i]
    return out
