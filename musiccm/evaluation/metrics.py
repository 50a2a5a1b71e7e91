"""The MusicCM paper's corpus metrics as pure functions on feature arrays (no I/O, no models, no Ray).

Table 1 of MusicCM (and AudioLDM/MusicLDM before it) is computed with `audioldm_eval` 0.0.3; its metric
functions are pure math on feature dicts, so we call them and only adapt arrays in and numbers out:

    FD_pann  `frechet_distance`            Fréchet distance of Cnn14 2048-d clip embeddings    calculate_fid
    FD_vgg   `frechet_audio_distance`      Fréchet distance of VGGish 128-d *frame* embeddings  FrechetAudioDistance
    IS       `inception_score_mean/_std`   exp E[KL(p(y|x) || p(y))] over Cnn14 logits         calculate_isc
    KL       `kullback_leibler_divergence_softmax/_sigmoid`  KL(ref_i || gen_i) of Cnn14 logits, paired by id
    KID      `kernel_inception_distance_mean/_std`  cubic-kernel MMD² of Cnn14 embeddings      calculate_kid

Ours (no audioldm_eval equivalent): CLAP text–audio cosine similarity, and SIM_AA@τ (MusicLDM §4,
MusicCM Table 2): the fraction of generated clips whose best CLAP audio cosine similarity to any
training clip exceeds τ — a plagiarism indicator. With a label classifier (`--classifier`, see
`musiccm.evaluation.classifier`), the same FD/KID/IS/KL functions run on its embedding and logits:
`frechet_distance_cls`, `kernel_inception_distance_cls_*`, `inception_score_cls_*`,
`kullback_leibler_divergence_cls_*` (FD_cls, KID_cls, IS_cls, KL_cls).

audioldm_eval prints progress lines and scipy ≥ 1.16 warns about `sqrtm(disp=False)`; both are
silenced here (`_quiet`). scipy 1.18 removes `disp`: pin scipy < 1.18 while audioldm_eval 0.0.3 is used.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

IS_SPLITS = 10  # audioldm_eval's defaults (eval.py: calculate_metrics)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
SEED = 2020


class MetricError(ValueError):
    """A metric that cannot be computed from the given features (too few clips, numerically singular...)."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow audioldm_eval's prints/progress bars and scipy's deprecation warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _matrix(x: np.ndarray | torch.Tensor, name: str, min_rows: int = 1) -> torch.Tensor:
    """(N, D) float32 CPU tensor, or a MetricError saying what was wrong."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if t.dim() != 2:
        raise MetricError(f"{name}: expected a (N, D) array, got shape {tuple(t.shape)}")
    if t.shape[0] < min_rows:
        raise MetricError(f"{name}: needs at least {min_rows} clips/frames, got {t.shape[0]}")
    if not torch.isfinite(t).all():
        raise MetricError(f"{name}: features contain NaN or inf")
    return t


def frechet_distance(gen: np.ndarray, ref: np.ndarray) -> float:
    """FD_pann: ||μ_g − μ_r||² + Tr(Σ_g + Σ_r − 2(Σ_g Σ_r)^½) of (N, D) embeddings (audioldm_eval calculate_fid)."""
    from audioldm_eval import calculate_fid

    a, b = _matrix(gen, "generated", 2), _matrix(ref, "reference", 2)
    if a.shape[1] != b.shape[1]:
        raise MetricError(f"feature sizes differ: generated {a.shape[1]}, reference {b.shape[1]}")
    try:
        with _quiet():
            return float(calculate_fid({"f": a}, {"f": b}, feat_layer_name="f")["frechet_distance"])
    except AssertionError as exc:  # audioldm_eval asserts on a large imaginary part of sqrtm
        raise MetricError(f"Fréchet distance is numerically unstable ({exc}); use more clips") from None


def frechet_audio_distance(gen_frames: np.ndarray, ref_frames: np.ndarray) -> float:
    """FD_vgg: Fréchet distance of VGGish frame embeddings pooled over all clips (audioldm_eval FAD)."""
    from audioldm_eval.metrics.fad import FrechetAudioDistance

    a, b = _matrix(gen_frames, "generated", 2), _matrix(ref_frames, "reference", 2)
    # These two methods never touch `self`; calling them on the class avoids FrechetAudioDistance.__init__,
    # which fetches VGGish with torch.hub.
    fad = FrechetAudioDistance
    try:
        with _quiet():
            mu_a, sigma_a = fad.calculate_embd_statistics(None, a.numpy())
            mu_b, sigma_b = fad.calculate_embd_statistics(None, b.numpy())
            return float(fad.calculate_frechet_distance(None, mu_a, sigma_a, mu_b, sigma_b))
    except ValueError as exc:  # "Imaginary component ..."
        raise MetricError(f"Fréchet audio distance is numerically unstable ({exc}); use more clips") from None


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS, seed: int = SEED) -> tuple[float, float]:
    """IS (mean, std over splits) of classifier logits (audioldm_eval calculate_isc; splits ≤ N)."""
    from audioldm_eval import calculate_isc

    t = _matrix(logits, "logits", 1)
    if splits < 1:
        raise MetricError(f"splits={splits}; expected ≥ 1")
    with _quiet():
        out = calculate_isc({"logits": t}, feat_layer_name="logits", rng_seed=seed, samples_shuffle=True,
                            splits=min(splits, t.shape[0]))  # an empty split would give NaN
    return float(out["inception_score_mean"]), float(out["inception_score_std"])


def kl_divergence(gen_logits: np.ndarray, ref_logits: np.ndarray) -> dict[str, float]:
    """Mean KL(ref_i || gen_i) of paired logits, softmax and sigmoid forms (audioldm_eval calculate_kl).

    Row i of both arrays must be the same id (see `pair_by_id`).
    """
    from audioldm_eval import calculate_kl

    a, b = _matrix(gen_logits, "generated logits", 1), _matrix(ref_logits, "reference logits", 1)
    if a.shape != b.shape:
        raise MetricError(f"paired logits differ in shape: generated {tuple(a.shape)}, reference {tuple(b.shape)}")
    keys = [str(i) for i in range(a.shape[0])]  # calculate_kl pairs rows by file name
    with _quiet():
        out, _, _ = calculate_kl({"logits": a, "file_path_": keys}, {"logits": b, "file_path_": keys},
                                 "logits", same_name=True)
    return {"softmax": float(out["kullback_leibler_divergence_softmax"]),
            "sigmoid": float(out["kullback_leibler_divergence_sigmoid"])}


def kernel_inception_distance(
    gen: np.ndarray, ref: np.ndarray, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
    seed: int = SEED,
) -> tuple[float, float]:
    """KID (mean, std of unbiased MMD² over random subsets), polynomial kernel (x·y/D + 1)³ (calculate_kid)."""
    from audioldm_eval import calculate_kid

    a, b = _matrix(gen, "generated", 2), _matrix(ref, "reference", 2)
    if a.shape[1] != b.shape[1]:
        raise MetricError(f"feature sizes differ: generated {a.shape[1]}, reference {b.shape[1]}")
    size = min(subset_size, a.shape[0], b.shape[0])  # audioldm_eval shrinks it the same way, with a print
    with _quiet():
        out = calculate_kid({"f": a}, {"f": b}, subsets=subsets, subset_size=size, degree=3, gamma=None,
                            coef0=1, rng_seed=seed, feat_layer_name="f")
    return float(out["kernel_inception_distance_mean"]), float(out["kernel_inception_distance_std"])


def pair_by_id(gen_ids: Sequence[str], ref_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices (gen_idx, ref_idx) of ids present in both lists, in generated order."""
    where = {rid: j for j, rid in enumerate(ref_ids)}
    pairs = [(i, where[gid]) for i, gid in enumerate(gen_ids) if gid in where]
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    gi, ri = zip(*pairs, strict=True)
    return np.asarray(gi, dtype=np.int64), np.asarray(ri, dtype=np.int64)


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    t = _matrix(x, name, 1).double().numpy()
    norms = np.linalg.norm(t, axis=1, keepdims=True)
    if (norms == 0).any():
        raise MetricError(f"{name}: an embedding is all zeros")
    return t / norms


def cosine_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays, e.g. CLAP text vs CLAP audio of the same clip."""
    ua, ub = _unit_rows(a, "a"), _unit_rows(b, "b")
    if ua.shape != ub.shape:
        raise MetricError(f"shapes differ: {ua.shape} vs {ub.shape}")
    return (ua * ub).sum(axis=1)


def max_similarity(gen: np.ndarray, train: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """For each generated embedding, its best cosine similarity to any training embedding, (N,)."""
    ug, ut = _unit_rows(gen, "generated"), _unit_rows(train, "training")
    if ug.shape[1] != ut.shape[1]:
        raise MetricError(f"embedding sizes differ: generated {ug.shape[1]}, training {ut.shape[1]}")
    best = np.full(ug.shape[0], -np.inf)
    for start in range(0, ut.shape[0], chunk):  # (N, chunk) at a time: training sets can be large
        best = np.maximum(best, (ug @ ut[start:start + chunk].T).max(axis=1))
    return best


def sim_aa(best: np.ndarray, thresholds: Sequence[float] = (0.90, 0.95)) -> dict[str, float]:
    """SIM_AA@τ: fraction of generated clips whose best training similarity is above τ (MusicLDM §4)."""
    b = np.asarray(best, dtype=np.float64)
    if b.ndim != 1 or b.size == 0:
        raise MetricError(f"expected a non-empty (N,) array of similarities, got shape {b.shape}")
    return {f"{t:.2f}": float(np.mean(b > t)) for t in thresholds}


# ---------------------------------------------------------------- all metrics of one evaluation


@dataclass
class Features:
    """One set's features (clips that could be read): per kind, the ids that have it and their rows.

    Kinds: `pann_embedding` (N, 2048), `pann_logits` (N, 527), `clap_audio` (N, 512), `clap_text` (N, 512),
    `cls_embedding` (N, D) and `cls_logits` (N, K) of the label classifier;
    `vggish` holds every clip's 0.96 s frames stacked, (ΣF, 128), with `vggish_clips` clips behind them.
    """

    ids: dict[str, list[str]] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    vggish_clips: int = 0

    def get(self, kind: str) -> tuple[list[str], np.ndarray] | None:
        return (self.ids.get(kind, []), self.arrays[kind]) if kind in self.arrays else None


# Metric keys (audioldm_eval's names where it has the metric) → the feature network they need.
NETWORK_OF = {
    "frechet_distance": "pann", "frechet_audio_distance": "vggish",
    "inception_score_mean": "pann", "inception_score_std": "pann",
    "kullback_leibler_divergence_softmax": "pann", "kullback_leibler_divergence_sigmoid": "pann",
    "kernel_inception_distance_mean": "pann", "kernel_inception_distance_std": "pann",
    "clap_text_audio_mean": "clap", "clap_text_audio_std": "clap",
    "clap_text_audio_reference_mean": "clap", "clap_text_audio_reference_std": "clap",
    "sim_aa_max_mean": "clap",
    "frechet_distance_cls": "classifier",
    "kernel_inception_distance_cls_mean": "classifier", "kernel_inception_distance_cls_std": "classifier",
    "inception_score_cls_mean": "classifier", "inception_score_cls_std": "classifier",
    "kullback_leibler_divergence_cls_softmax": "classifier", "kullback_leibler_divergence_cls_sigmoid": "classifier",
}
# Why the classifier metrics are absent when no classifier was given (the job passes it in `missing`).
NO_CLASSIFIER = {
    "reason": "no --classifier given",
    "how_to_provide": "pass --classifier DIR: a label classifier saved by musiccm.evaluation.classifier.save "
                      "(config.json + model.safetensors, local or s3://), e.g. the demo's outputs/demo/classifier",
}


def sim_aa_key(threshold: float) -> str:
    """metrics.json key of SIM_AA at `threshold`, e.g. `sim_aa@0.90`."""
    return f"sim_aa@{threshold:.2f}"


def corpus_metrics(
    gen: Features, ref: Features, train_clap: np.ndarray | None, *, missing: dict[str, dict] | None = None,
    thresholds: Sequence[float] = (0.90, 0.95), is_splits: int = IS_SPLITS, kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE, seed: int = SEED,
) -> tuple[dict[str, float | None], dict[str, dict], list[str]]:
    """Every metric that the features allow: (values, unavailable {key: {reason, how_to_provide}}, notes).

    `missing` maps a network ("pann", "vggish", "clap", "classifier") or "train" to why its features are
    absent ({"reason", "how_to_provide"}); a metric that needs it is reported unavailable with that reason.
    Without any label-classifier features (`cls_embedding`, `cls_logits`) its metrics are unavailable
    with `NO_CLASSIFIER` unless `missing` says otherwise.
    """
    missing = missing or {}
    keys = [*NETWORK_OF, *(sim_aa_key(t) for t in thresholds)]
    values: dict[str, float | None] = dict.fromkeys(keys)
    unavailable: dict[str, dict] = {}
    notes: list[str] = []

    def fail(names: Sequence[str], reason: str, how: str | None = None) -> None:
        for name in names:
            unavailable[name] = {"reason": reason, **({"how_to_provide": how} if how else {})}

    def attempt(names: Sequence[str], network: str, compute) -> None:
        if network in missing:
            fail(names, missing[network]["reason"], missing[network].get("how_to_provide"))
            return
        try:
            out = compute()
        except MetricError as exc:
            fail(names, str(exc))
            return
        values.update(zip(names, out if isinstance(out, tuple) else (out,), strict=True))

    def need(feature: tuple | None, what: str) -> tuple:
        if feature is None:
            raise MetricError(f"no {what} features (no readable clips)")
        return feature

    def classifier_metrics(network: str, name: str, kind: str, suffix: str) -> None:
        """FD, KID, IS and paired KL of one classifier network (Cnn14, or the label classifier with "_cls" keys)."""
        g_emb, r_emb = gen.get(f"{kind}_embedding"), ref.get(f"{kind}_embedding")
        g_log, r_log = gen.get(f"{kind}_logits"), ref.get(f"{kind}_logits")
        attempt([f"frechet_distance{suffix}"], network,
                lambda: frechet_distance(need(g_emb, f"generated {name}")[1], need(r_emb, f"reference {name}")[1]))
        attempt([f"kernel_inception_distance{suffix}_mean", f"kernel_inception_distance{suffix}_std"], network,
                lambda: kernel_inception_distance(need(g_emb, f"generated {name}")[1],
                                                  need(r_emb, f"reference {name}")[1],
                                                  kid_subsets, kid_subset_size, seed))
        attempt([f"inception_score{suffix}_mean", f"inception_score{suffix}_std"], network,
                lambda: inception_score(need(g_log, f"generated {name}")[1], is_splits, seed))
        attempt([f"kullback_leibler_divergence{suffix}_softmax", f"kullback_leibler_divergence{suffix}_sigmoid"],
                network, lambda: paired_kl(need(g_log, f"generated {name}"), need(r_log, f"reference {name}"),
                                           "KL" + suffix))

    def paired_kl(gen_logits: tuple, ref_logits: tuple, label: str) -> tuple[float, float]:
        (g_ids, g), (r_ids, r) = gen_logits, ref_logits
        gi, ri = pair_by_id(g_ids, r_ids)
        if gi.size == 0:
            raise MetricError(
                f"none of the {len(g_ids)} generated ids matches a reference id: KL compares each generated clip "
                "with the reference clip of the same id (its prompt's recording). Name reference files "
                "<id>.wav/.flac, or pass a reference Parquet with id and audio_uri columns")
        if gi.size < len(g_ids):
            notes.append(f"{label} over the {gi.size} of {len(g_ids)} generated clips whose id has a reference clip")
        kl = kl_divergence(g[gi], r[ri])
        return kl["softmax"], kl["sigmoid"]

    # 1. Cnn14: FD_pann, KID, IS, KL.
    classifier_metrics("pann", "Cnn14", "pann", "")
    g_log = gen.get("pann_logits")
    n_logits = len(g_log[0]) if g_log is not None else 0
    if 0 < n_logits < 10 * is_splits and "pann" not in missing:
        splits = min(is_splits, n_logits)
        notes.append(f"IS over {splits} split(s) of ~{n_logits // splits} clip(s): few clips per split pull IS "
                     "toward 1 (a one-clip split scores exactly 1); the paper's setting is 10 splits of 100")

    # 1b. The label classifier (--classifier): the same four metrics on its embedding and logits_head logits.
    if not any(f.get(k) is not None for f in (gen, ref) for k in ("cls_embedding", "cls_logits")):
        missing = {"classifier": NO_CLASSIFIER, **missing}  # no features at all: it was not given
    classifier_metrics("classifier", "label classifier", "cls", "_cls")

    # 2. VGGish: FD_vgg over frames.
    def fad() -> float:
        g, r = need(gen.get("vggish"), "generated VGGish")[1], need(ref.get("vggish"), "reference VGGish")[1]
        return frechet_audio_distance(g, r)

    attempt(["frechet_audio_distance"], "vggish", fad)

    # 3. CLAP: text–audio similarity of generated (and captioned reference) clips; SIM_AA against training clips.
    def text_audio(features: Features, what: str) -> tuple[float, float]:
        audio, text = need(features.get("clap_audio"), f"{what} CLAP audio"), features.get("clap_text")
        if text is None:
            raise MetricError(f"no {what} prompts/captions to compare with")
        ai, ti = pair_by_id(audio[0], text[0])
        sims = cosine_pairs(audio[1][ai], text[1][ti])
        return float(sims.mean()), float(sims.std())

    attempt(["clap_text_audio_mean", "clap_text_audio_std"], "clap", lambda: text_audio(gen, "generated"))
    if ref.get("clap_text") is not None or "clap" in missing:
        attempt(["clap_text_audio_reference_mean", "clap_text_audio_reference_std"], "clap",
                lambda: text_audio(ref, "reference"))
    else:
        fail(["clap_text_audio_reference_mean", "clap_text_audio_reference_std"],
             "the reference set has no captions", "a reference Parquet (or Parquet beside the audio) with id and "
             "caption columns")
    sim_names = [sim_aa_key(t) for t in thresholds] + ["sim_aa_max_mean"]
    if train_clap is None and "clap" not in missing:
        train = missing.get("train", {"reason": "no training set given",
                                      "how_to_provide": "--train-reference (training audio, or a Parquet of "
                                                        "CLAP audio embeddings with id and embedding columns)"})
        fail(sim_names, train["reason"], train.get("how_to_provide"))
    else:
        def similarity() -> tuple[float, ...]:
            if train_clap is None or len(train_clap) == 0:
                raise MetricError("no training embeddings (no readable training clips)")
            best = max_similarity(need(gen.get("clap_audio"), "generated CLAP audio")[1], train_clap)
            fractions = sim_aa(best, thresholds)
            return (*(fractions[f"{t:.2f}"] for t in thresholds), float(best.mean()))

        attempt(sim_names, "clap", similarity)
    return values, unavailable, notes
