"""The synthetic captioned-music generator: determinism, captions that say what the labels say, manifest formats."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from musiccm import synthetic
from musiccm.distill.data import check_manifest_schema

INSTRUMENT_WORDS = {name: names for name, _, names in synthetic.INSTRUMENTS}


def test_same_seed_same_clip_other_seed_other_clip():
    p0, c0 = synthetic.clip(3, seed=0)
    assert synthetic.clip(3, seed=0) == (p0, c0)
    a = synthetic.render(p0, 2.56, synthetic.render_seed(3, 0))
    b = synthetic.render(p0, 2.56, synthetic.render_seed(3, 0))
    assert np.array_equal(a, b)
    assert a.shape == (round(2.56 * synthetic.SAMPLE_RATE),) and a.dtype == np.float32
    assert 0.0 < np.abs(a).max() <= 0.9
    other = synthetic.render(p0, 2.56, synthetic.render_seed(4, 0))
    assert not np.array_equal(a, other)  # another clip's note choices
    assert [synthetic.clip(i, 1)[0] for i in range(20)] != [synthetic.clip(i, 0)[0] for i in range(20)]


@pytest.mark.parametrize("index", range(60))
def test_caption_names_every_labelled_attribute(index):
    p, caption = synthetic.clip(index, seed=5)
    text = caption.lower()
    assert any(w in text for w in INSTRUMENT_WORDS[p.instrument]), (p.instrument, caption)
    assert any(w in text for w in synthetic.TEMPO_WORDS[p.tempo]), (p.tempo, caption)
    assert p.mode in text or any(w in text for w in synthetic.MODE_WORDS[p.mode]), (p.mode, caption)
    drum_words = [w.lower().removeprefix("with ").removeprefix("over ") for w in synthetic.DRUM_PHRASES[p.drums]]
    assert any(w in text for w in drum_words), (p.drums, caption)
    for other, names in INSTRUMENT_WORDS.items():  # no other instrument is named
        if other != p.instrument:
            assert not any(n in text for n in names if not any(n in m for m in INSTRUMENT_WORDS[p.instrument]))


def test_labels_cover_every_class():
    params = [synthetic.clip(i, seed=0)[0] for i in range(400)]
    for attribute, classes in synthetic.CLASSES.items():
        assert {getattr(p, attribute) for p in params} == set(classes), attribute


def test_drums_are_audible_in_the_signal():
    """A drum pattern adds broadband energy: the same music with drums has a flatter spectrum."""
    base = synthetic.clip(0, seed=0)[0]
    quiet = synthetic.MusicParams(**{**base.__dict__, "drums": "none", "instrument": "flute"})
    loud = synthetic.MusicParams(**{**base.__dict__, "drums": "rock", "instrument": "flute"})

    def high_band_share(x: np.ndarray) -> float:
        spec = np.abs(np.fft.rfft(x)) ** 2
        return spec[len(spec) // 4 :].sum() / spec.sum()  # energy above 2 kHz

    assert high_band_share(synthetic.render(loud, 2.56, 7)) > 3 * high_band_share(synthetic.render(quiet, 2.56, 7))


def test_write_dataset_is_a_distillation_manifest(tmp_path):
    path = synthetic.write_dataset(tmp_path / "set", count=3, seed=2, seconds=1.0)
    table = pq.read_table(path)
    check_manifest_schema(table.schema)  # uri + caption: what ray_jobs/distill.py reads
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [f"syn-2-{i:06d}" for i in range(3)]
    for i, r in enumerate(rows):
        params, caption = synthetic.clip(i, seed=2)
        assert r["caption"] == caption and r["instrument"] == params.instrument and r["bpm"] == params.bpm
        x, sr = sf.read(r["uri"])
        assert sr == 16000 and len(x) == 16000
    before = open(rows[0]["uri"], "rb").read()
    synthetic.write_dataset(tmp_path / "set", count=3, seed=2, seconds=1.0)  # rerun: files kept as they are
    assert open(rows[0]["uri"], "rb").read() == before


def test_worker_processes_render_the_same_files(tmp_path):
    one = pq.read_table(synthetic.write_dataset(tmp_path / "one", count=70, seed=4, seconds=0.5, workers=1))
    two = pq.read_table(synthetic.write_dataset(tmp_path / "two", count=70, seed=4, seconds=0.5, workers=2))
    assert one.drop(["uri"]).equals(two.drop(["uri"]))
    for a, b in zip(one.column("uri").to_pylist(), two.column("uri").to_pylist(), strict=True):
        assert open(a, "rb").read() == open(b, "rb").read()
    assert not list((tmp_path / "two" / "audio").glob("*.tmp"))
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        synthetic.write_dataset(tmp_path / "three", count=1, workers=0)


def test_write_prompts_is_a_batch_manifest(tmp_path):
    from musiccm.batch.manifest import check_batch

    path = synthetic.write_prompts(tmp_path / "p.parquet", count=4, seed=9, duration_s=60.0)
    table = pq.read_table(path)
    checked = check_batch(table, max_duration=600)
    assert checked.column("reason").null_count == 4  # every row valid
    assert set(synthetic.LABELS) <= set(checked.column_names)  # labels carried through to metric rows
    assert table.column("prompt").to_pylist() == [synthetic.clip(i, 9)[1] for i in range(4)]


def test_flac_bytes_round_trip():
    x = synthetic.render(synthetic.clip(1, 0)[0], 0.5, 1)
    y, sr = sf.read(io.BytesIO(synthetic.flac_bytes(x)), dtype="float32")
    assert sr == 16000 and np.abs(x - y).max() < 1e-4
