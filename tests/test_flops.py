"""benchmarks/flops.py on the tiny build: per-stage counts, step and window scaling, CFG, the Griffin-Lim estimate, the
roofline arithmetic, and that the window/chunk layout it multiplies by is the one the pipeline really runs."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import flops

from musiccm import external
from musiccm.longform import canvas_denoiser
from musiccm.vocoders import GriffinLimConfig, GriffinLimVocoder


@pytest.fixture(scope="module")
def tiny():
    return flops.load("tiny", seed=0)


@pytest.fixture(scope="module")
def native(tiny):
    return flops.count_model(tiny, "tiny", tiny.geometry.native_duration)


def test_stages_are_positive_and_steps_scale_exactly(native):
    stages = [native.text, native.unet, native.unet_cfg, native.vae, native.vocoder, native.score]
    assert all(s.calls == 1 and s.counted > 0 and s.estimated == 0 for s in stages)
    decode = native.vae.per_clip + native.vocoder.per_clip
    one = native.unet.per_clip
    assert native.clip(4) == pytest.approx(native.text.per_clip + 4 * one + decode, rel=1e-12)
    for steps in (1, 2, 8):
        assert native.clip(steps) - native.clip(1) == pytest.approx((steps - 1) * one, rel=1e-9)
    assert native.clip(4, score=True) - native.clip(4) == pytest.approx(native.score.per_clip, rel=1e-9)


def test_a_cfg_teacher_counts_two_unet_forwards_per_step(native):
    assert native.unet_cfg.counted == 2 * native.unet.counted  # counted through make_denoiser's batched CFG
    rows = flops.roofline(native, [4], 50, 989.0, 0.4)
    runs = [(r["sampler"], r["steps"], r["unet_forwards"]) for r in rows]
    assert runs == [("student", 4, 4), ("teacher, CFG", 50, 100)]
    decode = native.vae.per_clip + native.vocoder.per_clip
    assert rows[1]["tflop"] * 1e12 == pytest.approx(native.text.per_clip + 100 * native.unet.per_clip + decode)


def test_three_native_windows_count_the_windows_and_chunks_the_pipeline_runs(tiny, native):
    g = tiny.geometry
    duration = 3 * g.native_duration  # 96 latent frames; windows of 32 every 24 frames: starts 0, 24, 48, 64
    count = flops.count_model(tiny, "tiny", duration)
    assert (count.unet.calls, count.unet.counted) == (4, native.unet.counted)
    assert count.clip(1) - native.clip(1) > 3 * native.unet.per_clip  # longer decode too
    # The pipeline's own crop fusion, VAE/vocoder chunking and CLAP chunking, counted whole, agree exactly.
    cond = external.encode_text(tiny, ["a calm piano piece"])[0]
    x = torch.randn(g.latent_shape(1, duration))
    fused = canvas_denoiser(external.make_denoiser(flops.as_student(tiny), None, 1.0), g.window_frames,
                            g.window_frames * 3 // 4)
    assert flops.counted(lambda: fused(x, torch.tensor([999]), cond)) == count.unet.per_clip
    assert flops.counted(lambda: external.decode(tiny, x, g.num_samples(duration))) == pytest.approx(
        count.vae.per_clip + count.vocoder.per_clip, rel=1e-12)
    assert count.vae.calls == 4 and count.vocoder.calls == 4
    wav = np.zeros(g.num_samples(duration), dtype=np.float32)
    assert flops.counted(lambda: external.encode_audio(tiny, [wav], g.sample_rate)) == count.score.per_clip


def test_attention_is_counted_unless_the_fused_kernel_is_kept(tiny, native):
    fused = flops.count_model(tiny, "tiny", tiny.geometry.native_duration, fused_sdpa=True)
    assert fused.vae.per_clip < native.vae.per_clip and fused.unet.per_clip < native.unet.per_clip
    assert fused.vocoder.per_clip == native.vocoder.per_clip  # no attention in HiFi-GAN


def test_griffin_lim_adds_a_labelled_fft_estimate(tiny):
    c = dataclasses.replace(tiny, vocoder=GriffinLimVocoder(GriffinLimConfig(n_iter=4, nnls_iter=5)))
    count = flops.count_model(c, "tiny + Griffin-Lim", 1.0)  # 100 mel frames, one call
    cfg = c.vocoder.config
    assert count.vocoder.calls == 1 and count.vocoder.counted > 0  # the NNLS matmuls
    assert count.vocoder.estimated == (2 * cfg.n_iter + 1) * 101 * 2.5 * cfg.n_fft * math.log2(cfg.n_fft)
    table = flops.tables(count, flops.roofline(count, [4], 0, 989.0, 0.4), 989.0, 0.4)
    assert "FFTs estimated" in table and "(estimated) |" in table


def test_roofline_arithmetic():
    def stage(gflop: float) -> flops.Stage:
        return flops.Stage("s", 1, gflop * 1e9)

    count = flops.Count("m", 10.24, stage(1), stage(100), stage(200), stage(600), stage(1000), stage(20))
    (row,) = flops.roofline(count, [4], 0, peak_tflops=1000.0, util=0.5)
    assert row["tflop"] == pytest.approx(2.001)
    assert row["tflop_with_score"] == pytest.approx(2.021)
    assert row["clips_per_s_peak"] == pytest.approx(1000e12 / 2.001e12)
    assert row["clips_per_s_util"] == pytest.approx(0.5 * 1000e12 / 2.001e12)
    assert row["realtime_peak"] == pytest.approx(10.24 * 1000 / 2.001)
    assert row["realtime_util"] == pytest.approx(10.24 * 500 / 2.001)


def test_cli_prints_writes_and_saves(tmp_path, monkeypatch, capsys):
    import report

    monkeypatch.setattr(report, "RESULTS", tmp_path / "RESULTS.md")
    assert flops.main(["--model", "tiny", "--duration", "1.28", "--steps", "1", "4", "--teacher-steps", "0",
                       "--peak-tflops", "100", "--json", str(tmp_path / "f.json"), "--write"]) == 0
    out = capsys.readouterr().out
    written = (tmp_path / "RESULTS.md").read_text()
    assert "### FLOPs per clip and the roofline" in written and "commit " in written and out.strip() in written
    saved = json.loads((tmp_path / "f.json").read_text())
    (model,) = saved["models"]
    assert [r["steps"] for r in model["roofline"]] == [1, 4] and saved["peak_tflops"] == 100
    assert model["roofline"][1]["tflop"] * 1e12 == pytest.approx(model["clip_4_steps"])
    with pytest.raises(SystemExit):
        flops.main(["--model", "tiny", "--utilisation", "1.5"])
