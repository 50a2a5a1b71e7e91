"""Training data for distillation: MusicLDM's mel front end against librosa/Kaldi/CLAP references, and
manifest rows (bytes, local and S3 uris, captioned or not, corrupt) → latents, conditions and mels."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import librosa
import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import torch

from musiccm import external, storage
from musiccm import mel as M
from musiccm.distill.config import DistillConfig
from musiccm.distill.data import (
    LatentCache,
    ManifestError,
    check_manifest_schema,
    decode_crop,
    encode_mel,
    load_clip,
    normalize_wav,
    prepare_batch,
    window_samples,
)
from musiccm.testing.seaweed import SeaweedFS

SR = 16000


def music_like(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    """Chords of harmonic tones with slow envelopes plus a little noise, peak 0.5."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    y = np.zeros_like(t)
    for k, f0 in enumerate((220.0, 277.2, 329.6, 440.0)):
        env = 0.5 + 0.5 * np.sin(2 * np.pi * (k + 1) * 0.7 * t)
        for h in range(1, 7):
            y += 0.3 / h * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6)) * env
    y += 0.03 * rng.standard_normal(len(t))
    return (0.5 * y / np.abs(y).max()).astype(np.float32)


def encoded(x: np.ndarray, sr: int, fmt: str = "FLAC", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def s3() -> Iterator[SeaweedFS]:
    with SeaweedFS() as server:
        server.make_bucket("data")
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# --------------------------------------------------------------------------- mel front ends
def test_log_mel_matches_librosa_reference():
    y = music_like(2.0)
    got = M.log_mel(torch.from_numpy(y)[None])[0].numpy()  # (T, 64)
    mag = np.abs(librosa.stft(y, n_fft=1024, hop_length=160, win_length=1024, window="hann", center=True,
                              pad_mode="reflect"))
    basis = librosa.filters.mel(sr=SR, n_fft=1024, n_mels=64, fmin=0.0, fmax=8000.0)  # Slaney
    want = np.log(np.clip(basis @ mag, 1e-5, None)).T
    assert got.shape == (1 + len(y) // 160, 64) == want.shape
    np.testing.assert_allclose(got, want, atol=1e-3)
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        M.log_mel(torch.zeros(10))


def test_mel_config_reads_the_model_and_its_musiccm_section(tiny_teacher):
    assert M.MelConfig.from_components(tiny_teacher) == M.MelConfig()

    class Patched:
        geometry = tiny_teacher.geometry
        extra = {"n_fft": 2048, "fmin": 30.0, "fmax": 7000.0}

    cfg = M.MelConfig.from_components(Patched())
    assert (cfg.n_fft, cfg.win_length, cfg.fmin, cfg.fmax, cfg.hop_length) == (2048, 2048, 30.0, 7000.0, 160)


def test_kaldi_fbank_is_audiomae_input():
    import torchaudio.compliance.kaldi as kaldi

    y = torch.from_numpy(music_like(3.0))
    got = M.kaldi_fbank(y[None])
    assert got.shape == (1, 1024, 128)
    ref = kaldi.fbank((y - y.mean())[None], htk_compat=True, sample_frequency=SR, use_energy=False,
                      window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
    n = ref.shape[0]
    torch.testing.assert_close(got[0, :n], (ref + 4.2677393) / (2 * 4.5689974))
    torch.testing.assert_close(got[0, n:], torch.full_like(got[0, n:], 4.2677393 / (2 * 4.5689974)))  # zero pad


def test_mel_to_fbank_approximates_kaldi_and_is_differentiable():
    y = torch.from_numpy(music_like(3.0, seed=1))[None]
    ref = M.kaldi_fbank(y, frames=290)[0, 5:285]
    logmel = M.log_mel(y).requires_grad_(True)
    conv = M.mel_to_fbank(logmel, M.MelConfig(), frames=290)
    got = conv[0, 5:285]
    corr = np.corrcoef(got.detach().flatten().numpy(), ref.flatten().numpy())[0, 1]
    assert corr > 0.9
    assert float((got - ref).abs().mean().detach()) < 0.15  # normalised units (≈ 1.4 nats of log-power)
    assert abs(float((got - ref).mean().detach())) < 0.06  # no level bias
    conv.sum().backward()
    assert torch.isfinite(logmel.grad).all() and logmel.grad.abs().sum() > 0


def test_mel_to_clap_approximates_the_clap_feature_extractor(tiny_teacher):
    fe = tiny_teacher.feature_extractor
    y = music_like(3.0, seed=2)
    y48 = librosa.resample(y, orig_sr=SR, target_sr=fe.sampling_rate)
    ref = fe([y48], sampling_rate=fe.sampling_rate, return_tensors="pt", truncation="rand_trunc")["input_features"]
    got = M.mel_to_clap(M.log_mel(torch.from_numpy(y)[None]), M.MelConfig(), fe)
    assert got.shape[:2] == (1, 1) and got.shape[-1] == 64
    hz = librosa.mel_frequencies(66, fmin=fe.frequency_min, fmax=fe.frequency_max)[1:-1]
    keep = torch.from_numpy(hz < 7500)  # a 16 kHz model has nothing above 8 kHz
    a, b = got[0, 0, 5:290][:, keep], ref[0, 0, 5:290][:, keep]
    assert np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1] > 0.95
    assert float((a - b).abs().mean()) < 4.0  # dB
    # repeat-padding: the whole 10 s input has the extractor's shape; the second repetition matches it too
    assert got.shape == ref.shape
    n = M.log_mel(torch.from_numpy(y)[None]).shape[1]
    a2, b2 = got[0, 0, n + 5 : n + 290][:, keep], ref[0, 0, n + 5 : n + 290][:, keep]
    assert np.corrcoef(a2.flatten().numpy(), b2.flatten().numpy())[0, 1] > 0.9


def test_feature_front_ends_stay_float32_under_fp16_autocast(tiny_teacher):
    """Mixed-precision distillation runs the discriminator under fp16 autocast; the front ends' exp/power/bank sums
    overflow float16 on a loud mel (an H200 run of the fp16 step went NaN that way), so they must run in fp32."""
    loud = M.log_mel(torch.from_numpy(music_like(1.0, seed=3))[None]) + 6.0  # ~400x the amplitude
    cfg, fe = M.MelConfig(), tiny_teacher.feature_extractor
    ref_fbank, ref_clap = M.mel_to_fbank(loud, cfg, frames=112), M.mel_to_clap(loud, cfg, fe)
    with torch.autocast("cpu", dtype=torch.float16):
        fbank, clap = M.mel_to_fbank(loud, cfg, frames=112), M.mel_to_clap(loud, cfg, fe)
    for got, ref in [(fbank, ref_fbank), (clap, ref_clap)]:
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got, ref)


# --------------------------------------------------------------------------- manifests and rows
def test_check_manifest_schema():
    check_manifest_schema(pa.schema([("uri", pa.string())]))
    check_manifest_schema(pa.schema([("audio", pa.binary()), ("caption", pa.string()), ("id", pa.int64())]))
    check_manifest_schema(pa.schema([("uri", pa.large_string()), ("caption", pa.null())]))
    for schema, words in [
        (pa.schema([("caption", pa.string())]), "neither `uri` nor `audio`"),
        (pa.schema([]), "neither"),
        (pa.schema([("uri", pa.int64())]), "`uri` has type int64"),
        (pa.schema([("audio", pa.string())]), "`audio` has type string"),
        (pa.schema([("uri", pa.string()), ("caption", pa.int32())]), "`caption` has type int32"),
    ]:
        with pytest.raises(ManifestError, match=words) as info:
            check_manifest_schema(schema)
        assert "Allowed" in str(info.value) and isinstance(info.value, ValueError)


def test_decode_downmixes_and_resamples():
    n = 8000  # 0.5 s at 16 kHz
    t = np.arange(int(0.5 * 44100)) / 44100
    tone = 0.4 * np.sin(2 * np.pi * 440.0 * t).astype(np.float32)
    same = decode_crop(encoded(np.stack([tone, tone], 1), 44100), SR, n, None)
    assert same.shape == (n,)  # 0.5 s at 44.1 kHz → exactly 0.5 s at 16 kHz
    spectrum = np.abs(np.fft.rfft(same.numpy()[:n - 200]))
    peak_hz = np.argmax(spectrum) * SR / (n - 200)
    assert abs(peak_hz - 440.0) < 5 and abs(float(same.abs().max()) - 0.4) < 0.02
    opposite = decode_crop(encoded(np.stack([tone, -tone], 1), 44100), SR, n, None)
    assert float(opposite.abs().max()) < 1e-4  # L + R cancel in the downmix


def test_random_crop_follows_the_generator_and_short_clips_are_padded():
    x = (np.arange(3 * SR, dtype=np.float32) / (3 * SR)) - 0.5  # a ramp: every crop is a distinct slice
    data = encoded(x, SR, "WAV", "FLOAT")
    n = 4000
    a = decode_crop(data, SR, n, torch.Generator().manual_seed(1)).numpy()
    b = decode_crop(data, SR, n, torch.Generator().manual_seed(1)).numpy()
    c = decode_crop(data, SR, n, torch.Generator().manual_seed(2)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    start = int(np.argmin(np.abs(x - a[0])))
    np.testing.assert_array_equal(a, x[start:start + n])  # a contiguous slice
    assert decode_crop(encoded(np.full(1000, 0.25, np.float32), SR, "WAV"), SR, n, None).shape == (1000,)
    short = load_clip(encoded(np.linspace(-0.1, 0.3, 1000, dtype=np.float32), SR, "WAV", "FLOAT"), SR, n, None)
    assert short.shape == (n,) and float(short[1000:].abs().max()) == 0.0  # normalised, then zero-padded
    assert abs(float(short[:1000].abs().max()) - 0.5) < 1e-6 and abs(float(short[:1000].mean())) < 1e-6


def test_prepare_batch_rows_of_every_kind(tiny_teacher, s3, tmp_path):
    config = DistillConfig(tiny_feature_network=True)
    n = window_samples(tiny_teacher, None)
    assert n == 20480  # 32 latent frames · 4 · 160
    exact = music_like(n / SR, seed=3)  # exactly one window at 16 kHz mono: no crop, no resampling
    local = tmp_path / "clip.wav"
    sf.write(local, exact, SR)
    storage.write_bytes("s3://data/clips/b.flac", encoded(np.stack([music_like(2.5, 22050, 4)] * 2, 1), 22050))
    empty = encoded(np.zeros((0, 1), np.float32), SR, "WAV")
    rows = {
        "uri": [None, str(local), "s3://data/clips/b.flac", None, str(tmp_path / "missing.wav"),
                "s3://data/clips/missing.flac", None],
        "audio": [encoded(music_like(2.0, 44100, 5), 44100), None, None, b"not audio at all", None, None, empty],
        "caption": ["calm piano with strings", "", None, "x", "y", "z", "w"],
    }
    batch = prepare_batch(rows, tiny_teacher, config, torch.Generator().manual_seed(0))
    g = tiny_teacher.geometry
    assert batch.latents.shape == (3, 8, 32, 16) and batch.cond.shape == (3, 512) and batch.mel.shape == (3, 128, 64)
    assert batch.skipped == 4 and len(batch.reasons) == 4 and batch.audio_conditioned == 2
    for i, words in zip((3, 4, 5, 6), ("audio bytes", "missing.wav", "missing.flac", "no audio samples"), strict=True):
        assert any(r.startswith(f"row {i} ") and words in r for r in batch.reasons), (i, batch.reasons)
    # Row 1 (local uri, exact window): mel = MusicLDM log-mel of the normalised clip, by librosa.
    y = normalize_wav(torch.from_numpy(sf.read(local, dtype="float32")[0])).numpy()  # as decoded (16-bit)
    mag = np.abs(librosa.stft(y, n_fft=1024, hop_length=160, window="hann", center=True, pad_mode="reflect"))
    want = np.log(np.clip(librosa.filters.mel(sr=SR, n_fft=1024, n_mels=64) @ mag, 1e-5, None)).T[:128]
    np.testing.assert_allclose(batch.mel[1].numpy(), want, atol=1e-3)
    # Latents: the frozen VAE's posterior mode × scaling_factor of exactly those mels.
    torch.testing.assert_close(batch.latents, encode_mel(tiny_teacher, batch.mel), rtol=1e-5, atol=1e-5)
    assert abs(float(tiny_teacher.vae.config.scaling_factor) - 1.075324296951294) < 1e-9 and g.window_frames == 32
    # Conditions: caption → CLAP text embedding; no caption → the clip's own CLAP audio embedding.
    text, _ = external.encode_text(tiny_teacher, ["calm piano with strings"])
    torch.testing.assert_close(batch.cond[0], text[0])
    audio = external.encode_audio(tiny_teacher, [y], SR)
    torch.testing.assert_close(batch.cond[1], audio[0], rtol=1e-4, atol=1e-5)
    assert torch.allclose(batch.cond.norm(dim=1), torch.ones(3), atol=1e-4)
    # The same generator gives the same batch (crops of the longer clips are random but seeded).
    again = prepare_batch(rows, tiny_teacher, config, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.latents, batch.latents)


def test_prepare_batch_numpy_columns_and_all_bad(tiny_teacher):
    config = DistillConfig(tiny_feature_network=True)
    rows = {"audio": np.array([encoded(music_like(1.0, seed=6), SR)], dtype=object),
            "caption": np.array(["upbeat jazz"], dtype=object)}
    batch = prepare_batch(rows, tiny_teacher, config, None)
    assert batch.size == 1 and batch.skipped == 0 and batch.audio_conditioned == 0
    # A 1 s clip in a 1.28 s window is zero-padded: the last mel frames are silence (log 1e-5).
    assert float(batch.mel[0, -5:].max()) == pytest.approx(np.log(1e-5), abs=1e-3)
    bad = prepare_batch({"audio": [b"", b"junk"], "uri": [None, None]}, tiny_teacher, config, None)
    assert bad.size == 0 and bad.skipped == 2 and bad.latents.shape == (0, 8, 32, 16) and bad.cond.shape == (0, 512)
    assert "no audio bytes and no uri" in bad.reasons[0]
    cropped = prepare_batch(rows, tiny_teacher, DistillConfig(crop_seconds=0.64), None)
    assert cropped.latents.shape == (1, 8, 16, 16) and cropped.mel.shape == (1, 64, 64)


def test_prepare_batch_skips_rows_whose_conditioning_fails(tiny_teacher, monkeypatch):
    """A row whose CLAP embedding cannot be made (the audio tower raises for it, or returns non-finite values) is
    skipped and counted like an unreadable row; the batch keeps the other rows, in order, with their own conditions."""
    config = DistillConfig(tiny_feature_network=True)
    n = window_samples(tiny_teacher, None)
    clips = {i: encoded(music_like(n / SR, seed=20 + i), SR) for i in range(5)}  # one window each: never cropped
    clips[1] = encoded(np.zeros(n, np.float32), SR)  # silence: the stand-in tower below cannot embed it
    poisoned = load_clip(clips[3], SR, n, None).numpy()  # the stand-in tower returns NaN for this clip
    rows = {"audio": [clips[0], clips[1], clips[2], clips[3], b"junk", clips[4]],
            "caption": ["", None, "fast drums", "", "x", "mellow guitar"]}
    real_audio = external.encode_audio

    def fragile_audio(c, waveforms, sample_rate, batch_size=32):
        if any(not np.abs(w).any() for w in waveforms):
            raise RuntimeError("the audio tower cannot take this clip")
        emb = real_audio(c, waveforms, sample_rate, batch_size)
        for j, w in enumerate(waveforms):
            if np.array_equal(w, poisoned):
                emb[j] = float("nan")
        return emb

    monkeypatch.setattr(external, "encode_audio", fragile_audio)
    batch = prepare_batch(rows, tiny_teacher, config, None)
    assert batch.size == 3 and batch.skipped == 3 and batch.audio_conditioned == 1
    assert batch.cond.shape == (3, 512) and batch.mel.shape == (3, 128, 64) and batch.latents.shape == (3, 8, 32, 16)
    assert any(r.startswith("row 1 (conditioning): RuntimeError: the audio tower cannot") for r in batch.reasons)
    assert any(r.startswith("row 3 (conditioning): ") and "non-finite" in r for r in batch.reasons), batch.reasons
    assert any(r.startswith("row 4 (audio bytes): ") for r in batch.reasons)
    # Rows 0, 2, 5 in order: the same latents and mels as a batch of only those rows, and their own conditions.
    monkeypatch.setattr(external, "encode_audio", real_audio)
    good = prepare_batch({k: [v[i] for i in (0, 2, 5)] for k, v in rows.items()}, tiny_teacher, config, None)
    torch.testing.assert_close(batch.latents, good.latents)
    torch.testing.assert_close(batch.mel, good.mel)
    torch.testing.assert_close(batch.cond, good.cond)
    text, _ = external.encode_text(tiny_teacher, ["fast drums", "mellow guitar"])
    torch.testing.assert_close(batch.cond[1:], text)
    audio = external.encode_audio(tiny_teacher, [load_clip(clips[0], SR, n, None).numpy()], SR)
    torch.testing.assert_close(batch.cond[0], audio[0], rtol=1e-4, atol=1e-5)


def test_prepare_batch_with_every_condition_failing_is_an_empty_batch(tiny_teacher, monkeypatch):
    """Text conditioning that fails for every row leaves a batch of 0 rows, shaped like an all-unreadable batch."""
    config = DistillConfig(tiny_feature_network=True)

    def broken_text(c, prompts):
        raise ValueError("tokenizer exploded")

    monkeypatch.setattr(external, "encode_text", broken_text)
    rows = {"audio": [encoded(music_like(1.0, seed=s), SR) for s in (1, 2)], "caption": ["calm piano", "fast drums"]}
    batch = prepare_batch(rows, tiny_teacher, config, None)
    assert batch.size == 0 and batch.skipped == 2 and batch.audio_conditioned == 0
    assert batch.latents.shape == (0, 8, 32, 16) and batch.cond.shape == (0, 512) and batch.mel.shape == (0, 128, 64)
    assert batch.reasons == [f"row {i} (conditioning): ValueError: tokenizer exploded" for i in (0, 1)]


def test_latent_cache_reuses_whole_clips_only_and_changes_nothing(tiny_teacher):
    n = window_samples(tiny_teacher, None)
    whole = [encoded(music_like(n / SR, seed=s), SR) for s in (7, 8)]  # one window each: never cropped
    short = encoded(music_like(0.8, 44100, 9), 44100)  # shorter, resampled, padded: still the same every time
    longer = encoded(music_like(3.0, seed=10), SR)  # longer than the window: a random crop each time
    rows = {"audio": [whole[0], short, longer, whole[1]], "caption": ["a", "b", "c", "d"]}
    config = DistillConfig(tiny_feature_network=True)
    plain = prepare_batch(rows, tiny_teacher, config, torch.Generator().manual_seed(0))
    cache = LatentCache(2**20)
    first = prepare_batch(rows, tiny_teacher, config, torch.Generator().manual_seed(0), cache)
    assert first.cached == 0 and len(cache) == 3 and (cache.hits, cache.misses) == (0, 3)
    again = prepare_batch(rows, tiny_teacher, config, torch.Generator().manual_seed(0), cache)
    assert again.cached == 3 and (cache.hits, cache.misses) == (3, 3)  # the cropped clip is never looked up
    for batch in (first, again):
        torch.testing.assert_close(batch.latents, plain.latents, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.mel, plain.mel)
        torch.testing.assert_close(batch.cond, plain.cond)
    # A different crop of the long clip is encoded afresh, not served from the cache.
    other = prepare_batch(rows, tiny_teacher, config, torch.Generator().manual_seed(1), cache)
    assert other.cached == 3 and not torch.allclose(other.latents[2], plain.latents[2])
    torch.testing.assert_close(other.latents[2], encode_mel(tiny_teacher, other.mel[2:3])[0], rtol=1e-5, atol=1e-5)
    assert LatentCache.key(longer, SR, n) is None and LatentCache.key(whole[0], SR, n) is not None


def test_latent_cache_is_bounded_least_recently_used_first():
    one = torch.zeros(8, 32, 16)  # 16 KiB
    cache = LatentCache(3 * one.numel() * 4)
    for k in "abc":
        cache.put(k, one + ord(k))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", one)
    assert len(cache) == 3 and cache.bytes == 3 * one.numel() * 4
    assert cache.get("b") is None and all(cache.get(k) is not None for k in "acd")
    cache.put("e", torch.zeros(8, 32, 64))  # larger than the whole cache: not kept, nothing evicted
    assert len(cache) == 3 and cache.get("e") is None
    cache.put(None, one)  # a cropped clip has no key
    assert len(cache) == 3
    with pytest.raises(ValueError, match="latent_cache_mb"):
        DistillConfig(latent_cache_mb=-1).validate()
