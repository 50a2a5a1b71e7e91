"""benchmarks/self_distill_probe.py: targets from the frozen student, fine-tuning, checkpoints as model directories."""

from __future__ import annotations

import json

import pytest
import torch

from musiccm.testing.scripts import load_script, unet_state


@pytest.fixture(scope="module")
def probe():
    return load_script("benchmarks/self_distill_probe.py")


def test_fine_tunes_and_saves_loadable_students(probe, tiny_student_dir, tmp_path):
    from musiccm import model
    from musiccm.pipeline import GenerationConfig, MusicCM

    out = tmp_path / "run"
    argv = ["--model", tiny_student_dir, "--out", str(out), "--captions", "4", "--steps", "2", "--batch-size", "2",
            "--checkpoint-every", "1", "--lr", "1e-3"]
    assert probe.main(argv) == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["jump_loss"] > 0 and r["reg_loss"] >= 0 for r in rows)
    start, first, second = (unet_state(d) for d in (tiny_student_dir, out / "step-1", out / "step-2"))
    assert any(not torch.equal(start[k], first[k]) for k in start)  # trained
    assert any(not torch.equal(first[k], second[k]) for k in start)
    student = model.load(str(out / "step-2"))
    assert student.is_consistency and student.extra["self_distill_probe"]["step"] == 2
    gen = MusicCM(student, GenerationConfig(steps=1))
    wave = gen.generate(["a piano"], student.geometry.native_duration, [0]).waveforms
    assert wave.shape == (1, student.geometry.num_samples(student.geometry.native_duration))

    # the targets are reproducible, each clip's 2-step sample depends on its own x_T alone (not on the batch it
    # was made in), and the regulariser's rows use only the later timesteps of the 2- to 6-step grids
    data = torch.load(out / "targets.pt", weights_only=True)
    c = model.load(tiny_student_dir)
    grids = [probe.grid(c, k) for k in range(2, 7)]
    later = sorted({t for g in grids for t in g[1:]})
    again = probe.targets(c, _captions(4), *grids[0], later, seed=0)
    for k in ("x_T", "sample", "t", "frozen"):
        assert torch.equal(again[k], data[k]), k
    one_by_one = probe.targets(c, _captions(4), *grids[0], later, seed=0, batch=1)
    assert torch.equal(one_by_one["x_T"], data["x_T"])
    torch.testing.assert_close(one_by_one["sample"], data["sample"], atol=1e-3, rtol=1e-3)  # batched float sums
    assert not torch.allclose(data["sample"][0], data["sample"][1])
    assert set(data["t"].tolist()) <= set(later)


def _captions(n: int) -> list[str]:
    from musiccm import synthetic

    return [synthetic.clip(i, 0)[1] for i in range(n)]


def test_zero_learning_rate_changes_nothing_and_a_teacher_is_refused(probe, tiny_student_dir, tiny_teacher_dir,
                                                                      tmp_path):
    out = tmp_path / "lr0"
    assert probe.main(["--model", tiny_student_dir, "--out", str(out), "--captions", "2", "--steps", "1",
                       "--batch-size", "1", "--lr", "0"]) == 0
    start, end = unet_state(tiny_student_dir), unet_state(out / "step-1")
    assert all(torch.equal(start[k], end[k]) for k in start)
    with pytest.raises(SystemExit, match="was made for"):  # the cached targets belong to another caption count
        probe.main(["--model", tiny_student_dir, "--out", str(out), "--captions", "3", "--steps", "1"])
    with pytest.raises(SystemExit, match="needs a consistency student"):
        probe.main(["--model", tiny_teacher_dir, "--out", str(tmp_path / "teacher"), "--steps", "1"])
