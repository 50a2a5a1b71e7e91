"""benchmarks/dmd_probe.py: DMD fine-tuning of a consistency student against its teacher, checkpoints as models."""

from __future__ import annotations

import json

import pytest
import torch

from musiccm.testing.scripts import load_script, unet_state


@pytest.fixture(scope="module")
def probe():
    return load_script("benchmarks/dmd_probe.py")


def _run(probe, student, teacher, out, *extra: str) -> list[dict]:
    argv = ["--student", student, "--teacher", teacher, "--out", str(out), "--captions", "4", "--steps", "2",
            "--batch-size", "2", "--fake-updates", "2", "--checkpoint-every", "1", *extra]
    assert probe.main(argv) == 0
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_fine_tunes_the_jump_and_saves_loadable_students(probe, tiny_student_dir, tiny_teacher_dir, tmp_path):
    from musiccm import model
    from musiccm.pipeline import GenerationConfig, MusicCM

    out = tmp_path / "run"
    rows = _run(probe, tiny_student_dir, tiny_teacher_dir, out, "--lr", "1e-3", "--max-timestep", "699")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["dmd_loss"] > 0 and r["fake_loss"] > 0 and r["reg_loss"] >= 0 for r in rows)
    start, first, second = (unet_state(d) for d in (tiny_student_dir, out / "step-1", out / "step-2"))
    assert any(not torch.equal(start[k], first[k]) for k in start)  # trained
    assert any(not torch.equal(first[k], second[k]) for k in start)
    student = model.load(str(out / "step-2"))
    assert student.is_consistency and student.extra["dmd_probe"]["step"] == 2
    assert student.extra["max_timestep"] == 699  # the jump it was trained on is the one it samples from
    gen = MusicCM(student, GenerationConfig(steps=1))
    wave = gen.generate(["a piano"], student.geometry.native_duration, [0]).waveforms
    assert wave.shape == (1, student.geometry.num_samples(student.geometry.native_duration))
    assert torch.isfinite(torch.as_tensor(wave)).all()


def test_zero_learning_rate_changes_nothing(probe, tiny_student_dir, tiny_teacher_dir, tmp_path):
    _run(probe, tiny_student_dir, tiny_teacher_dir, tmp_path / "run", "--lr", "0")
    start, end = unet_state(tiny_student_dir), unet_state(tmp_path / "run" / "step-2")
    assert all(torch.equal(start[k], end[k]) for k in start)


def test_refuses_models_in_the_wrong_roles(probe, tiny_student_dir, tiny_teacher_dir, tmp_path):
    with pytest.raises(SystemExit, match="consistency student"):
        probe.main(["--student", tiny_teacher_dir, "--teacher", tiny_teacher_dir, "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="diffusion teacher"):
        probe.main(["--student", tiny_student_dir, "--teacher", tiny_student_dir, "--out", str(tmp_path / "b")])


@pytest.mark.parametrize("bad", [["--min-t", "500", "--max-t", "100"], ["--max-t", "1000"], ["--fake-updates", "0"]])
def test_refuses_bad_settings(probe, bad, capsys):
    with pytest.raises(SystemExit) as info:
        probe.parse(["--student", "s", "--teacher", "t", "--out", "o", *bad])
    assert info.value.code == 2 and bad[0] in capsys.readouterr().err  # the message names the flag
