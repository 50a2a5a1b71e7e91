"""`musiccm export`: a student from any distillation checkpoint (local here; S3 in test_distill_job)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from musiccm import model
from musiccm.build import build_components
from musiccm.cli import main
from musiccm.distill.config import DistillConfig
from musiccm.distill.distiller import Distiller
from musiccm.jobs import checkpoints
from musiccm.jobs.export import find_checkpoint

WINDOW = 8  # latent frames: tiny clips keep the test fast


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_find_checkpoint_takes_a_checkpoint_or_the_latest_of_a_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for name in ("checkpoint-000002", "checkpoint-000010", "checkpoint-000004", "export", "checkpoint-10"):
        touch(run / name / checkpoints.META)
    assert find_checkpoint(str(run)) == str(run / "checkpoint-000010")
    touch(run / checkpoints.dir_name(1_000_000) / checkpoints.META)  # past six digits the name grows
    assert find_checkpoint(str(run)) == str(run / "checkpoint-1000000")
    assert find_checkpoint(str(run / "checkpoint-000004")) == str(run / "checkpoint-000004")
    with pytest.raises(ValueError, match="neither a distillation checkpoint"):
        find_checkpoint(str(run / "export-elsewhere"))


def test_cli_exports_a_checkpoint_with_a_moved_teacher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint written as the job writes it, exported after its teacher moved (--teacher), online weights
    (--no-ema): the same student Distiller.export writes in-process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher_dir = model.save(build_components("tiny", seed=0, window=WINDOW), str(tmp_path / "teacher"))
        config = DistillConfig(teacher=str(teacher_dir), adv_weight=0.0, warmup_steps=1, batch_size=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            distiller = Distiller(model.load(teacher_dir), config)
        with torch.no_grad():  # stand-in for training: make the online student differ from its EMA target
            for p in distiller.student_module.parameters():
                p.add_(0.01 * torch.randn_like(p))
        distiller.step = 3
        position = checkpoints.WorkerPosition(rank=0, world_size=1, step=3, epoch=0, rows=6)
        job = checkpoints.JobState(step=3, epoch=0, attempt=1, samples=6, skipped_rows=0, world_size=1)
        run = tmp_path / "runs" / "r"
        checkpoints.save(str(run / checkpoints.dir_name(3)), position, distiller.checkpoint_tensors(),
                         distiller.checkpoint_meta(), job)
        expected = model.load(distiller.export(str(tmp_path / "in-process"), use_ema=False)).unet.state_dict()
        moved = shutil.move(str(teacher_dir), str(tmp_path / "moved-teacher"))

        out = tmp_path / "exported"
        assert main(["export", str(run), "--output", str(out), "--teacher", moved, "--no-ema"]) == 0
    finally:
        torch.set_num_threads(threads)
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info == {"checkpoint": str(run / "checkpoint-000003"), "step": 3, "teacher": moved, "use_ema": False,
                    "output": str(out)}
    exported = model.load(str(out))
    assert exported.is_consistency and exported.extra["distill"]["step"] == 3
    got = exported.unet.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_cli_export_of_a_directory_without_checkpoints_is_a_user_error(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "musiccm: error:" in err and "neither a distillation checkpoint" in err
    assert not (tmp_path / "out").exists()
