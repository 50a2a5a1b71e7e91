"""Generation through the public API on tiny models: lengths, determinism, guidance, bad input."""

import math

import numpy as np
import pytest
import torch

from musiccm import external, model
from musiccm.build import build_components
from musiccm.pipeline import GenerationConfig, MusicCM
from musiccm.sampling import randn, sample_consistency
from musiccm.schedule import lcm_timesteps
from musiccm.student import as_student


def differ(a: np.ndarray, b: np.ndarray) -> bool:
    """Relative difference test (random tiny vocoders output tiny amplitudes)."""
    return float(np.abs(a - b).max()) > 1e-5 * float(np.abs(a).max())


@pytest.fixture(scope="module")
def student(tiny_student_dir):
    return MusicCM(model.load(tiny_student_dir))


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return MusicCM(model.load(tiny_teacher_dir), GenerationConfig(steps=3))


@pytest.mark.parametrize("duration", [0.04, 1.0, 10.24, 25.0, 61.3])
def test_exact_sample_counts(student, duration):
    out = student.generate(["a calm piano ballad"], duration, [0], GenerationConfig(steps=1))
    assert out.waveforms.shape == (1, round(duration * 16000))
    assert np.isfinite(out.waveforms).all() and np.abs(out.waveforms).max() <= 1.0


def test_same_seed_same_audio_other_seed_different(student):
    a = student.generate(["fast techno"], 3.0, [11]).waveforms
    b = student.generate(["fast techno"], 3.0, [11]).waveforms
    c = student.generate(["fast techno"], 3.0, [12]).waveforms
    assert np.array_equal(a, b)
    assert differ(a, c)


def test_clip_depends_on_its_seed_not_its_batch(student):
    alone = student.generate(["jazz"], 2.0, [5]).waveforms[0]
    batched = student.generate(["rock", "jazz"], 2.0, [4, 5]).waveforms[1]
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-4 * float(np.abs(alone).max()))


def test_prompt_changes_the_output(student):
    a = student.generate(["jazz"], 1.0, [1]).waveforms
    b = student.generate(["heavy metal guitar"], 1.0, [1]).waveforms
    assert differ(a, b)


def test_teacher_ddim_with_cfg_and_long_form(teacher):
    out = teacher.generate(["orchestral strings"], 4.0, [3])  # 4 s > 1.28 s window: crop fusion
    assert out.waveforms.shape == (1, 64000)
    assert teacher.config.guidance_scale == 2.0
    g1 = teacher.generate(["orchestral strings"], 1.0, [3], GenerationConfig(steps=3, guidance_scale=1.0))
    g4 = teacher.generate(["orchestral strings"], 1.0, [3], GenerationConfig(steps=3, guidance_scale=4.0))
    assert differ(g1.waveforms, g4.waveforms)


def test_guidance_embedding_student_uses_the_scale():
    c = as_student(build_components("tiny", seed=1, guidance_embedding=True))
    assert c.has_guidance_embedding
    torch.nn.init.normal_(c.unet.time_embedding.cond_proj.weight, std=0.5)
    gen = MusicCM(c)
    a = gen.generate(["jazz"], 1.0, [0], GenerationConfig(guidance_scale=2.0)).waveforms
    b = gen.generate(["jazz"], 1.0, [0], GenerationConfig(guidance_scale=8.0)).waveforms
    assert differ(a, b)


def test_one_window_pipeline_equals_plain_sampler_bit_for_bit(student):
    """A clip no longer than one window takes the plain path: identical to sampling by hand."""
    c = student.c
    g = c.geometry
    cond, _ = external.encode_text(c, ["dreamy synth pad"])
    gens = [torch.Generator().manual_seed(9)]
    x_T = randn(g.latent_shape(1, g.native_duration), gens)
    denoise = external.make_denoiser(c, None, 3.0)
    lat = sample_consistency(denoise, x_T, cond, lcm_timesteps(2), c.scheduler.alphas_cumprod, gens)
    by_hand = external.decode(c, lat, g.num_samples(g.native_duration)).clamp(-1, 1).numpy()
    ours = student.generate(["dreamy synth pad"], g.native_duration, [9], GenerationConfig(steps=2)).waveforms
    assert np.array_equal(ours, by_hand)


def test_fusion_taper_defaults_to_a_cross_fade_over_the_overlap(student):
    window = student.c.geometry.window_frames
    assert student.resolve(GenerationConfig()).taper == window - window * 3 // 4
    assert student.resolve(GenerationConfig(hop_frames=window)).taper == 0  # no overlap, nothing to fade
    assert student.resolve(GenerationConfig(hop_frames=1)).taper == window // 2
    assert student.resolve(GenerationConfig(taper=0)).taper == 0  # the plain average stays available


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompts=[""]), "prompt"),
        (dict(prompts=["   "]), "prompt"),
        (dict(duration=0.0), "duration"),
        (dict(duration=-1.0), "duration"),
        (dict(duration=math.nan), "duration"),
        (dict(duration=601.0), "limit"),
        (dict(seeds=[-1]), "seed"),
        (dict(seeds=[1, 2]), "one seed per prompt"),
        (dict(config=GenerationConfig(steps=0)), "steps"),
        (dict(config=GenerationConfig(steps=51)), "steps"),
        (dict(config=GenerationConfig(crop_batch_size=0)), "crop_batch_size"),
        (dict(config=GenerationConfig(hop_frames=999)), "hop_frames"),
        (dict(config=GenerationConfig(taper=-1)), "taper"),
        (dict(config=GenerationConfig(taper=10_000)), "taper"),
        (dict(config=GenerationConfig(guidance_scale=0.5)), "guidance_scale"),
        (dict(config=GenerationConfig(max_timestep=1000)), "max_timestep"),
        (dict(config=GenerationConfig(max_timestep=30, steps=4)), "steps must be in 1..1"),
    ],
)
def test_bad_input_is_a_clear_value_error(student, kwargs, match):
    args = dict(prompts=["jazz"], duration=1.0, seeds=[0], config=None) | kwargs
    with pytest.raises(ValueError, match=match):
        student.generate(**args)


def test_clap_audio_embedding_is_normalised_and_chunked(student):
    wavs = [np.random.default_rng(0).standard_normal(16000 * 12).astype(np.float32) * 0.1]
    emb = external.encode_audio(student.c, wavs, 16000)
    assert emb.shape == (1, 512)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(1))
    again = external.encode_audio(student.c, wavs, 16000)
    assert torch.equal(emb, again)  # no random truncation


def test_clap_audio_embeddings_do_not_depend_on_batching(student):
    rng = np.random.default_rng(1)
    # A 25 s clip (three chunks, one short) among short ones, at 32 kHz (resampled), in batches of 2 chunks.
    wavs = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (32000 * 3, 32000 * 25, 32000, 5000)]
    together = external.encode_audio(student.c, wavs, 32000, batch_size=2)
    alone = torch.cat([external.encode_audio(student.c, [w], 32000) for w in wavs])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert external.encode_audio(student.c, [], 32000).shape == (0, 512)


def test_over_long_prompt_is_truncated_and_flagged(student):
    long_prompt = "piano " * 200
    _, flags = external.encode_text(student.c, [long_prompt, "jazz"])
    assert flags == [True, False]


def test_max_timestep_from_the_call_or_the_model(tiny_student_dir, teacher):
    """A lower first timestep is exactly the consistency sampler started there; the model's default applies."""
    c = model.load(tiny_student_dir)
    g = c.geometry
    cond, _ = external.encode_text(c, ["dreamy synth pad"])
    gens = [torch.Generator().manual_seed(9)]
    x_T = randn(g.latent_shape(1, g.native_duration), gens)
    lat = sample_consistency(external.make_denoiser(c, None, 3.0), x_T, cond, [759, 379], c.scheduler.alphas_cumprod,
                             gens)
    by_hand = external.decode(c, lat, g.num_samples(g.native_duration)).clamp(-1, 1).numpy()
    explicit = MusicCM(c, GenerationConfig(steps=2, max_timestep=759)).generate(["dreamy synth pad"],
                                                                                g.native_duration, [9])
    assert np.array_equal(explicit.waveforms, by_hand) and explicit.config.max_timestep == 759
    c.extra["max_timestep"] = 759  # as recipes/demo/install.py writes into model_index.json
    from_model = MusicCM(c, GenerationConfig(steps=2)).generate(["dreamy synth pad"], g.native_duration, [9])
    assert np.array_equal(from_model.waveforms, by_hand)
    plain = MusicCM(c, GenerationConfig(steps=2, max_timestep=999)).generate(["dreamy synth pad"],
                                                                            g.native_duration, [9])
    assert differ(plain.waveforms, by_hand)
    with pytest.raises(ValueError, match="consistency students only"):
        teacher.generate(["jazz"], 1.0, [0], GenerationConfig(steps=3, max_timestep=759))
