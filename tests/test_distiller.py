"""Distiller: config, student initialisation, one training step (EMA, heads, frozen parts), exact checkpoint
round trip, export through the foundation's loader and pipeline, LoRA / no-adversary / CLAP / w-range paths,
and a short distillation that measurably learns."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load, save

from musiccm import model as model_io
from musiccm.build import SCHEDULER, build_components
from musiccm.distill import losses
from musiccm.distill.config import DistillConfig
from musiccm.distill.data import PreparedBatch, prepare_batch
from musiccm.distill.discriminator import RANDOM_INIT_WARNING, ViTFeatures
from musiccm.distill.distiller import Distiller, step_generator, unet_forward
from musiccm.mel import MelConfig
from musiccm.pipeline import GenerationConfig, MusicCM
from musiccm.sampling import randn
from musiccm.schedule import consistency_output

WINDOW = 8  # latent frames: 0.32 s clips keep every test fast
FAST = dict(tiny_feature_network=True, warmup_steps=2, lr=1e-4, disc_lr=1e-4, batch_size=3)


@pytest.fixture(scope="module")
def teacher():
    # One intra-op thread: these tiny models gain nothing from more, and a shared, loaded CI machine
    # makes OpenMP's spinning threads 10-50x slower (measured) when cores are oversubscribed.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield build_components("tiny", seed=0, window=WINDOW)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch(teacher) -> PreparedBatch:
    rng = np.random.default_rng(0)
    import io

    import soundfile as sf

    def clip(seconds: float) -> bytes:
        t = np.arange(int(seconds * 16000)) / 16000
        y = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate(rng.uniform(100, 2000, 5)))
        buf = io.BytesIO()
        sf.write(buf, (0.3 * y / np.abs(y).max()).astype(np.float32), 16000, format="FLAC")
        return buf.getvalue()

    rows = {"audio": [clip(0.5), clip(0.4), clip(0.6)], "caption": ["calm piano", "", "fast techno drums"]}
    return prepare_batch(rows, teacher, DistillConfig(**FAST), torch.Generator().manual_seed(0))


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a)


# --------------------------------------------------------------------------- config
def test_config_round_trip_and_validation():
    cfg = DistillConfig(w_min=1.0, w_max=4.0, disc_layers=(1, 3), validation_steps=(1, 4))
    assert DistillConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.has_w_range and DistillConfig().guidance_scale == 3.0  # w = 2 ⇔ diffusers guidance 3
    with pytest.raises(ValueError, match=r"unknown DistillConfig keys \['bogus'\]"):
        DistillConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    for change, words in [
        ({"k_skip": 0}, "k_skip"), ({"num_workers": 0}, "num_workers=0"), ({"lr": -1.0}, "lr"),
        ({"w_max": None}, "w_min"), ({"w_min": 3.0, "w_max": 1.0}, "w_max"), ({"loss_type": "l1"}, "huber"),
        ({"mixed_precision": "fp8"}, "bf16"), ({"ema_rate": 1.0}, "ema_rate"), ({"feature_network": "vgg"}, "clap"),
        ({"disc_layers": ()}, "disc_layers"), ({"validation_steps": (0,)}, "validation_steps"),
        ({"name": "a/b"}, "name"), ({"adv_weight": 0.0, "distill_weight": 0.0}, "distill_weight"),
        ({"max_train_timestep": 5}, "integer in 19..999"), ({"max_train_timestep": 1000}, "max_train_timestep"),
        ({"report_every_s": -1.0}, "report_every_s"), ({"report_every_s": float("nan")}, "0 = every step"),
        ({"dmd_weight": -1.0}, "dmd_weight"), ({"dmd_timestep": 1000}, "dmd_timestep"),
        ({"dmd_min_t": 500, "dmd_max_t": 400}, "dmd_max_t"), ({"fake_updates": 0}, "fake_updates"),
        ({"fake_lr": 0.0}, "fake_lr"), ({"gan_weight": -1.0}, "gan_weight"),
        ({"dmd_guidance": 0.5}, "dmd_guidance"), ({"dmd_guidance": float("inf")}, "float >= 1"),
        ({"gan_weight": 0.1}, "unless dmd_weight > 0"), ({"gan_cls_weight": 0.0}, "gan_cls_weight"),
    ]:
        with pytest.raises(ValueError, match=words) as info:
            dataclasses.replace(cfg, **change).validate()
        assert "allowed" in str(info.value)


# --------------------------------------------------------------------------- construction and one step
def test_student_with_guidance_embedding_starts_as_the_teacher(teacher):
    d = Distiller(teacher, DistillConfig(**FAST, adv_weight=0.0, w_min=1.0, w_max=5.0))
    assert d.student_module.config.time_cond_proj_dim == 256 and teacher.unet.config.time_cond_proj_dim is None
    g = torch.Generator().manual_seed(0)
    x, c = randn((2, 8, WINDOW, 16), g), torch.nn.functional.normalize(torch.randn(2, 512, generator=g), dim=-1)
    t = torch.tensor([999, 19])
    with torch.no_grad():
        want = unet_forward(teacher.unet, x, t, c, None)
        for w in (1.0, 4.5):
            got = d._x0_fn(d.student)(x, t, c, torch.full((2,), w))
            a = d.alphas[t].reshape(-1, 1, 1, 1)
            torch.testing.assert_close(got, (x - (1 - a).sqrt() * want) / a.sqrt())
    assert max_diff(params(d.student_module), params(d.target)) == 0.0
    assert all(not p.requires_grad for p in teacher.unet.parameters())


def test_train_step_updates_student_ema_target_and_heads_only(teacher, batch):
    cfg = DistillConfig(**FAST)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        d = Distiller(teacher, cfg)
    frozen = {"teacher": params(teacher.unet), "vae": params(teacher.vae), "clap": params(teacher.text_encoder),
              "features": params(d.disc.features)}
    student0, heads0 = params(d.student_module), params(d.disc.heads)
    m = d.train_step(batch)
    for key in ("distill_loss", "adv_g_loss", "adv_d_loss", "r1", "lr", "grad_norm", "disc_grad_norm", "loss"):
        assert np.isfinite(m[key]), key
    assert m["disc_skipped"] == 0.0
    assert m["lr"] == pytest.approx(cfg.lr / 2) and m["batch_size"] == 3 and d.step == 1  # warm-up 1/2
    assert m["r1"] > 0 and m["grad_norm"] > 0
    assert max_diff(frozen["teacher"], params(teacher.unet)) == 0.0
    assert max_diff(frozen["vae"], params(teacher.vae)) == 0.0
    assert max_diff(frozen["clap"], params(teacher.text_encoder)) == 0.0
    assert max_diff(frozen["features"], params(d.disc.features)) == 0.0
    assert max_diff(heads0, params(d.disc.heads)) > 0
    student1 = params(d.student_module)
    assert max_diff(student0, student1) > 0
    # EMA: θ⁻ ← 0.95·θ⁻ + 0.05·θ, with θ⁻ initialised to the student.
    want = {k: 0.95 * student0[k] + 0.05 * student1[k] for k in student0}
    assert max_diff(want, params(d.target)) < 1e-6
    with pytest.raises(ValueError, match="at least one row"):
        d.train_step(PreparedBatch(batch.latents[:0], batch.cond[:0], batch.mel[:0]))


def test_non_finite_discriminator_step_is_skipped_not_applied(teacher, batch):
    """An overflowed fake feature (fp16) must not poison the heads: the D update is skipped and reported."""
    with pytest.warns(UserWarning, match="RANDOM weights"):
        d = Distiller(teacher, DistillConfig(**FAST))
    real = d.disc.feature_maps(batch.mel.float())
    c = d.disc.condition(batch.cond.float(), d.disc.mel_embedding(real))
    fake = [f.clone() for f in real]
    fake[0][0, 0, 0] = float("inf")
    heads0 = params(d.disc.heads)
    m = d._d_step(fake, real, c)
    assert m["disc_skipped"] == 1.0 and not np.isfinite(m["disc_grad_norm"])
    assert max_diff(heads0, params(d.disc.heads)) == 0.0 and all(p.grad is None for p in d.disc.heads.parameters())
    m = d._d_step([f + 0.1 for f in real], real, c)
    assert m["disc_skipped"] == 0.0 and max_diff(heads0, params(d.disc.heads)) > 0


def test_gradient_checkpointing_gives_the_same_step(teacher, batch):
    out = []
    for checkpointing in (False, True):
        d = Distiller(teacher, DistillConfig(**FAST, adv_weight=0.0, gradient_checkpointing=checkpointing))
        out.append((d.train_step(batch)["distill_loss"], params(d.student_module)))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
    assert max_diff(out[0][1], out[1][1]) < 1e-6


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_is_exact(teacher, batch):
    """N steps in one go == k steps, checkpoint (safetensors bytes + JSON), fresh Distiller, N − k steps."""
    cfg = DistillConfig(**FAST, r1_gamma=0.5)
    n, k = 4, 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = Distiller(teacher, cfg)
        for _ in range(n):
            straight.train_step(batch)
        first = Distiller(teacher, cfg)
        for _ in range(k):
            first.train_step(batch)
        blob, meta = save(first.checkpoint_tensors()), json.loads(json.dumps(first.checkpoint_meta()))
        resumed = Distiller(teacher, cfg)
    resumed.restore(load(blob), meta)
    assert resumed.step == k and meta["config"] == cfg.to_dict()
    for _ in range(n - k):
        resumed.train_step(batch)
    a, b = straight.checkpoint_tensors(), resumed.checkpoint_tensors()
    assert a.keys() == b.keys() and any(key.startswith("opt_d/") for key in a) and any("heads/" in key for key in a)
    assert max_diff(a, b) < 1e-6
    assert straight.step == resumed.step == n
    # A run of a different structure refuses the checkpoint.
    other = Distiller(teacher, DistillConfig(**FAST, adv_weight=0.0))
    with pytest.raises(ValueError, match="adv_weight"):
        other.restore(load(blob), meta)


def test_step_generator_is_a_function_of_seed_rank_step():
    a = torch.randn(3, generator=step_generator(0, 1, 5))
    assert torch.equal(a, torch.randn(3, generator=step_generator(0, 1, 5)))
    assert not torch.equal(a, torch.randn(3, generator=step_generator(0, 0, 5)))
    assert not torch.equal(a, torch.randn(3, generator=step_generator(0, 1, 6)))


# --------------------------------------------------------------------------- export
def test_export_loads_and_generates(teacher, batch, tmp_path):
    d = Distiller(teacher, DistillConfig(**FAST, adv_weight=0.0))
    d.train_step(batch)
    directory = d.export(str(tmp_path / "student"))
    loaded = model_io.load(directory)
    assert loaded.is_consistency and not loaded.has_guidance_embedding
    assert loaded.extra["distill"]["step"] == 1 and loaded.extra["distill"]["config"]["adv_weight"] == 0.0
    assert max_diff(params(loaded.unet), params(d.target)) == 0.0  # EMA weights by default
    unet = UNet2DConditionModel.from_pretrained(directory, subfolder="unet")
    assert max_diff(params(unet), params(d.target)) == 0.0
    gen = MusicCM(loaded)
    duration = loaded.geometry.native_duration
    for steps in (1, 2):
        out = gen.generate(["calm piano"], duration, [7], GenerationConfig(steps=steps))
        assert out.waveforms.shape == (1, round(duration * 16000)) and np.isfinite(out.waveforms).all()
    raw = model_io.load(d.export(str(tmp_path / "raw"), use_ema=False))
    assert max_diff(params(raw.unet), params(d.student_module)) == 0.0


def test_student_init_starts_the_student_from_an_exported_student(teacher, batch, tmp_path):
    first = Distiller(teacher, DistillConfig(**FAST, adv_weight=0.0))
    first.train_step(batch)
    directory = first.export(str(tmp_path / "first"))
    init = model_io.load_unet(directory)  # the job's path: only the UNet, safetensors
    d = Distiller(teacher, DistillConfig(**FAST, student_init=directory), student_init=init)
    assert max_diff(params(d.student_module), params(first.target)) == 0.0  # not the teacher's weights
    assert max_diff(params(d.target), params(first.target)) == 0.0
    assert max_diff(params(d.student_module), params(teacher.unet)) > 0.0
    assert d.train_step(batch)["adv_d_loss"] > 0  # fine-tunes on, here with the adversarial term
    w = Distiller(teacher, DistillConfig(**FAST, adv_weight=0.0, w_min=1.0, w_max=3.0), student_init=init)
    assert w.student_module.config.time_cond_proj_dim == 256  # a w range adds the embedding to the init too
    assert float(w.student_module.time_embedding.cond_proj.weight.abs().sum()) == 0.0
    other = UNet2DConditionModel.from_config({**dict(teacher.unet.config), "layers_per_block": 2})
    with pytest.raises(ValueError, match="layers_per_block = 2 .reference 1."):
        Distiller(teacher, DistillConfig(**FAST), student_init=other)
    with pytest.raises(ValueError, match="student_init"):
        DistillConfig(student_init="").validate()


def test_w_range_student_exports_a_guidance_embedding(teacher, batch, tmp_path):
    d = Distiller(teacher, DistillConfig(**FAST, adv_weight=0.0, w_min=1.0, w_max=3.0))
    m = d.train_step(batch)
    assert 1.0 <= m["w_mean"] <= 3.0
    assert d.student_module.time_embedding.cond_proj.weight.abs().sum() > 0  # the new projection trains
    loaded = model_io.load(d.export(str(tmp_path / "w")))
    assert loaded.has_guidance_embedding and loaded.unet.config.time_cond_proj_dim == 256
    out = MusicCM(loaded).generate(["jazz"], loaded.geometry.native_duration, [1], GenerationConfig(steps=2,
                                                                                                    guidance_scale=3.0))
    assert np.isfinite(out.waveforms).all()


def test_lora_path_trains_adapters_and_exports_merged(teacher, batch, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = Distiller(teacher, DistillConfig(**{**FAST, "lr": 1e-3}, lora_rank=4))
    trainable = [n for n, p in d.student_module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in d.opt_g.param_groups[0]["params"]) < 0.5 * sum(
        p.numel() for p in teacher.unet.parameters())
    for _ in range(2):
        m = d.train_step(batch)
    assert np.isfinite(m["distill_loss"]) and np.isfinite(m["adv_g_loss"])
    loaded = model_io.load(d.export(str(tmp_path / "lora")))
    assert not any("lora" in n for n in loaded.unet.state_dict())
    g = torch.Generator().manual_seed(3)
    x, c, t = randn((1, 8, WINDOW, 16), g), torch.randn(1, 512, generator=g), torch.tensor([499])
    with torch.no_grad():
        merged = unet_forward(loaded.unet, x, t, c, None)
        adapter = unet_forward(d.target, x, t, c, None)
        base = unet_forward(teacher.unet, x, t, c, None)
    torch.testing.assert_close(merged, adapter, rtol=1e-4, atol=1e-5)  # merge == adapters
    assert float((merged - base).abs().max()) > 1e-6  # and the adapters did learn something


def test_adv_timesteps_judge_a_one_jump_estimate_from_those_timesteps(teacher, batch, monkeypatch):
    base = DistillConfig(**FAST)
    plain, at = Distiller(teacher, base), Distiller(teacher, base.replace(adv_timesteps=(99,)))
    seen: list[torch.Tensor] = []
    original = losses.consistency_output

    def spy(x, out, t):
        seen.append(t.clone())
        return original(x, out, t)

    monkeypatch.setattr(losses, "consistency_output", spy)
    m_plain = plain.train_step(batch, step_generator(0, 0, 0))
    seen.clear()
    m_at = at.train_step(batch, step_generator(0, 0, 0))
    # the same distillation draw and loss (the extra randomness comes last), another estimate for L_adv
    assert m_at["distill_loss"] == m_plain["distill_loss"] and m_at["t_mean"] == m_plain["t_mean"]
    assert m_at["adv_g_loss"] != m_plain["adv_g_loss"]
    assert len(seen) == 3 and seen[-1].tolist() == [99, 99, 99]  # student, EMA target, then the L_adv jump
    for bad in ({"adv_timesteps": (1000,)}, {"adv_timesteps": (699,), "adv_weight": 0.0}):
        with pytest.raises(ValueError, match="adv_timesteps"):
            base.replace(**bad)


def test_adv_weight_zero_is_the_no_adversary_ablation(teacher, batch):
    d = Distiller(teacher, DistillConfig(**FAST, adv_weight=0.0))
    assert d.disc is None and d.opt_d is None
    m = d.train_step(batch)
    assert m["adv_g_loss"] == m["adv_d_loss"] == m["r1"] == 0.0 and m["distill_loss"] > 0
    assert m["loss"] == pytest.approx(3.0 * m["distill_loss"])
    assert not any(k.startswith(("heads/", "opt_d/")) for k in d.checkpoint_tensors())


def test_dmd_generator_timestep_defaults_to_the_one_step_sampling_timestep():
    assert DistillConfig().generator_timestep == 999
    assert DistillConfig(max_train_timestep=699).generator_timestep == 699
    assert DistillConfig(max_train_timestep=699, dmd_timestep=500).generator_timestep == 500
    # distribution matching alone is a valid objective
    DistillConfig(distill_weight=0.0, adv_weight=0.0, dmd_weight=1.0).validate()


def test_distribution_matching_loss_gradient_is_the_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    x0, real, fake = (torch.randn(2, 3, 4, 5, generator=g) for _ in range(3))
    x = x0.clone().requires_grad_(True)
    losses.distribution_matching_loss(x, real, fake).backward()
    scale = (x0 - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(x.grad, (fake - real) / scale / x0.numel())
    x.grad = None
    losses.distribution_matching_loss(x, real, real).backward()  # fake score == real score: nothing to match
    assert float(x.grad.abs().max()) == 0.0


def test_dmd_step_trains_student_and_fake_score_and_round_trips(teacher, batch):
    """dmd_weight > 0: a fake score (a float32 copy of the teacher's UNet) beside the student; one step moves the
    student and the fake score, not the teacher; the checkpoint holds the fake score and its optimiser and
    resumes exactly; a run without DMD refuses it."""
    cfg = DistillConfig(**FAST, adv_weight=0.0, dmd_weight=2.0, fake_updates=2, max_train_timestep=699)
    d = Distiller(teacher, cfg)
    assert d.disc is None and max_diff(params(teacher.unet), params(d.fake_module)) == 0.0
    teacher0, student0, fake0 = params(teacher.unet), params(d.student_module), params(d.fake_module)
    m = d.train_step(batch)
    assert m["dmd_loss"] > 0 and m["fake_loss"] > 0 and m["fake_skipped"] == 0.0
    assert m["loss"] == pytest.approx(3.0 * m["distill_loss"] + 2.0 * m["dmd_loss"], rel=1e-5)
    assert max_diff(teacher0, params(teacher.unet)) == 0.0
    assert max_diff(student0, params(d.student_module)) > 0 and max_diff(fake0, params(d.fake_module)) > 0
    tensors = d.checkpoint_tensors()
    assert any(k.startswith("fake/") for k in tensors) and any(k.startswith("opt_fake/") for k in tensors)
    blob, meta = save(tensors), json.loads(json.dumps(d.checkpoint_meta()))
    d.train_step(batch)
    resumed = Distiller(teacher, cfg)
    resumed.restore(load(blob), meta)
    resumed.train_step(batch)
    assert resumed.step == d.step == 2
    assert max_diff(d.checkpoint_tensors(), resumed.checkpoint_tensors()) < 1e-6
    with pytest.raises(ValueError, match="dmd_weight"):
        Distiller(teacher, dataclasses.replace(cfg, dmd_weight=0.0)).restore(load(blob), meta)


def test_dmd_moves_the_student_only_where_teacher_and_fake_score_disagree(teacher, batch):
    """The fake score starts as the teacher: at w = 0 (real score = the unguided teacher) the first step's
    distribution-matching gradient vanishes (up to the rounding of CFG's uncond + 1·(cond − uncond)), with guidance
    (w = 2) the real score differs and the student gets a gradient. Catches a DMD term wired to the wrong models."""
    base = dict(FAST, adv_weight=0.0, distill_weight=0.0, dmd_weight=1.0, fake_updates=1, warmup_steps=0)
    norms = {w: Distiller(teacher, DistillConfig(**base, w=w)).train_step(batch)["grad_norm"] for w in (0.0, 2.0)}
    assert norms[2.0] > 1e-3 and norms[0.0] < 1e-2 * norms[2.0], norms  # measured: 2e-5 against 3e-2
    # dmd_guidance replaces 1 + w in the real score only: scale 1 at w = 2 vanishes, scale 3 at w = 0 does not.
    fixed = {g: Distiller(teacher, DistillConfig(**base, w=w, dmd_guidance=g)).train_step(batch)
             for g, w in ((1.0, 2.0), (3.0, 0.0))}
    assert fixed[1.0]["grad_norm"] < 1e-2 * norms[2.0], fixed
    assert fixed[3.0]["grad_norm"] == pytest.approx(norms[2.0], rel=1e-3), fixed


def test_gan_losses_are_logistic():
    zero = torch.zeros(4)
    assert float(losses.gan_classifier_loss(zero, zero)) == pytest.approx(2 * math.log(2))
    assert float(losses.gan_classifier_loss(torch.full((4,), 9.0), torch.full((4,), -9.0))) < 1e-3  # right
    assert float(losses.gan_generator_loss(torch.full((4,), 9.0))) < float(losses.gan_generator_loss(zero))


def test_dmd2_gan_term_trains_its_classifier_and_reaches_the_student(teacher, batch):
    """gan_weight > 0: a classifier on the fake score's mid block, trained with it (same optimiser, checkpointed,
    exact resume; a DMD run without it refuses the checkpoint). At w = 0 the DMD gradient vanishes (test above), so
    the student's gradient there is the GAN term's: it must reach the student through the frozen fake score."""
    cfg = DistillConfig(**FAST, adv_weight=0.0, dmd_weight=1.0, gan_weight=0.5, fake_updates=2)
    d = Distiller(teacher, cfg)
    head0, fake0 = params(d.gan_module), params(d.fake_module)
    m = d.train_step(batch)
    assert m["gan_g_loss"] > 0 and m["gan_cls_loss"] > 0 and m["fake_loss"] > 0
    assert m["loss"] == pytest.approx(3.0 * m["distill_loss"] + m["dmd_loss"] + 0.5 * m["gan_g_loss"], rel=1e-5)
    assert max_diff(head0, params(d.gan_module)) > 0 and max_diff(fake0, params(d.fake_module)) > 0
    tensors = d.checkpoint_tensors()
    assert any(k.startswith("gan/") for k in tensors)
    blob, meta = save(tensors), json.loads(json.dumps(d.checkpoint_meta()))
    d.train_step(batch)
    resumed = Distiller(teacher, cfg)
    resumed.restore(load(blob), meta)
    resumed.train_step(batch)
    assert max_diff(d.checkpoint_tensors(), resumed.checkpoint_tensors()) < 1e-6
    with pytest.raises(ValueError, match="gan_weight"):
        Distiller(teacher, dataclasses.replace(cfg, gan_weight=0.0)).restore(load(blob), meta)
    base = dict(FAST, adv_weight=0.0, distill_weight=0.0, dmd_weight=1.0, fake_updates=1, warmup_steps=0, w=0.0)
    norms = {g: Distiller(teacher, DistillConfig(**base, gan_weight=g)).train_step(batch)["grad_norm"]
             for g in (0.0, 1.0)}
    assert norms[1.0] > 100 * norms[0.0], norms  # measured: 2.7 against 2e-5


def test_clap_feature_network_option(teacher, batch):
    with pytest.raises(ValueError, match=r"out of range .* 4 blocks"):
        Distiller(teacher, DistillConfig(**FAST, feature_network="clap"))  # default layers are for 12 blocks
    clap0 = params(teacher.text_encoder)
    d = Distiller(teacher, DistillConfig(**FAST, feature_network="clap", disc_layers=(1, 3)))
    assert [f.shape[-1] for f in d.disc.feature_maps(batch.mel)] == [32, 128]
    m = d.train_step(batch)
    assert np.isfinite([m["adv_g_loss"], m["adv_d_loss"], m["r1"]]).all() and m["r1"] > 0
    assert max_diff(clap0, params(teacher.text_encoder)) == 0.0  # the shared CLAP tower stays frozen
    assert not teacher.text_encoder.training


def test_audiomae_weights_load_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    with pytest.warns(UserWarning, match="RANDOM"):
        src = ViTFeatures(MelConfig(), (2, 11), 32, tiny=True)
    path = tmp_path / "audiomae.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in src.net.state_dict().items()}, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no random-init warning when weights are given
        dst = ViTFeatures(MelConfig(), (2, 11), 32, audiomae_path=str(path), tiny=True)
    assert max_diff(params(src.net), params(dst.net)) == 0.0
    assert RANDOM_INIT_WARNING.startswith("!!!")
    save_file({"cls_token": torch.zeros(1, 1, 32)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="lacks ViT-B encoder weights"):
        ViTFeatures(MelConfig(), (2,), 32, audiomae_path=str(tmp_path / "partial.safetensors"), tiny=True)
    with pytest.raises(ValueError, match="could not be read"):
        ViTFeatures(MelConfig(), (2,), 32, audiomae_path=str(tmp_path / "nope.safetensors"), tiny=True)


# --------------------------------------------------------------------------- it learns
def test_short_distillation_learns(teacher):
    """40 steps on CPU: the student's self-consistency loss and its 1-step distance to the teacher's
    multi-step guided samples (same noise) both drop by a clear margin.

    The tiny random teacher predicts v (a random ε-predictor's DDIM trajectories blow up by 1/√ᾱ); AudioLCM's
    multi-step solver (k_skip=10: 5 solver hops over the 50-step grid) makes tens of steps enough.
    """
    v_sched = DDIMScheduler(**{**SCHEDULER, "prediction_type": "v_prediction"})
    v_teacher = dataclasses.replace(teacher, scheduler=v_sched)
    cfg = DistillConfig(**{**FAST, "lr": 1e-3, "warmup_steps": 0}, adv_weight=0.0, k_skip=10, w=1.0, loss_type="l2")
    d = Distiller(v_teacher, cfg)
    g = torch.Generator().manual_seed(0)
    b = 4
    x0 = randn((b, 8, WINDOW, 16), g) * 0.8
    cond = torch.nn.functional.normalize(torch.randn(b, 512, generator=g), dim=-1)
    data = PreparedBatch(x0, cond, torch.zeros(b, WINDOW * 4, 64))
    x_T = randn((b, 8, WINDOW, 16), torch.Generator().manual_seed(1))
    w = torch.full((b,), cfg.w)
    hops = [999, 799, 599, 399, 199]

    @torch.no_grad()
    def teacher_sample() -> torch.Tensor:  # the teacher's guided DDIM on the solver's hops, ending at t = 0
        x = x_T
        for i, t in enumerate(hops):
            t_next = hops[i + 1] if i + 1 < len(hops) else 0
            x = losses.solver_target(d._teacher_eps, x, torch.full((b,), t), torch.full((b,), t_next), cond,
                                     d.uncond, w, d.alphas)
        return x

    @torch.no_grad()
    def one_step_distance() -> float:
        t = torch.full((b,), 999)
        x = consistency_output(x_T, d._x0_fn(d.target)(x_T, t, cond, w), t)
        return float((x - reference).pow(2).mean())

    @torch.no_grad()
    def self_consistency() -> float:  # the distillation loss with θ⁻ = θ on fixed draws
        gg, total = torch.Generator().manual_seed(5), 0.0
        for _ in range(3):
            noise = randn(x0.shape, gg)
            t, t_prev = losses.sample_solver_timesteps(b, cfg.k_skip, gg)
            fn = d._x0_fn(d.target)
            total += float(losses.consistency_distillation_loss(fn, fn, d._teacher_eps, x0, noise, t, t_prev, cond,
                                                                d.uncond, w, d.alphas, "l2", 0.001)[0])
        return total / 3

    reference = teacher_sample()
    dist0, cons0 = one_step_distance(), self_consistency()
    for _ in range(40):
        d.train_step(data)
    dist1, cons1 = one_step_distance(), self_consistency()
    assert dist1 < 0.8 * dist0, (dist0, dist1)
    assert cons1 < 0.95 * cons0, (cons0, cons1)


# --------------------------------------------------------------------------- the `wrap` contract (DDP)
DDP_SCRIPT = r'''
import json, os, sys, warnings
import torch, torch.distributed as dist, torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP


def worker(rank, port, out):
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from musiccm.build import build_components
    from musiccm.distill.config import DistillConfig
    from musiccm.distill.data import PreparedBatch
    from musiccm.distill.distiller import Distiller

    # adv_timesteps: a second student call before the backward, as DDP must handle too
    # dmd_weight: the fake score is a third DDP module, updated after the student and the heads; gan_weight: its
    # classifier a fourth, run on the fake score's mid block (and by the student's loss with detached weights)
    cfg = DistillConfig(tiny_feature_network=True, warmup_steps=0, w_min=1.0, w_max=3.0, adv_timesteps=(699, 359),
                        dmd_weight=1.0, gan_weight=0.5, fake_updates=1)
    d = Distiller(build_components("tiny", seed=0, window=8), cfg, wrap=DDP, rank=rank)
    g = torch.Generator().manual_seed(rank)  # each rank its own data
    batch = PreparedBatch(torch.randn(2, 8, 8, 16, generator=g), torch.randn(2, 512, generator=g),
                          torch.randn(2, 32, 64, generator=g))
    losses = [d.train_step(batch)["distill_loss"] for _ in range(2)]
    torch.save({"tensors": d.checkpoint_tensors(), "losses": losses}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
'''


@pytest.mark.slow
def test_ddp_wrap_keeps_ranks_identical(tmp_path):
    """Two gloo ranks, DDP around the student, the heads and the fake score (what Ray's prepare_model does):
    different data, identical weights, EMA targets, heads, fake scores and optimiser states after each step (R1's
    double backward included)."""
    import subprocess
    import sys

    from musiccm.testing.seaweed import free_ports

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(free_ports(1)[0]), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["losses"] != r1["losses"]  # the ranks saw different data…
    assert max_diff(r0["tensors"], r1["tensors"]) == 0.0  # …and hold the same state


@pytest.mark.parametrize("feature_network", ["audiomae", "clap"])
def test_fp16_autocast_step_stays_finite_on_cpu(batch, feature_network):
    """The GPU fp16 path's numerics, emulated with CPU autocast (the job itself only autocasts on CUDA): on an H200
    the adversarial losses went NaN when the discriminator's front end overflowed float16; this catches it anywhere."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random AudioMAE weights
        d = Distiller(build_components("tiny", seed=0, window=WINDOW), DistillConfig(**FAST,
                      feature_network=feature_network, disc_layers=(1, 3), dmd_weight=1.0, gan_weight=0.5,
                      fake_updates=1))
    d.amp_dtype, d.scaler, d.fake_scaler = torch.float16, torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    for _ in range(3):
        m = d.train_step(batch)
        assert np.isfinite([m["distill_loss"], m["adv_g_loss"], m["adv_d_loss"], m["r1"], m["dmd_loss"],
                            m["fake_loss"], m["gan_g_loss"], m["gan_cls_loss"]]).all(), m
        assert m["disc_skipped"] == 0.0
    assert all(torch.isfinite(p).all() for p in d.disc.heads.parameters())
    assert all(torch.isfinite(p).all() for p in d._fake_params())  # fake score and GAN classifier


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_on_gpu(teacher, batch, precision):
    gpu_teacher = build_components("tiny", seed=0, window=WINDOW)
    cfg = DistillConfig(**FAST, mixed_precision=precision, dmd_weight=1.0, gan_weight=0.5, fake_updates=1)
    d = Distiller(gpu_teacher, cfg, device="cuda")
    for _ in range(3):
        m = d.train_step(batch)
    assert np.isfinite([m["distill_loss"], m["adv_g_loss"], m["adv_d_loss"], m["r1"], m["dmd_loss"],
                        m["fake_loss"]]).all()
    assert (m["grad_scale"] > 1.0) == (precision == "fp16")
    blob, meta = save(d.checkpoint_tensors()), json.loads(json.dumps(d.checkpoint_meta()))
    resumed = Distiller(build_components("tiny", seed=0, window=WINDOW), cfg, device="cuda")
    resumed.restore(load(blob), meta)
    assert resumed.scaler.get_scale() == d.scaler.get_scale()
    assert resumed.fake_scaler.get_scale() == d.fake_scaler.get_scale()
