"""recipes/demo/two_step_score.py: the student's 2-step samples, the teacher fitted to them, saved as a teacher."""

from __future__ import annotations

import pytest
import torch

from musiccm.testing.scripts import load_script, unet_state


@pytest.fixture(scope="module")
def script():
    return load_script("recipes/demo/two_step_score.py")


def test_fits_the_teacher_to_the_students_two_step_samples(script, tiny_student_dir, tiny_teacher_dir, tmp_path):
    from musiccm import model
    from musiccm.pipeline import GenerationConfig, MusicCM

    out = tmp_path / "score"
    argv = ["--student", tiny_student_dir, "--teacher", tiny_teacher_dir, "--out", str(out), "--captions", "3",
            "--draws", "2", "--steps", "2", "--batch-size", "2", "--max-timestep", "699"]
    assert script.main(argv) == 0
    data = torch.load(tmp_path / "score-samples.pt", weights_only=True)
    assert data["latents"].shape[0] == data["text"].shape[0] == 6  # captions x draws
    assert not torch.allclose(data["latents"][0], data["latents"][3])  # the second draw has other noise
    assert data["made_by"]["max_timestep"] == 699
    # the samples are the student's own 2-step sampling from t = 699, as the pipeline runs it
    c = model.load(tiny_student_dir)
    again, _ = script.two_step_latents(c, [script_caption(0)], 1, 0, 699)
    torch.testing.assert_close(again[0], data["latents"][0], atol=1e-4, rtol=1e-4)
    fitted = model.load(str(out))
    assert not fitted.is_consistency and fitted.extra["two_step_score"]["samples"] == 6
    start, end = unet_state(tiny_teacher_dir), unet_state(out)
    assert any(not torch.equal(start[k], end[k]) for k in start)  # fine-tuned from the teacher
    gen = MusicCM(fitted, GenerationConfig(steps=2, guidance_scale=1.0))
    wave = gen.generate(["a piano"], fitted.geometry.native_duration, [0]).waveforms
    assert wave.shape == (1, fitted.geometry.num_samples(fitted.geometry.native_duration))

    with pytest.raises(SystemExit, match="was made for"):  # the cached samples belong to another caption count
        script.main([*argv[:argv.index("--captions")], "--captions", "4", "--steps", "1"])
    with pytest.raises(SystemExit, match="needs a consistency student"):
        script.main(["--student", tiny_teacher_dir, "--teacher", tiny_teacher_dir, "--out", str(tmp_path / "t")])


def test_rejects_non_positive_counts(script, capsys):
    with pytest.raises(SystemExit):
        script.parse(["--student", "s", "--teacher", "t", "--out", "o", "--draws", "0"])
    assert "--draws must be an integer >= 1, got 0" in capsys.readouterr().err


def script_caption(i: int) -> str:
    from musiccm import synthetic

    return synthetic.clip(i, 0)[1]
