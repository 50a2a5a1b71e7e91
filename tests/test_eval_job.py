"""Evaluation end to end: feature networks against audioldm_eval's own code, safe weight loading, the job.

Weights are RANDOMLY INITIALISED Cnn14 (`{"model": state_dict}` as the PANNs release), VGGish (a plain
state dict as torch.hub caches it), a tiny CLAP and a label classifier (`classifier.save`) saved to
files and passed by path: the code path real weights take. The generated set is a real batch-output
layout (metric shards written with `musiccm.batch.metrics`, FLAC clips, instrument/mode label columns
carried from the manifest) of short synthetic tones; the reference set shares their ids (KL pairs by
id), labels some of them in a Parquet beside the audio, and adds an unreadable file and a 22.05 kHz
stereo file. The job runs as users run
it, `python ray_jobs/evaluate.py ...` in a subprocess with its own local Ray, on local disk and on
a real S3 server (SeaweedFS); the faster availability checks run the same code in-process.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from musiccm import audio_io, storage
from musiccm.batch import metrics as batch_metrics
from musiccm.defaults import DEFAULT_MODEL
from musiccm.evaluation import classifier as C
from musiccm.evaluation import features as F
from musiccm.evaluation import metrics as M
from musiccm.evaluation import report
from musiccm.jobs import evaluate as E
from musiccm.testing.seaweed import SeaweedFS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "ray_jobs" / "evaluate.py")
SR = 16_000
FREQS = (220.0, 330.0, 440.0, 550.0, 660.0, 770.0)
# Manifest label columns the batch job carries into the metric rows (c5 has no instrument label).
INSTRUMENTS = ("piano", "organ", "piano", "guitar", "organ", None)
MODES = ("major", "minor", "minor", "major", "major", "minor")
CLASSES = {"instrument": ["piano", "organ", "guitar"], "mode": ["major", "minor"], "tempo": ["slow", "fast"]}
LABEL_SCHEMA = pa.schema([("instrument", pa.string()), ("mode", pa.string())])


def tone(freq: float, seconds: float = 2.0, sr: int = SR, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.15 * np.sin(2 * np.pi * 2.01 * freq * t)
    return (wave + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def write_batch_output(root: str, clips: list[tuple[str, str, np.ndarray]], steps: int, name: str) -> None:
    """A batch-generation output as `musiccm.jobs.batch` writes it: audio/, metrics/*.parquet, _SUMMARY.json."""
    schema = batch_metrics.metric_schema(LABEL_SCHEMA)  # core columns + carried manifest label columns
    writer = batch_metrics.ShardWriter(storage.join(root, "metrics"), "20250101T000000000000Z-abcdef",
                                       schema, 100, 1e9)
    rows = []
    for i, (clip_id, prompt, wave) in enumerate(clips):
        data = audio_io.encode(wave, SR, "flac", {"prompt": prompt})
        uri = storage.join(root, "audio", f"{clip_id}.flac")
        storage.write_bytes(uri, data)
        request = {"id": clip_id, "prompt": prompt, "duration_s": None, "seed": 0, "steps": steps, "format": "flac",
                   "instrument": INSTRUMENTS[i], "mode": MODES[i]}
        rows.append(batch_metrics.metric_row(
            request, waveform=wave, sample_rate=SR, audio=batch_metrics.AudioFile(uri, len(data), "-"),
            model={"name": name, "uri": DEFAULT_MODEL, "hash": "0123456789abcdef"},
            guidance_scale=None, truncated=False, clap=None, generation_s=0.05 * steps, clap_s=0.0, batch_clips=4,
            node_id="n", device="cpu"))
    rows.append({**rows[0], "id": "gone", "audio_uri": storage.join(root, "audio", "gone.flac")})  # no audio file
    writer.add(rows)
    writer.close()
    storage.write_bytes(storage.join(root, "audio", "c9.flac"), b"fLaC but truncated")  # unreadable clip
    writer = batch_metrics.ShardWriter(storage.join(root, "metrics"), "20250101T000001000000Z-abcdef",
                                       schema, 100, 1e9)
    writer.add([{**rows[0], "id": "c9", "audio_uri": storage.join(root, "audio", "c9.flac")}])
    writer.close()
    summary = {"run_name": name + f"-{steps}step", "model": {"name": name, "uri": DEFAULT_MODEL}}
    storage.write_bytes(storage.join(root, "_SUMMARY.json"), json.dumps(summary).encode())


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Random Cnn14 (.pth, {"model": state_dict}), VGGish (torch.hub cache layout), tiny CLAP, label classifier."""
    spec = importlib.util.spec_from_file_location("make_weights", REPO / "scripts" / "make_random_eval_weights.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    root = tmp_path_factory.mktemp("weights")
    return {
        "pann": str(make.make_pann(root / F.PANN_FILE, seed=0)),
        "vggish": str(make.make_vggish(root / "torch-home" / "hub" / "checkpoints" / F.VGGISH_FILE, seed=0)),
        "torch_home": str(root / "torch-home"),
        "clap": str(make.make_clap(root / "clap", seed=0)),
        "classifier": random_classifier(root / "classifier"),
    }


def random_classifier(directory: Path) -> str:
    """A randomly initialised label classifier (instrument, mode, tempo heads) saved as the demo saves one."""
    torch.manual_seed(0)
    return C.save(C.LabelClassifier(CLASSES, width=16, embed_dim=16), directory)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """gen/ (6 tones, an unreadable clip, a row without audio), ref/ (4 of the ids, other tones, extras), train/."""
    root = tmp_path_factory.mktemp("evaldata")
    gen, ref, train = str(root / "gen"), str(root / "ref"), str(root / "train")
    write_batch_output(gen, [(f"c{i}", f"calm piano number {i}", tone(f, seed=i)) for i, f in enumerate(FREQS)],
                       steps=4, name="tiny-student")
    for i, f in enumerate(FREQS[:4]):  # c0..c3 pair with generated clips; extra-* do not
        storage.write_bytes(f"{ref}/c{i}.flac", audio_io.encode(tone(f * 1.07, seed=10 + i), SR, "flac"))
    for i in range(2):
        storage.write_bytes(f"{ref}/extra-{i}.flac", audio_io.encode(tone(250 + 100 * i, seed=30 + i), SR, "flac"))
    # Labels beside the audio (no caption column): the classifier's reference accuracy; extra-1 is unlabelled.
    pq.write_table(pa.table({"id": ["c0", "c1", "c2", "c3", "extra-0"],
                             "instrument": ["piano", "organ", "piano", "guitar", "guitar"]}), f"{ref}/labels.parquet")
    storage.write_bytes(f"{ref}/broken.wav", b"RIFF....WAVEfmt but nothing else")
    buf = io.BytesIO()
    sf.write(buf, np.stack([tone(300, sr=22050), tone(301, sr=22050)], 1), 22050, format="WAV")
    storage.write_bytes(f"{ref}/stereo22k.wav", buf.getvalue())
    for i in range(3):
        storage.write_bytes(f"{train}/t{i}.wav", audio_io.encode(tone(110 + 40 * i, seed=20 + i), SR, "wav"))
    storage.write_bytes(f"{train}/copy-of-c0.flac", storage.read_bytes(f"{gen}/audio/c0.flac"))
    return {"root": str(root), "gen": gen, "ref": ref, "train": train}


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python ray_jobs/evaluate.py ...` with a fresh local Ray instance."""
    env = {**os.environ, **(env or {}), "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=600,
                          cwd=cwd)




def low_rank_fd(x: np.ndarray, y: np.ndarray) -> float:
    """Reference Fréchet distance for N ≪ D without a 2048² sqrtm: Tr((Σx Σy)^½) = ‖Xc Ycᵀ‖_* / √((n−1)(m−1))."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    nuclear = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt((len(x) - 1) * (len(y) - 1))
    traces = (xc**2).sum() / (len(x) - 1) + (yc**2).sum() / (len(y) - 1)
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + traces - 2 * nuclear)


def read_json(uri: str) -> dict:
    return json.loads(storage.read_bytes(uri))


def feature_arrays(uri: str, which: str) -> dict[str, np.ndarray | list]:
    rows = [r for r in pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()
            if r["set"] == which and r["error"] is None]
    return {"ids": [r["id"] for r in rows],
            "emb": np.asarray([r["pann_embedding"] for r in rows], np.float32),
            "logits": np.asarray([r["pann_logits"] for r in rows], np.float32),
            "vggish": np.concatenate([np.asarray(r["vggish"], np.float32).reshape(-1, 128) for r in rows]),
            "rows": rows}


# ---------------------------------------------------------------- feature networks and weights


def test_cnn14_features_equal_audioldm_evals_own_class(weights: dict[str, str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Our Cnn14 (no CWD load, no wget) equals audioldm_eval's Cnn14 after its WaveDataset steps."""
    import torchaudio.functional as AF
    from audioldm_eval.datasets.load_mel import pad_short_audio
    from audioldm_eval.feature_extractors.panns.models import Cnn14

    state, _ = F.load_state_dict(weights["pann"])
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / F.PANN_FILE).symlink_to(weights["pann"])
    (tmp_path / "ckpt" / "Cnn14_mAP=0.431.pth").write_bytes(b"")  # present: the library does not shell out
    monkeypatch.chdir(tmp_path)
    theirs = Cnn14(features_list=["2048", "logits"], **F.CNN14_16K).eval()
    ours = F.PannCnn14(state)
    for sr, seconds in ((16_000, 1.5), (22_050, 2.5)):
        wave = torch.from_numpy(np.stack([tone(500, seconds, sr), tone(900, seconds, sr, seed=1)])) + 0.05
        emb, logits = ours(wave, sr)
        x = wave[0:1] - wave[0:1].mean()  # WaveDataset.read_from_file: first channel, mean removed, resampled,
        x = pad_short_audio(AF.resample(x, sr, 16_000), min_samples=32_000)  # padded to 2 s
        with torch.no_grad():
            ref = theirs(x)
        np.testing.assert_allclose(emb, ref["2048"][0].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(logits, ref["logits"][0].numpy(), rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "ckpt" / "Cnn14_mAP=0.431.pth").read_bytes()  # nothing was downloaded over it


def test_vggish_frames_and_activation(weights: dict[str, str]) -> None:
    net = F.VGGish(F.load_state_dict(weights["vggish"])[0])
    frames = net(torch.from_numpy(tone(440, 3.0))[None], SR)
    assert frames.shape == (3, 128)  # one 128-d embedding per full 0.96 s
    assert (frames < 0).any()  # the last ReLU is dropped, as audioldm_eval does (use_activation=False)
    assert net(torch.from_numpy(tone(440, 0.9))[None], SR).shape == (0, 128)  # too short for one frame
    stereo_44k = torch.from_numpy(np.stack([tone(440, 3.0, 44_100)] * 2))
    np.testing.assert_allclose(net(stereo_44k, 44_100), frames, atol=0.05 * np.abs(frames).max())


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > evil-ran",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weight_files_are_never_unpickled_beyond_tensors_and_numpy(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    net = torch.nn.Linear(3, 2)
    torch.save({"model": net.state_dict(), "hook": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(F.WeightsError, match="refusing to unpickle"):
        F.load_state_dict(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "evil-ran").exists()
    (tmp_path / "pickle.pth").write_bytes(pickle.dumps({"w": 1}))  # not a torch file at all
    with pytest.raises(F.WeightsError):
        F.load_state_dict(str(tmp_path / "pickle.pth"))
    torch.save({"model": net.state_dict(), "sampler": {"queue": np.arange(4), "seed": np.float32(1)}},
               tmp_path / "panns-like.pth")
    state, digest = F.load_state_dict(str(tmp_path / "panns-like.pth"), digest=True)
    assert set(state) == {"weight", "bias"} and len(digest) == 16
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    loaded, _ = F.load_state_dict(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    with pytest.raises(F.WeightsError, match=r"missing: bias.*unexpected: extra"):
        F.fit(torch.nn.Linear(3, 2), {"weight": torch.zeros(2, 3), "extra": torch.zeros(1)}, "test")
    with pytest.raises(F.WeightsError, match="shape"):
        F.fit(torch.nn.Linear(3, 2), {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "test")
    with pytest.raises(F.WeightsError, match="no such file"):
        F.load_state_dict(str(tmp_path / "absent.pth"))


# ---------------------------------------------------------------- the whole job


@pytest.fixture(scope="module")
def local_run(weights: dict[str, str], data: dict[str, str]) -> tuple[str, subprocess.CompletedProcess]:
    out = str(Path(data["root"]) / "eval-local")
    proc = cli("--generated", data["gen"], "--reference", data["ref"], "--train-reference", data["train"],
               "--out", out, "--pann-ckpt", weights["pann"], "--vggish-ckpt", weights["vggish"], "--progress-s", "1",
               "--classifier", weights["classifier"])
    # No --clap-model: the generating model's own CLAP (the metric rows name the bundled default model).
    return out, proc


@pytest.mark.slow
def test_job_on_local_disk(local_run: tuple[str, subprocess.CompletedProcess], data: dict[str, str],
                           weights: dict[str, str]) -> None:
    out, proc = local_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = read_json(f"{out}/metrics.json")
    assert result["schema_version"] == 1 and result["label"] == "tiny-student-4step"
    assert result["model"]["name"] == "tiny-student" and result["steps"] == 4
    assert result["latency"]["seconds_per_clip_mean"] == pytest.approx(0.2)
    assert result["counts"] == {"generated": 6, "reference": 7, "train": 4, "paired_for_kl": 4, "unreadable": 2,
                                "missing_audio": 1, "vggish_clips_generated": 6}
    assert {(u["set"], u["id"]) for u in result["unreadable"]} == {("generated", "c9"), ("reference", "broken")}
    assert all(u["error"].startswith("unreadable:") for u in result["unreadable"])
    assert result["missing_audio"] == ["gone"]
    assert result["unavailable"].keys() == {"clap_text_audio_reference_mean", "clap_text_audio_reference_std"}
    assert result["networks"]["pann"]["uri"] == weights["pann"] and len(result["networks"]["pann"]["sha256_16"]) == 16
    assert result["networks"]["clap"] == {"uri": DEFAULT_MODEL, "layout": "musicldm", "own_model": True}
    # Every number agrees with the pure metric functions on the features the actors wrote.
    gen, ref = feature_arrays(f"{out}/features.parquet", "generated"), feature_arrays(f"{out}/features.parquet",
                                                                                       "reference")
    m = result["metrics"]
    assert m["frechet_distance"] == pytest.approx(low_rank_fd(gen["emb"], ref["emb"]), rel=1e-4)
    assert m["frechet_audio_distance"] == pytest.approx(M.frechet_audio_distance(gen["vggish"], ref["vggish"]),
                                                        rel=1e-6)
    gi, ri = M.pair_by_id(gen["ids"], ref["ids"])
    assert [gen["ids"][i] for i in gi] == [f"c{i}" for i in range(4)]
    assert any("KL over the 4 of 6 generated clips" in n for n in result["notes"])
    assert m["kullback_leibler_divergence_softmax"] == pytest.approx(
        M.kl_divergence(gen["logits"][gi], ref["logits"][ri])["softmax"], rel=1e-6)
    assert m["inception_score_mean"] == pytest.approx(M.inception_score(gen["logits"])[0], rel=1e-9)
    assert m["kernel_inception_distance_mean"] is not None and m["frechet_distance"] > 0
    assert -1 <= m["clap_text_audio_mean"] <= 1
    assert m["sim_aa@0.95"] >= 1 / 6  # the training set holds a copy of c0
    assert m["sim_aa@0.90"] >= m["sim_aa@0.95"] and m["sim_aa_max_mean"] <= 1 + 1e-6
    stereo = next(r for r in ref["rows"] if r["id"] == "stereo22k")
    assert (stereo["sample_rate"], stereo["channels"], stereo["vggish_frames"]) == (22050, 2, 2)
    train = pq.read_table(f"{out}/train_clap_embeddings.parquet")
    assert train.num_rows == 4 and train.schema.metadata[b"musiccm.clap_model"].decode() == DEFAULT_MODEL
    rows = report.parse_table(Path(f"{out}/table.md").read_text())
    assert len(rows) == 1 and rows[0]["Run"] == "tiny-student-4step" and rows[0]["Steps"] == "4"
    assert rows[0]["FD_pann ↓"] == f"{m['frechet_distance']:.2f}" and rows[0]["Clips"] == "6"
    assert "tiny-student" in proc.stdout and "unreadable files (2)" in proc.stdout


def expected_accuracy(rows: list[dict], labels: dict[str, dict]) -> dict[str, float]:
    """Attribute accuracy recomputed from features.parquet's cls_pred: labelled clips whose prediction matches."""
    out = {}
    for head in ("instrument", "mode"):
        hits = [json.loads(r["cls_pred"])[head] == labels[r["id"]][head] for r in rows
                if labels.get(r["id"], {}).get(head) is not None]
        if hits:
            out[head] = float(np.mean(hits))
    return out


@pytest.mark.slow
def test_job_classifier_metrics_and_attribute_accuracy(local_run: tuple[str, subprocess.CompletedProcess],
                                                       weights: dict[str, str]) -> None:
    """--classifier: FD_cls/KID_cls/IS_cls/KL_cls from its features; accuracy per head that is a label column."""
    out, proc = local_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = read_json(f"{out}/metrics.json")
    m = result["metrics"]
    cls_keys = [k for k, n in M.NETWORK_OF.items() if n == "classifier"]
    assert sorted(cls_keys) == sorted([
        "frechet_distance_cls", "kernel_inception_distance_cls_mean", "kernel_inception_distance_cls_std",
        "inception_score_cls_mean", "inception_score_cls_std", "kullback_leibler_divergence_cls_softmax",
        "kullback_leibler_divergence_cls_sigmoid"])
    assert all(m[k] is not None and np.isfinite(m[k]) for k in cls_keys)
    assert result["networks"]["classifier"]["uri"] == weights["classifier"]
    assert result["networks"]["classifier"]["heads"] == CLASSES
    table = pq.read_table(f"{out}/features.parquet")
    assert {"cls_embedding", "cls_logits", "cls_pred"} <= set(table.column_names)
    rows = [r for r in table.to_pylist() if r["error"] is None]
    gen = [r for r in rows if r["set"] == "generated"]
    ref = [r for r in rows if r["set"] == "reference"]
    assert all(len(r["cls_embedding"]) == 16 and len(r["cls_logits"]) == 3 for r in gen + ref)  # instrument head
    # The numbers are the metric functions on the features the actors wrote.
    g_emb, r_emb = (np.asarray([r["cls_embedding"] for r in x], np.float32) for x in (gen, ref))
    assert m["frechet_distance_cls"] == pytest.approx(M.frechet_distance(g_emb, r_emb), rel=1e-6)
    assert m["inception_score_cls_mean"] == pytest.approx(
        M.inception_score(np.asarray([r["cls_logits"] for r in gen], np.float32))[0], rel=1e-9)
    assert any("KL_cls over the 4 of 6 generated clips" in n for n in result["notes"])
    # Accuracy: instrument and mode are label columns of the metric rows (c5 has no instrument); tempo is not.
    labels = {f"c{i}": {"instrument": INSTRUMENTS[i], "mode": MODES[i]} for i in range(6)}
    assert result["attribute_accuracy"] == pytest.approx(expected_accuracy(gen, labels))
    assert set(result["attribute_accuracy"]) == {"instrument", "mode"}
    assert result["attribute_accuracy_mean"] == pytest.approx(np.mean(list(result["attribute_accuracy"].values())))
    assert any("tempo" in n and "no label column" in n for n in result["notes"])
    ref_labels = {i: {"instrument": v} for i, v in zip(["c0", "c1", "c2", "c3", "extra-0"],
                                                        ["piano", "organ", "piano", "guitar", "guitar"], strict=True)}
    assert result["reference_attribute_accuracy"] == pytest.approx(expected_accuracy(ref, ref_labels))
    assert set(result["reference_attribute_accuracy"]) == {"instrument"}
    row = report.parse_table(Path(f"{out}/table.md").read_text())[0]
    assert row["FD_cls ↓"] == f"{m['frechet_distance_cls']:.2f}" and row["IS_cls ↑"] != "n/a"
    assert row["Acc (%) ↑"] == f"{100 * result['attribute_accuracy_mean']:.1f}"
    assert "attribute accuracy: instrument" in proc.stdout


@pytest.fixture(scope="module")
def s3() -> Iterator[SeaweedFS]:
    with SeaweedFS() as server:
        server.make_bucket("eval")
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


@pytest.mark.slow
def test_job_on_s3_self_evaluation_appends_a_row(s3: SeaweedFS, local_run: tuple[str, subprocess.CompletedProcess],
                                                 data: dict[str, str], weights: dict[str, str],
                                                 tmp_path: Path) -> None:
    """Generated = reference on S3: FD_vgg ≈ 0; the S3 table gains a row; CLAP and weights read from S3.

    No Cnn14 here (its metrics show as n/a): its end-to-end numbers are checked by the local run, and
    its 2048-d Fréchet distance costs ~20 CPU-seconds.
    """
    out_local, proc = local_run
    assert proc.returncode == 0
    net = torch.nn.Linear(4, 3)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict()}, buf)
    storage.write_bytes("s3://eval/weights/small.pth", buf.getvalue())
    state, digest = F.load_state_dict("s3://eval/weights/small.pth", digest=True)
    assert torch.equal(state["weight"], net.weight) and len(digest) == 16
    with pytest.raises(F.WeightsError, match="no such object"):
        F.load_state_dict("s3://eval/weights/absent.pth")
    storage.upload_dir(data["gen"], "s3://eval/gen/run4")
    storage.upload_dir(DEFAULT_MODEL, "s3://eval/models/default")
    storage.upload_dir(weights["classifier"], "s3://eval/models/classifier")
    with pytest.raises(F.WeightsError, match="not a label classifier"):
        F.check_classifier("s3://eval/models/default")  # a prefix without the classifier's files
    storage.write_file("s3://eval/train.parquet", f"{out_local}/train_clap_embeddings.parquet")
    storage.write_file("s3://eval/table.md", f"{out_local}/table.md")
    proc = cli("--generated", "s3://eval/gen/run4", "--reference", "s3://eval/gen/run4",
               "--train-reference", "s3://eval/train.parquet", "--out", "s3://eval/out/self",
               "--table", "s3://eval/table.md", "--label", "self", "--vggish-ckpt", weights["vggish"],
               "--clap-model", "s3://eval/models/default", "--classifier", "s3://eval/models/classifier",
               env=s3.env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result, first = read_json("s3://eval/out/self/metrics.json"), read_json(f"{out_local}/metrics.json")
    m, m1 = result["metrics"], first["metrics"]
    assert result["counts"]["generated"] == result["counts"]["reference"] == 6
    assert abs(m["frechet_audio_distance"]) < 1e-3 * m1["frechet_audio_distance"]
    assert m["frechet_distance"] is None and "--pann-ckpt" in result["unavailable"]["frechet_distance"][
        "how_to_provide"]
    # The classifier from S3: a set against itself; the reference (a batch output) carries the same labels.
    assert abs(m["frechet_distance_cls"]) < 1e-3 * max(m1["frechet_distance_cls"], 1e-3)
    assert abs(m["kullback_leibler_divergence_cls_softmax"]) < 1e-4
    assert result["networks"]["classifier"]["sha256_16"] == first["networks"]["classifier"]["sha256_16"]
    assert result["attribute_accuracy"] == pytest.approx(first["attribute_accuracy"])
    assert result["reference_attribute_accuracy"] == pytest.approx(result["attribute_accuracy"])
    # The reference is a batch output: its metric shards caption it with the same prompts.
    assert m["clap_text_audio_reference_mean"] == pytest.approx(m["clap_text_audio_mean"], abs=1e-6)
    assert m["clap_text_audio_mean"] == pytest.approx(m1["clap_text_audio_mean"], abs=1e-6)  # same CLAP weights
    assert m["sim_aa@0.95"] == m1["sim_aa@0.95"]  # precomputed training embeddings == embedding the audio
    assert result["networks"]["clap"]["layout"] == "musicldm" and not result["networks"]["clap"]["own_model"]
    assert result["inputs"]["train"]["clap_model"] == DEFAULT_MODEL  # the same weights, named another way:
    assert any("SIM_AA is only meaningful" in n for n in result["notes"])  # said, not guessed
    assert {u["id"] for u in result["unreadable"]} == {"c9"}
    assert storage.exists("s3://eval/out/self/features.parquet")
    rows = report.parse_table(storage.read_bytes("s3://eval/table.md").decode())
    assert [r["Run"] for r in rows] == ["tiny-student-4step", "self"]
    assert rows[1]["FD_pann ↓"] == "n/a" and rows[1]["FD_vgg ↓"] != "n/a"


def test_missing_weights_are_reported_and_the_rest_still_runs(
        weights: dict[str, str], data: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No Cnn14/VGGish weights anywhere: their metrics are unavailable, with how to provide them; CLAP still runs.

    The reference here is a Parquet (id, audio_uri relative or absolute, caption).
    """
    monkeypatch.chdir(tmp_path)  # no ./ckpt/ here
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    storage.write_file(str(tmp_path / "ref" / "clips" / "a.flac"), f"{data['ref']}/c0.flac")
    pq.write_table(pa.table({"id": ["c0", "c1", "bad"], "audio_uri": ["clips/a.flac", f"{data['ref']}/c1.flac",
                                                                     f"{data['ref']}/broken.wav"],
                             "caption": ["calm piano", "fast drums", "noise"]}), tmp_path / "ref" / "index.parquet")
    config = E.EvalConfig(generated=data["gen"], reference=str(tmp_path / "ref" / "index.parquet"),
                          out=str(tmp_path / "out"), clap_model=weights["clap"], label="no-weights")
    result = E.run(config, use_ray=False)
    m, why = result["metrics"], result["unavailable"]
    for key in ("frechet_distance", "inception_score_mean", "kullback_leibler_divergence_softmax",
                "kernel_inception_distance_mean"):
        assert m[key] is None
        assert "--pann-ckpt" in why[key]["how_to_provide"] and F.PANN_FILE in why[key]["how_to_provide"]
        assert str(tmp_path / "ckpt" / F.PANN_FILE) in why[key]["reason"]
    assert m["frechet_audio_distance"] is None and "--vggish-ckpt" in why["frechet_audio_distance"]["how_to_provide"]
    assert "--train-reference" in why["sim_aa@0.90"]["how_to_provide"]
    assert m["clap_text_audio_mean"] is not None and m["clap_text_audio_reference_mean"] is not None  # CLAP ran
    assert result["counts"]["reference"] == 2 and result["status"] == "ok"
    assert result["table_row"]["FD_pann ↓"] == "n/a" and result["table_row"]["IS ↑"] == "n/a"
    assert "n/a" in (tmp_path / "out" / "table.md").read_text()
    assert {u["id"] for u in result["unreadable"]} == {"c9", "bad"}


def test_classifier_alone_with_a_labelled_reference_parquet(
        weights: dict[str, str], data: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only --classifier (in-process): its metrics and accuracies; null labels are skipped; the rest unavailable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    uris = [f"{data['ref']}/c{i}.flac" for i in range(4)]
    pq.write_table(pa.table({"id": ["c0", "c1", "c2", "c3"], "audio_uri": uris,
                             "mode": ["major", None, "minor", "major"]}), tmp_path / "ref.parquet")
    config = E.EvalConfig(generated=data["gen"], reference=str(tmp_path / "ref.parquet"), out=str(tmp_path / "out"),
                          no_clap=True, classifier=weights["classifier"], label="cls-only")
    result = E.run(config, use_ray=False)
    m, rows = result["metrics"], pq.read_table(tmp_path / "out" / "features.parquet").to_pylist()
    assert all(m[k] is not None for k, n in M.NETWORK_OF.items() if n == "classifier")
    assert m["frechet_distance"] is None and m["frechet_audio_distance"] is None
    preds = {(r["set"], r["id"]): json.loads(r["cls_pred"]) for r in rows if r["cls_pred"] is not None}
    assert set(preds[("generated", "c0")]) == set(CLASSES)  # every head predicts a class name
    ref_hits = [preds[("reference", i)]["mode"] == v for i, v in (("c0", "major"), ("c2", "minor"), ("c3", "major"))]
    assert result["reference_attribute_accuracy"] == {"mode": pytest.approx(np.mean(ref_hits))}  # c1: null label
    gen_hits = [preds[("generated", f"c{i}")]["instrument"] == INSTRUMENTS[i] for i in range(5)]  # c5: no label
    assert result["attribute_accuracy"]["instrument"] == pytest.approx(np.mean(gen_hits))
    assert result["table_row"]["Acc (%) ↑"] == f"{100 * result['attribute_accuracy_mean']:.1f}"


def test_weights_are_found_at_the_libraries_default_locations(
        weights: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No flags: Cnn14 from audioldm_eval's ./ckpt/, VGGish from torch.hub's cache, CLAP from the run's model."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / F.PANN_FILE).symlink_to(weights["pann"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", weights["torch_home"])
    config = E.EvalConfig(generated="unused", reference="unused", out="unused")
    inputs = E.Inputs(generation=[{"id": "a", "model_uri": DEFAULT_MODEL}])
    networks, info, missing = E.resolve_networks(config, inputs)
    assert networks == F.Networks(pann=str(tmp_path / "ckpt" / F.PANN_FILE), vggish=weights["vggish"],
                                  clap=DEFAULT_MODEL)
    assert missing == {"classifier": M.NO_CLASSIFIER}  # optional, no default location: only --classifier
    assert info["pann"]["default_location"] and info["vggish"]["default_location"]
    assert info["clap"]["own_model"] and len(info["vggish"]["sha256_16"]) == 16


def load_script():
    """`ray_jobs/evaluate.py` as a module (its own parser and main)."""
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unusable_inputs_exit_2(weights: dict[str, str], data: dict[str, str], tmp_path: Path,
                                capsys: pytest.CaptureFixture) -> None:
    main, out = load_script().main, str(tmp_path / "out")
    base = ["--generated", data["gen"], "--reference", data["ref"], "--out", out]
    assert main([*base, "--pann-ckpt", str(tmp_path / "nope.pth")]) == 2
    assert "--pann-ckpt" in (err := capsys.readouterr().err) and "no such file" in err
    assert main(["--generated", str(tmp_path / "empty"), *base[2:]]) == 2
    assert "no metric shards" in capsys.readouterr().err
    pq.write_table(pa.table({"id": ["a"], "caption": ["x"]}), tmp_path / "ref.parquet")
    assert main([*base[:2], "--reference", str(tmp_path / "ref.parquet"), *base[4:]]) == 2
    assert "audio_uri" in capsys.readouterr().err
    assert main([*base, "--vggish-ckpt", weights["pann"]]) == 2
    assert "VGGish weights do not fit the network (missing: embeddings.0.bias" in capsys.readouterr().err
    assert main([*base, "--num-actors", "0"]) == 2
    assert "num_actors" in capsys.readouterr().err
    assert main([*base, "--label", "a|b"]) == 2
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_bad_classifier_exits_2_before_any_actor(data: dict[str, str], weights: dict[str, str], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def no_actors(*args, **kwargs):
        raise AssertionError("feature extraction started despite an unusable --classifier")

    monkeypatch.setattr(E, "extract", no_actors)
    main, out = load_script().main, str(tmp_path / "out")
    base = ["--generated", data["gen"], "--reference", data["ref"], "--out", out, "--no-clap"]
    assert main([*base, "--classifier", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert f"--classifier {tmp_path / 'absent'}: not a label classifier (needs config.json + model.safetensors" in err
    storage.write_file(str(tmp_path / "bad" / "model.safetensors"), f"{weights['classifier']}/model.safetensors")
    (tmp_path / "bad" / "config.json").write_text('{"classes": {"instrument": ["a", "b"]}, "width": 16}')
    assert main([*base, "--classifier", str(tmp_path / "bad")]) == 2  # weights of another shape
    assert "not a usable label classifier (" in capsys.readouterr().err
    (tmp_path / "bad" / "config.json").write_text("not json")
    assert main([*base, "--classifier", str(tmp_path / "bad")]) == 2
    assert "not a usable label classifier" in capsys.readouterr().err
    assert main([*base, "--classifier", " "]) == 2
    assert "classifier=' ' is invalid" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_documents_every_flag() -> None:
    parser = load_script().parser()
    text = parser.format_help()
    for flag in ("--generated", "--reference", "--train-reference", "--out", "--pann-ckpt", "--vggish-ckpt",
                 "--clap-model", "--classifier", "--num-actors", "--table", "--label"):
        assert flag in text
    assert all(action.help for action in parser._actions)
    assert "musiccm.evaluation.classifier.save" in text and "FD_cls/KID_cls" in text
