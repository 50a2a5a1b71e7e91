"""Metric math against references: closed forms, direct NumPy implementations and limiting cases.

The functions under test call audioldm_eval 0.0.3's own metric code; these tests pin what it computes
(FD of a set with itself is 0 and grows with a shift exactly as the Gaussian formula says, IS of
uniform logits is 1, KL of identical pairs is 0 up to its 1e-6 log epsilon, KID matches an unbiased
polynomial MMD², SIM_AA of a set against itself is 1), plus the availability logic of `corpus_metrics`
(the label classifier's FD_cls/KID_cls/IS_cls/KL_cls included) and the table's classifier columns.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from musiccm.evaluation import metrics as M
from musiccm.evaluation import report


@pytest.fixture(scope="module")
def gauss() -> np.ndarray:
    """200 samples of a correlated 8-d Gaussian."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 8))
    return (rng.standard_normal((200, 8)) @ a).astype(np.float32) + 3.0


def gaussian_fd(x: np.ndarray, y: np.ndarray) -> float:
    """Reference: Fréchet distance of the two samples' Gaussian fits, via symmetric square roots."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    r1 = scipy.linalg.sqrtm(s1).real
    cross = scipy.linalg.sqrtm(r1 @ s2 @ r1).real  # Tr((S1 S2)^½) = Tr((S1^½ S2 S1^½)^½)
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * cross))


# ---------------------------------------------------------------- Fréchet distances


@pytest.mark.parametrize("fd", [M.frechet_distance, M.frechet_audio_distance])
def test_frechet_of_a_set_with_itself_is_zero_and_grows_with_a_shift(fd, gauss: np.ndarray) -> None:
    assert abs(fd(gauss, gauss)) < 1e-6
    shifts = [fd(gauss, gauss + s) for s in (0.5, 1.0, 2.0)]
    # A shifted copy has the same covariance: FD = ||shift||² = D·s² exactly.
    np.testing.assert_allclose(shifts, [8 * 0.25, 8 * 1.0, 8 * 4.0], rtol=1e-4)


@pytest.mark.parametrize("fd", [M.frechet_distance, M.frechet_audio_distance])
def test_frechet_matches_the_gaussian_formula(fd, gauss: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    other = (gauss * 1.7 + rng.standard_normal(gauss.shape).astype(np.float32) * 0.3) - 1.0
    expected = gaussian_fd(gauss, other)
    assert expected > 1.0
    assert fd(gauss, other) == pytest.approx(expected, rel=1e-4)


def test_frechet_with_fewer_clips_than_dimensions_matches_the_low_rank_form() -> None:
    """N < D (the paper: 1000 clips, 2048 dims): rank-deficient covariances, Tr((Σx Σy)^½) = ‖Xc Ycᵀ‖_*/√(…)."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((12, 64)).astype(np.float32)
    y = (rng.standard_normal((9, 64)) * 1.5 + 0.3).astype(np.float32)
    xc, yc = x - x.mean(0), y - y.mean(0)
    nuclear = np.linalg.svd(xc.astype(np.float64) @ yc.T, compute_uv=False).sum() / np.sqrt(11 * 8)
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum() + (xc**2).sum() / 11 + (yc**2).sum() / 8 - 2 * nuclear
    assert M.frechet_distance(x, y) == pytest.approx(expected, rel=1e-4)


def test_frechet_rejects_what_it_cannot_compute(gauss: np.ndarray) -> None:
    with pytest.raises(M.MetricError, match="at least 2"):
        M.frechet_distance(gauss[:1], gauss)
    with pytest.raises(M.MetricError, match="feature sizes differ"):
        M.frechet_distance(gauss, gauss[:, :4])
    with pytest.raises(M.MetricError, match="NaN"):
        M.frechet_distance(np.full_like(gauss, np.nan), gauss)
    assert issubclass(M.MetricError, ValueError)


# ---------------------------------------------------------------- Inception Score


def test_inception_score_of_uniform_logits_is_one() -> None:
    mean, std = M.inception_score(np.zeros((40, 527), np.float32))
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_balanced_classes_is_the_class_count() -> None:
    """p(y|x) one-hot, p(y) uniform over K classes: IS = exp(H(p(y))) = K (one split)."""
    k, per = 4, 10
    logits = np.full((k * per, 527), -50.0, np.float32)
    logits[np.arange(k * per), np.repeat(np.arange(k), per)] = 50.0
    mean, _ = M.inception_score(logits, splits=1)
    assert mean == pytest.approx(k, rel=1e-6)


def test_inception_score_caps_splits_at_the_clip_count() -> None:
    mean, std = M.inception_score(np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32), splits=10)
    assert np.isfinite(mean) and np.isfinite(std) and mean >= 1.0


# ---------------------------------------------------------------- KL


def test_kl_of_identical_pairs_is_zero_up_to_the_log_epsilon() -> None:
    logits = np.random.default_rng(2).standard_normal((6, 527)).astype(np.float32) * 3
    kl = M.kl_divergence(logits, logits)
    # audioldm_eval takes log(p_gen + 1e-6): identical pairs give Σ p·log(p / (p + ε)) ∈ [−classes·ε, 0].
    for form in ("softmax", "sigmoid"):
        assert -527e-6 * 1.02 <= kl[form] <= 0


def test_kl_matches_the_definition_and_its_direction() -> None:
    gen = np.log(np.array([[0.5, 0.5], [0.2, 0.8]], np.float32))
    ref = np.log(np.array([[0.9, 0.1], [0.2, 0.8]], np.float32))
    kl = M.kl_divergence(gen, ref)
    p, q = np.array([0.9, 0.1]), np.array([0.5, 0.5])  # KL(ref || gen), averaged over the 2 pairs
    assert kl["softmax"] == pytest.approx((p * np.log(p / q)).sum() / 2, abs=1e-5)
    sig = 1 / (1 + np.exp(-np.concatenate([gen, ref])))
    sg, sr = sig[:2], sig[2:]
    assert kl["sigmoid"] == pytest.approx((sr * np.log(sr / sg)).sum() / 2, abs=1e-5)
    assert M.kl_divergence(ref, gen)["softmax"] != pytest.approx(kl["softmax"], abs=1e-3)  # not symmetric


def test_pair_by_id_aligns_rows_whatever_their_order() -> None:
    rng = np.random.default_rng(3)
    gen_ids, ref_ids = ["a", "b", "c", "x"], ["c", "a", "b", "z"]
    gen = rng.standard_normal((4, 7)).astype(np.float32)
    ref = gen[[2, 0, 1, 3]] + 0.0  # the same clips, shuffled; "x"/"z" unmatched
    gi, ri = M.pair_by_id(gen_ids, ref_ids)
    assert [gen_ids[i] for i in gi] == [ref_ids[j] for j in ri] == ["a", "b", "c"]
    # identical pairs: zero up to the log epsilon, Σ p·log(p / (p + ε)) ∈ [−classes·ε, 0] (float32 rounding: 2 %)
    assert -7e-6 * 1.02 <= M.kl_divergence(gen[gi], ref[ri])["softmax"] <= 0
    assert M.pair_by_id(["a"], ["b"])[0].size == 0


# ---------------------------------------------------------------- KID


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Reference unbiased MMD² with k(a, b) = (a·b / D + 1)³."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    k = lambda a, b: (a @ b.T / x.shape[1] + 1) ** 3
    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def test_kid_matches_an_unbiased_polynomial_mmd(gauss: np.ndarray) -> None:
    other = gauss[::-1] * 1.3 + 0.5
    mean, std = M.kernel_inception_distance(gauss[:50], other[:50], subsets=3, subset_size=50)
    # subset_size = N: every subset is the whole set in another order, and MMD² is order-free.
    assert mean == pytest.approx(polynomial_mmd2(gauss[:50], other[:50]), rel=1e-4)
    assert std == pytest.approx(0.0, abs=1e-6 * abs(mean))


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((300, 16)).astype(np.float32), rng.standard_normal((300, 16)).astype(np.float32)
    same, _ = M.kernel_inception_distance(a, b, subsets=20, subset_size=100)
    shifted, _ = M.kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=100)
    assert abs(same) < 0.05 * shifted
    assert shifted > 0


# ---------------------------------------------------------------- CLAP similarities


def test_sim_aa_of_a_set_against_itself_is_one() -> None:
    emb = np.random.default_rng(5).standard_normal((12, 512)).astype(np.float32)
    best = M.max_similarity(emb, emb)
    np.testing.assert_allclose(best, 1.0, atol=1e-6)
    assert M.sim_aa(best) == {"0.90": 1.0, "0.95": 1.0}


def test_sim_aa_counts_clips_above_each_threshold() -> None:
    train = np.eye(4, 8, dtype=np.float32)
    angles = np.array([0.0, 0.3, 0.5, 1.2])  # cos: 1.0, 0.955, 0.878, 0.362
    gen = np.zeros((4, 8), np.float32)
    gen[:, 0], gen[:, 5] = np.cos(angles), np.sin(angles)  # axis 5 is orthogonal to every training vector
    best = M.max_similarity(gen, train, chunk=3)
    np.testing.assert_allclose(best, np.cos(angles), atol=1e-6)
    assert M.sim_aa(best, (0.90, 0.95)) == {"0.90": 0.5, "0.95": 0.5}
    assert M.sim_aa(best, (0.85,)) == {"0.85": 0.75}


def test_cosine_pairs_is_scale_free_and_checks_shapes() -> None:
    a = np.random.default_rng(6).standard_normal((5, 32)).astype(np.float32)
    np.testing.assert_allclose(M.cosine_pairs(a, 3 * a), 1.0, atol=1e-6)
    np.testing.assert_allclose(M.cosine_pairs(a, -a), -1.0, atol=1e-6)
    with pytest.raises(M.MetricError):
        M.cosine_pairs(a, a[:4])
    with pytest.raises(M.MetricError, match="all zeros"):
        M.cosine_pairs(np.zeros_like(a), a)


# ---------------------------------------------------------------- availability logic


def features(ids: list[str], rng: np.random.Generator, shift: float = 0.0, text: bool = True) -> M.Features:
    n = len(ids)
    f = M.Features()
    for kind, dim in (("pann_embedding", 16), ("pann_logits", 10), ("clap_audio", 8), ("cls_embedding", 6),
                      ("cls_logits", 4)):
        f.ids[kind], f.arrays[kind] = list(ids), rng.standard_normal((n, dim)).astype(np.float32) + shift
    if text:
        f.ids["clap_text"], f.arrays["clap_text"] = list(ids), rng.standard_normal((n, 8)).astype(np.float32)
    f.arrays["vggish"], f.vggish_clips = rng.standard_normal((3 * n, 12)).astype(np.float32) + shift, n
    return f


def test_corpus_metrics_computes_everything_it_has_features_for() -> None:
    rng = np.random.default_rng(7)
    gen = features([f"c{i}" for i in range(20)], rng)
    ref = features([f"c{i}" for i in range(20)], rng, shift=0.5, text=False)
    values, unavailable, notes = M.corpus_metrics(gen, ref, gen.arrays["clap_audio"][:5], kid_subset_size=20,
                                                  is_splits=2)
    assert set(unavailable) == {"clap_text_audio_reference_mean", "clap_text_audio_reference_std"}
    assert "no captions" in unavailable["clap_text_audio_reference_mean"]["reason"]
    assert values["frechet_distance"] == pytest.approx(
        M.frechet_distance(gen.arrays["pann_embedding"], ref.arrays["pann_embedding"]))
    assert values["frechet_audio_distance"] == pytest.approx(
        M.frechet_audio_distance(gen.arrays["vggish"], ref.arrays["vggish"]))
    assert values["kullback_leibler_divergence_softmax"] == pytest.approx(
        M.kl_divergence(gen.arrays["pann_logits"], ref.arrays["pann_logits"])["softmax"])
    assert values["sim_aa@0.95"] == pytest.approx(5 / 20)  # the 5 training vectors are copies of 5 clips
    assert values["inception_score_mean"] >= 1.0
    assert -1 <= values["clap_text_audio_mean"] <= 1
    assert notes == []  # 10 clips per IS split, every id paired
    assert any("IS over 6 split(s) of ~1 clip(s)" in n
               for n in M.corpus_metrics(features(list("abcdef"), rng), ref, None)[2])


def test_missing_networks_make_only_their_metrics_unavailable() -> None:
    rng = np.random.default_rng(8)
    gen, ref = features(["a", "b", "c"], rng), features(["a", "b", "c"], rng, shift=1.0)
    for kind in ("pann_embedding", "pann_logits"):
        del gen.arrays[kind], ref.arrays[kind]
    missing = {"pann": {"reason": "no weights", "how_to_provide": "--pann-ckpt PATH"},
               "train": {"reason": "no training set given", "how_to_provide": "--train-reference"}}
    values, unavailable, _ = M.corpus_metrics(gen, ref, None, missing=missing)
    pann_keys = {k for k, n in M.NETWORK_OF.items() if n == "pann"}
    assert pann_keys <= set(unavailable)
    assert all(unavailable[k] == missing["pann"] and values[k] is None for k in pann_keys)
    assert unavailable["sim_aa@0.90"]["how_to_provide"] == "--train-reference"
    assert values["frechet_audio_distance"] is not None and values["clap_text_audio_mean"] is not None


def test_kl_needs_matching_ids_and_notes_partial_pairing() -> None:
    rng = np.random.default_rng(9)
    gen = features(["a", "b", "c", "d"], rng)
    _, unavailable, _ = M.corpus_metrics(gen, features(["w", "x", "y", "z"], rng), None)
    assert "none of the 4 generated ids matches a reference id" in (
        unavailable["kullback_leibler_divergence_softmax"]["reason"])
    values, unavailable, notes = M.corpus_metrics(gen, features(["b", "d", "y", "z"], rng), None)
    assert "kullback_leibler_divergence_softmax" not in unavailable
    assert values["kullback_leibler_divergence_softmax"] is not None
    assert any("2 of 4 generated clips" in n for n in notes)


def classifier_features(emb: np.ndarray, logits: np.ndarray) -> M.Features:
    """Only label-classifier features (no Cnn14/VGGish/CLAP), one id per row."""
    f, ids = M.Features(), [f"c{i}" for i in range(len(emb))]
    f.ids["cls_embedding"], f.arrays["cls_embedding"] = ids, emb
    f.ids["cls_logits"], f.arrays["cls_logits"] = list(ids), logits
    return f


def test_classifier_metrics_of_a_set_with_itself(gauss: np.ndarray) -> None:
    """FD_cls of a set with itself ≈ 0; IS_cls of uniform logits is 1; KL_cls of identical pairs ≈ 0."""
    same = classifier_features(gauss, np.zeros((len(gauss), 5), np.float32))
    missing = {n: {"reason": "not given"} for n in ("pann", "vggish", "clap")}
    values, unavailable, _ = M.corpus_metrics(same, same, None, missing=missing, kid_subset_size=50)
    assert abs(values["frechet_distance_cls"]) < 1e-6
    assert values["kernel_inception_distance_cls_mean"] == pytest.approx(
        M.kernel_inception_distance(gauss, gauss, subset_size=50)[0])  # the same function on the same features
    assert values["inception_score_cls_mean"] == pytest.approx(1.0, abs=1e-12)
    assert values["inception_score_cls_std"] == pytest.approx(0.0, abs=1e-12)
    assert -5e-6 * 1.02 <= values["kullback_leibler_divergence_cls_softmax"] <= 0  # log(p + 1e-6), 5 classes
    assert not any(k in unavailable for k, n in M.NETWORK_OF.items() if n == "classifier")
    shifted = classifier_features(gauss + 1.0, np.zeros((len(gauss), 5), np.float32))
    values, _, _ = M.corpus_metrics(shifted, same, None, missing=missing, kid_subset_size=50)
    assert values["frechet_distance_cls"] == pytest.approx(8.0, rel=1e-4)  # ||shift||² = D·1², same covariance


def test_classifier_metrics_are_unavailable_without_a_classifier() -> None:
    rng = np.random.default_rng(11)
    gen, ref = features(["a", "b", "c"], rng), features(["a", "b", "c"], rng, shift=1.0)
    for f in (gen, ref):
        del f.arrays["cls_embedding"], f.arrays["cls_logits"]
    values, unavailable, _ = M.corpus_metrics(gen, ref, None)
    cls_keys = {k for k, n in M.NETWORK_OF.items() if n == "classifier"}
    assert len(cls_keys) == 7 and cls_keys <= set(unavailable)
    for key in cls_keys:
        assert values[key] is None and unavailable[key] == M.NO_CLASSIFIER
    assert unavailable["frechet_distance_cls"]["reason"] == "no --classifier given"
    assert "--classifier DIR" in unavailable["frechet_distance_cls"]["how_to_provide"]
    assert values["frechet_distance"] is not None  # the other networks are unaffected


# ---------------------------------------------------------------- the table


def test_table_rows_are_replaced_by_label_and_appended_otherwise(tmp_path) -> None:
    def result(label: str, fd: float | None) -> dict:
        r = {"label": label, "model": {"name": "m"}, "steps": [1, 4], "latency": {"seconds_per_clip_mean": 0.25},
             "counts": {"generated": 3}, "metrics": {"frechet_distance": fd, "inception_score_mean": 1.5}}
        return report.table_row(r)

    table = str(tmp_path / "t.md")
    report.upsert_row(table, result("run-a", 1.0))
    report.upsert_row(table, result("run-b", None))
    text = report.upsert_row(table, result("run-a", 2.0))
    rows = report.parse_table(text)
    assert [r["Run"] for r in rows] == ["run-b", "run-a"]
    assert rows[1]["FD_pann ↓"] == "2.00" and rows[0]["FD_pann ↓"] == "n/a" and rows[0]["Steps"] == "1,4"
    assert rows[1]["Latency (s/clip) ↓"] == "0.250"
    (tmp_path / "other.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    with pytest.raises(ValueError, match="columns"):
        report.upsert_row(str(tmp_path / "other.md"), result("x", 1.0))


def test_table_widens_with_classifier_columns_and_keeps_older_rows(tmp_path) -> None:
    """A classifier run adds FD_cls/IS_cls/KL_cls/Acc before latency; rows without them show n/a, either order."""
    def result(label: str, cls: bool) -> dict:
        m = {"frechet_distance": 1.0, "inception_score_mean": 1.5}
        if cls:
            m |= {"frechet_distance_cls": 3.25, "inception_score_cls_mean": 2.0,
                  "kullback_leibler_divergence_cls_softmax": None}
        return report.table_row({"label": label, "model": {"name": "m"}, "steps": 4, "latency": {},
                                 "counts": {"generated": 3}, "metrics": m,
                                 "attribute_accuracy_mean": 0.625 if cls else None})

    table = str(tmp_path / "t.md")
    report.upsert_row(table, result("old", cls=False))
    text = report.upsert_row(table, result("cls", cls=True))
    header = next(line for line in text.splitlines() if line.startswith("| Model"))
    assert header.index("KL ↓") < header.index("FD_cls ↓") < header.index("Acc (%) ↑") < header.index("Latency")
    text = report.upsert_row(table, result("new-plain", cls=False))
    rows = {r["Run"]: r for r in report.parse_table(text)}
    assert rows["cls"]["FD_cls ↓"] == "3.25" and rows["cls"]["KL_cls ↓"] == "n/a"
    assert rows["cls"]["Acc (%) ↑"] == "62.5"
    assert all(rows[r][c] == "n/a" for r in ("old", "new-plain") for c in report.CLS_COLUMNS)
    assert rows["old"]["FD_pann ↓"] == "1.00" and "FD_cls" in text.split("\n\n")[-1]  # legend explains them
    narrow = str(tmp_path / "narrow.md")
    report.upsert_row(narrow, result("a", cls=False))
    assert "FD_cls" not in (tmp_path / "narrow.md").read_text()
