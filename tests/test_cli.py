"""`musiccm generate` end to end: files, tags, exit codes, no partial output, --help."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import soundfile as sf

from musiccm import audio_io
from musiccm.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "musiccm.cli", *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("fmt", ["flac", "wav"])
def test_generate_writes_tagged_exact_length_file(tiny_student_dir, tmp_path, fmt, capsys):
    out = tmp_path / f"clip.{fmt}"
    rc = main(["generate", "--model", tiny_student_dir, "--prompt", "a slow blues guitar", "--duration", "2.5",
               "--steps", "2", "--seed", "42", "--out", str(out)])
    assert rc == 0
    info = sf.info(out)
    assert (info.frames, info.samplerate, info.channels, info.subtype) == (40000, 16000, 1, "PCM_16")
    tags = audio_io.read_tags(out)
    assert tags["prompt"] == "a slow blues guitar"
    assert (tags["seed"], tags["steps"], tags["model"]) == (42, 2, tiny_student_dir)
    assert json.loads(capsys.readouterr().out.strip())["samples"] == 40000
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left behind


def test_default_model_runs_offline_and_is_the_trained_demo_student(tmp_path):
    out = tmp_path / "d.flac"
    r = run_cli("generate", "--prompt", "a slow piano piece", "--duration", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "warning" not in json.loads(r.stdout)
    assert sf.info(out).frames == 16000


def test_an_untrained_model_says_so(tmp_path, untrained_student_dir):
    out = tmp_path / "u.flac"
    r = run_cli("generate", "--model", untrained_student_dir, "--prompt", "jazz", "--duration", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "untrained" in json.loads(r.stdout)["warning"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--prompt", ""], "prompt"),
        (["--prompt", "x", "--duration", "0"], "duration"),
        (["--prompt", "x", "--duration", "nan"], "duration"),
        (["--prompt", "x", "--duration", "601"], "limit"),
        (["--prompt", "x", "--steps", "0"], "steps"),
        (["--prompt", "x", "--seed", "-3"], "seed"),
        (["--prompt", "x", "--model", "/does/not/exist"], "does not exist"),
        (["--prompt", "x", "--model", "MISSING_UNET"], "unet"),
    ],
)
def test_user_errors_exit_nonzero_without_traceback_or_file(tiny_student_dir, tmp_path, extra, message):
    if "MISSING_UNET" in extra:
        broken = tmp_path / "broken"
        shutil.copytree(tiny_student_dir, broken)
        shutil.rmtree(broken / "unet")
        extra = [str(broken) if e == "MISSING_UNET" else e for e in extra]
    elif "--model" not in extra:
        extra = [*extra, "--model", tiny_student_dir]
    out = tmp_path / "never.flac"
    r = run_cli("generate", *extra, "--out", str(out))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_bad_extension_is_rejected(tmp_path):
    r = run_cli("generate", "--prompt", "x", "--out", str(tmp_path / "x.mp3"))
    assert r.returncode == 2 and ".flac or .wav" in r.stderr


def test_help_documents_every_flag():
    r = run_cli("generate", "--help")
    assert r.returncode == 0
    for flag in ("--model", "--prompt", "--duration", "--steps", "--seed", "--out", "--guidance-scale",
                 "--hop-frames", "--taper",
                 "--crop-batch-size", "--max-duration", "--device", "--dtype", "--local-files-only"):
        assert flag in r.stdout


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    def fail(*a):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        audio_io.write_atomic(tmp_path / "a.flac", b"abc")
    assert list(tmp_path.iterdir()) == []
