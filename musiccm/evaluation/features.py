"""Feature networks of the paper's metrics, their weights, audio decoding, and the Ray Data feature stage.

- **Cnn14 (PANNs, 16 kHz)** → 2048-d embedding + 527 AudioSet logits (FD_pann, IS, KL, KID). The
  architecture is audioldm_eval's: we build `Cnn14_no_specaug` from its `panns/models.py` (the same layers
  and state-dict keys as its `Cnn14`, whose constructor instead loads `ckpt/…` relative to the working
  directory and shells out to `wget`), and take logits = `fc_audioset(embedding)`, exactly what
  `Cnn14.forward` returns as "logits" in eval mode (tested against the library's own class).
  Input as audioldm_eval's `WaveDataset`: first channel, mean removed, resampled to 16 kHz with
  torchaudio, zero-padded to ≥ 2 s (`pad_short_audio`; part of the feature definition, not a stand-in
  for a missing clip).
- **VGGish** → 128-d embedding per 0.96 s frame (FD_vgg). audioldm_eval fetches it with
  `torch.hub.load("harritaylor/torchvggish", "vggish")`; the same author's `torchvggish` 0.2 on PyPI ships
  the same `VGG`/`make_layers` (identical state-dict keys) and the same TF-ported `vggish_input`, so we
  build it offline and, like audioldm_eval, drop the last ReLU and skip PCA post-processing. Input as
  audioldm_eval's `load_audio_task`: channels averaged, resampled to 16 kHz (torchaudio, where the
  library uses resampy).
- **CLAP** (text + audio towers) → 512-d embeddings through `musiccm.external`.
- **Label classifier** (`musiccm.evaluation.classifier`, optional: `--classifier`) → its pooled embedding
  (FD_cls, KID_cls), the logits of its `logits_head` (IS_cls, KL_cls) and each head's predicted class
  (attribute accuracy against the prompts' labels). Input: channels averaged, padded to ≥ 0.5 s.

Weights come only from files the user names (local or s3://) or the libraries' default cache
locations; nothing is downloaded from the internet. Torch pickles are read with `weights_only=True`;
old PANNs checkpoints also pickle numpy arrays (the sampler state), which are allowed by name — any
other pickled object is refused. `.safetensors` files are read as they are.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import io
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from musiccm import storage
from musiccm.logs import quiet_libraries

CNN14_16K = dict(sample_rate=16000, window_size=512, hop_size=160, mel_bins=64, fmin=50, fmax=8000, classes_num=527)
PANN_SR = VGGISH_SR = 16_000
PANN_MIN_SAMPLES = 32_000  # audioldm_eval pad_short_audio
VGGISH_MIN_SAMPLES = 15_600  # 96 frames of 25 ms hopped by 10 ms: one 0.96 s example
PANN_FILE = "Cnn14_16k_mAP=0.438.pth"
VGGISH_FILE = "vggish-10086976.pth"
SETS = ("generated", "reference", "train")
_NUMPY_GLOBAL = re.compile(r"numpy(\._core|\.core)?(\.multiarray)?\.(_reconstruct|ndarray|dtype|scalar)"
                           r"|numpy\.dtypes\.\w+DType")


class WeightsError(ValueError):
    """A weight file that is missing, unsafe to unpickle, or does not fit the network."""


# ---------------------------------------------------------------- where weights live


def default_pann_path() -> str:
    """audioldm_eval's location: `ckpt/Cnn14_16k_mAP=0.438.pth` under the working directory."""
    return os.path.abspath(os.path.join("ckpt", PANN_FILE))


def default_vggish_path() -> str:
    """Where `torch.hub.load("harritaylor/torchvggish", "vggish")` caches the weights."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", VGGISH_FILE)


PANN_HOWTO = (f"pass --pann-ckpt PATH to {PANN_FILE} (PANNs Cnn14 16 kHz, Zenodo record 3987831; .pth or "
              f".safetensors, local or s3://) or put it at ./ckpt/{PANN_FILE} (audioldm_eval's location)")
CLASSIFIER_FILES = ("config.json", "model.safetensors")
CLS_MIN_SECONDS = 0.5  # the CNN pools time 16×: shorter clips are padded with silence (4 frames would not pool)
CLAP_HOWTO = ("pass --clap-model PATH: a MusicLDM-layout model directory (its text_encoder, tokenizer and "
              "feature_extractor are used) or a transformers ClapModel directory, local or s3://")


def vggish_howto() -> str:
    """How to provide VGGish weights (names torch.hub's cache as it is now: TORCH_HOME may change)."""
    return (f"pass --vggish-ckpt PATH to {VGGISH_FILE} (harritaylor/torchvggish release v0.1; .pth or .safetensors, "
            f"local or s3://) or put it at {default_vggish_path()} (torch.hub's cache)")


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local path for `uri`: the path itself, or an s3:// object downloaded to a temporary file."""
    if not storage.is_s3(uri):
        path = os.path.expanduser(uri.removeprefix("file://"))
        if not os.path.isfile(path):
            raise WeightsError(f"{uri}: no such file")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="musiccm-weights-") as tmp:
        path = os.path.join(tmp, uri.rsplit("/", 1)[-1])
        try:
            storage.download_file(uri, path)
        except storage.StorageError as exc:
            raise WeightsError(str(exc)) from None
        yield path


def file_digest(path: str) -> str:
    """First 16 hex digits of the file's sha256 (recorded with every result)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def warnings_off() -> Iterator[None]:
    """Silence warnings (numpy 2's deprecation of `numpy.core` names) for a block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _torch_load(path: str) -> Any:
    """`torch.load(weights_only=True)`, allowing numpy arrays/scalars by name (old PANNs checkpoints)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = exc
    unreadable = WeightsError(f"{path}: not a readable torch checkpoint ({type(first).__name__}: "
                              f"{(str(first).splitlines() or [''])[0][:200]})")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        raise unreadable from None
    if not unsafe:
        raise unreadable
    refused = [name for name in unsafe if not _NUMPY_GLOBAL.fullmatch(name)]
    if refused:
        raise WeightsError(f"{path}: pickles objects other than tensors and numpy arrays ({', '.join(refused)}); "
                           "refusing to unpickle them. Save the state dict as .safetensors instead")
    allowed: list[Any] = []
    for name in unsafe:  # (object, pickled name): numpy 2 still reads `numpy.core.*` names of numpy 1 files
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError), warnings_off():
            allowed.append((getattr(importlib.import_module(module), attr), name))
    # Arrays rebuild their dtype from its class (`numpy.dtypes.Int64DType`...), never listed as a global.
    allowed += [cls for name in dir(np.dtypes) if isinstance(cls := getattr(np.dtypes, name), type)]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict(uri: str, digest: bool = False) -> tuple[dict[str, torch.Tensor], str | None]:
    """(state dict, sha256 prefix or None) of a `.safetensors` file or a torch checkpoint (`{"model": sd}` or `sd`)."""
    with local_copy(uri) as path:
        sha = file_digest(path) if digest else None
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            try:
                return load_file(path), sha
            except Exception as exc:
                raise WeightsError(f"{uri}: not a readable safetensors file ({exc})") from None
        obj = _torch_load(path)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{uri}: expected a state dict of tensors (or {{'model': state_dict}}), "
                           f"got {type(obj).__name__}")
    return obj, sha


def _check_fit(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], what: str) -> None:
    """WeightsError naming missing, unexpected and mis-shaped keys, if any."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)}≠{v}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != v]
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items[:4])}{' …' if len(items) > 4 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items]
        raise WeightsError(f"{what} weights do not fit the network ({'; '.join(parts)})")


def fit(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Load `state` strictly into `module` (eval mode, frozen); WeightsError if it does not fit."""
    _check_fit({k: tuple(v.shape) for k, v in module.state_dict().items()}, state, what)
    module.load_state_dict(state, strict=True)
    return module.eval().requires_grad_(False)


@functools.cache
def expected_shapes(network: str) -> dict[str, tuple[int, ...]]:
    """State-dict key → shape of "pann" or "vggish" (one network built on CPU, once per process)."""
    if network == "pann":
        from audioldm_eval.feature_extractors.panns.models import Cnn14_no_specaug

        module = Cnn14_no_specaug(**CNN14_16K)
    elif network == "vggish":
        module = vggish_network()
    else:
        raise ValueError(f"network={network!r}; allowed: pann | vggish")
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_weights(network: str, uri: str) -> str | None:
    """Read `uri` and check it fits `network` ("pann" | "vggish") without building it; its sha256 prefix."""
    state, digest = load_state_dict(uri, digest=True)
    _check_fit(expected_shapes(network), state, {"pann": "Cnn14", "vggish": "VGGish"}[network])
    return digest


# ---------------------------------------------------------------- networks


class PannCnn14:
    """Cnn14 16 kHz of audioldm_eval: waveform → (2048-d embedding, 527 logits)."""

    def __init__(self, state: dict[str, torch.Tensor], device: str = "cpu") -> None:
        from audioldm_eval.feature_extractors.panns.models import Cnn14_no_specaug

        self.net = fit(Cnn14_no_specaug(**CNN14_16K), state, "Cnn14").to(device)
        self.device = device

    @torch.inference_mode()
    def __call__(self, wave: torch.Tensor, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
        """`wave` (C, S) → embedding (2048,), logits (527,), preprocessed as audioldm_eval's WaveDataset."""
        x = wave[:1].float()  # first channel only
        x = resample(x - x.mean(), sample_rate, PANN_SR)
        x = torch.nn.functional.pad(x, (0, max(0, PANN_MIN_SAMPLES - x.shape[-1])))  # (1, S ≥ 2 s)
        out = self.net(x.to(self.device))
        emb = out["embedding"]  # relu(fc1(·)): audioldm_eval's "2048"
        logits = self.net.fc_audioset(emb)  # audioldm_eval's "logits"
        return emb[0].float().cpu().numpy(), logits[0].float().cpu().numpy()


def vggish_network() -> torch.nn.Module:
    """torchvggish's VGG with its state-dict keys (features.*, embeddings.*), no PCA post-processing."""
    from torchvggish.torchvggish import VGG, make_layers

    return VGG(make_layers(), postprocess=False)


class VGGish:
    """VGGish: waveform → (frames, 128) embeddings, one per 0.96 s."""

    def __init__(self, state: dict[str, torch.Tensor], device: str = "cpu") -> None:
        net = fit(vggish_network(), state, "VGGish")
        net.embeddings = torch.nn.Sequential(*list(net.embeddings.children())[:-1])  # use_activation=False
        self.net = net.to(device)
        self.device = device

    @torch.inference_mode()
    def __call__(self, wave: torch.Tensor, sample_rate: int) -> np.ndarray:
        """`wave` (C, S) → (n, 128); n = 0 for clips shorter than 0.975 s."""
        from torchvggish.vggish_input import waveform_to_examples

        x = resample(wave.float().mean(0, keepdim=True), sample_rate, VGGISH_SR)[0]
        if x.shape[-1] < VGGISH_MIN_SAMPLES:
            return np.zeros((0, 128), np.float32)
        examples = waveform_to_examples(x.double().numpy(), VGGISH_SR)  # (n, 1, 96, 64) log-mel patches
        return self.net(examples.detach().to(self.device)).float().cpu().numpy()


def _clap_layout(directory: str) -> dict[str, str]:
    """Sub-folders of the CLAP parts: a MusicLDM-layout directory, or a transformers ClapModel directory."""
    if os.path.isfile(os.path.join(directory, "model_index.json")):
        return {p: os.path.join(directory, p) for p in ("text_encoder", "tokenizer", "feature_extractor")}
    return dict.fromkeys(("text_encoder", "tokenizer", "feature_extractor"), directory)


def check_clap(uri: str) -> str:
    """'musicldm' or 'clap' for a usable CLAP location (no weights read); WeightsError otherwise."""
    try:
        if storage.is_s3(uri):
            if storage.exists(storage.join(uri, "model_index.json")):
                return "musicldm"
            if storage.exists(storage.join(uri, "config.json")):
                return "clap"
        else:
            path = os.path.expanduser(uri)
            if os.path.isfile(os.path.join(path, "model_index.json")):
                if not os.path.isfile(os.path.join(path, "feature_extractor", "preprocessor_config.json")):
                    raise WeightsError(f"{uri}: the model has no feature_extractor/ (CLAP audio front end)")
                return "musicldm"
            if os.path.isfile(os.path.join(path, "config.json")):
                config = json.loads(Path(path, "config.json").read_text())
                if "audio_config" not in config or "text_config" not in config:
                    raise WeightsError(f"{uri}: config.json is not a ClapModel config (no text/audio config)")
                return "clap"
    except storage.StorageError as exc:
        raise WeightsError(str(exc)) from None
    raise WeightsError(f"{uri}: neither a MusicLDM-layout model (model_index.json) nor a ClapModel directory "
                       "(config.json)")


@contextlib.contextmanager
def _clap_dir(uri: str) -> Iterator[str]:
    """A local directory with the CLAP parts of `uri` (s3://: only those parts are downloaded)."""
    if not storage.is_s3(uri):
        yield os.path.expanduser(uri)
        return
    with tempfile.TemporaryDirectory(prefix="musiccm-clap-") as tmp:
        if check_clap(uri) == "musicldm":
            storage.download_file(storage.join(uri, "model_index.json"), os.path.join(tmp, "model_index.json"))
            for part in ("text_encoder", "tokenizer", "feature_extractor"):
                storage.download_dir(storage.join(uri, part), os.path.join(tmp, part))
        else:
            storage.download_dir(uri, tmp)
        yield tmp


class Clap:
    """CLAP text and audio towers of a model (via `musiccm.external`): L2-normalised 512-d embeddings."""

    def __init__(self, uri: str, device: str = "cpu") -> None:
        from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

        from musiccm.model import MusicLDMComponents

        with _clap_dir(uri) as directory:
            parts = _clap_layout(directory)
            try:
                text_encoder = ClapModel.from_pretrained(parts["text_encoder"], use_safetensors=True)
                tokenizer = AutoTokenizer.from_pretrained(parts["tokenizer"])
                feature_extractor = ClapFeatureExtractor.from_pretrained(parts["feature_extractor"])
            except (OSError, ValueError) as exc:
                raise WeightsError(f"CLAP {uri} could not be loaded: {_first_line(exc)}") from None
        # external.encode_* read only text_encoder, tokenizer and feature_extractor of the components.
        self.parts = MusicLDMComponents(
            unet=None, vae=None, text_encoder=text_encoder.eval().requires_grad_(False).to(device),
            tokenizer=tokenizer, vocoder=None, scheduler=None, feature_extractor=feature_extractor, name=uri)

    def audio(self, wave: torch.Tensor, sample_rate: int) -> np.ndarray:
        """(C, S) → (512,) from the channel mean (CLAP resamples to its own rate)."""
        from musiccm import external

        return external.encode_audio(self.parts, [wave.float().mean(0).numpy()], sample_rate)[0].cpu().numpy()

    def text(self, texts: list[str]) -> np.ndarray:
        """(B,) prompts → (B, 512)."""
        from musiccm import external

        return external.encode_text(self.parts, texts)[0].cpu().numpy()


@contextlib.contextmanager
def _classifier_dir(uri: str) -> Iterator[str]:
    """A local directory with the classifier's files (s3://: the two files downloaded to a temporary directory)."""
    if not storage.is_s3(uri):
        yield os.path.expanduser(uri.removeprefix("file://"))
        return
    with tempfile.TemporaryDirectory(prefix="musiccm-classifier-") as tmp:
        for name in CLASSIFIER_FILES:
            storage.download_file(storage.join(uri, name), os.path.join(tmp, name))
        yield tmp


def _classifier_files_exist(uri: str) -> bool:
    if storage.is_s3(uri):
        return all(storage.exists(storage.join(uri, name)) for name in CLASSIFIER_FILES)
    path = os.path.expanduser(uri.removeprefix("file://"))
    return all(os.path.isfile(os.path.join(path, name)) for name in CLASSIFIER_FILES)


def load_classifier(uri: str, device: str = "cpu") -> tuple[Any, str]:
    """(LabelClassifier, sha256 prefix of its weights) from a directory or s3:// prefix; WeightsError if unusable."""
    from musiccm.evaluation import classifier

    try:
        if not _classifier_files_exist(uri):
            raise WeightsError(f"{uri}: not a label classifier (needs {' + '.join(CLASSIFIER_FILES)}, as "
                               "musiccm.evaluation.classifier.save writes them)")
        with _classifier_dir(uri) as directory:
            digest = file_digest(os.path.join(directory, "model.safetensors"))
            try:  # a bad config (unknown keys: TypeError) or unreadable weights: say so, never a traceback
                return classifier.load(directory, device), digest
            except Exception as exc:
                raise WeightsError(f"{uri}: not a usable label classifier ({_first_line(exc)})") from None
    except storage.StorageError as exc:
        raise WeightsError(str(exc)) from None


def check_classifier(uri: str) -> dict:
    """Load the classifier once on CPU (it is small): {uri, sha256_16, heads: {head: classes}, logits_head}."""
    net, digest = load_classifier(uri)
    return {"uri": uri, "sha256_16": digest, "heads": net.classes, "logits_head": net.logits_head}


class Classifier:
    """The label classifier: waveform → (embedding, `logits_head` logits, {head: predicted class name})."""

    def __init__(self, uri: str, device: str = "cpu") -> None:
        self.net = load_classifier(uri, device)[0]

    def __call__(self, wave: torch.Tensor, sample_rate: int) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
        """`wave` (C, S) → (embedding (D,), logits (K,), predictions) from the channel mean."""
        x = wave.float().mean(0)
        x = torch.nn.functional.pad(x, (0, max(0, int(CLS_MIN_SECONDS * sample_rate) - x.shape[-1])))
        emb, logits = self.net.wave_features(x, sample_rate)
        pred = {head: self.net.classes[head][int(v.argmax())] for head, v in logits.items()}
        return emb.float().numpy(), logits[self.net.logits_head].float().numpy(), pred


# ---------------------------------------------------------------- audio


def decode(data: bytes) -> tuple[torch.Tensor, int]:
    """Audio file bytes (wav, flac, ogg, mp3: whatever libsndfile reads) → ((C, S) float32, sample rate)."""
    import soundfile as sf

    try:
        wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (S, C)
    except sf.LibsndfileError as exc:
        raise ValueError(f"not decodable audio (libsndfile: {exc.error_string})") from None
    if wave.shape[0] == 0:
        raise ValueError("empty audio (0 samples)")
    if not np.isfinite(wave).all():
        raise ValueError("audio contains NaN or inf")
    return torch.from_numpy(np.ascontiguousarray(wave.T)), int(sr)


def resample(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """(C, S) at `orig` Hz → (C, S') at `new` Hz (torchaudio's sinc resampler, as audioldm_eval)."""
    if orig == new:
        return x
    import torchaudio.functional as AF

    return AF.resample(x, orig, new)


# ---------------------------------------------------------------- the Ray Data stage


@dataclass(frozen=True)
class Networks:
    """Which feature networks the stage loads: weight URIs (None: that network is unavailable)."""

    pann: str | None = None
    vggish: str | None = None
    clap: str | None = None
    classifier: str | None = None  # a label classifier directory (musiccm.evaluation.classifier.save)


INPUT_SCHEMA = pa.schema([("set", pa.string()), ("id", pa.string()), ("uri", pa.string()), ("text", pa.string())])
_VEC = pa.list_(pa.float32())
FEATURE_SCHEMA = pa.schema([
    ("set", pa.string()), ("id", pa.string()), ("uri", pa.string()), ("error", pa.string()),
    ("duration_s", pa.float64()), ("sample_rate", pa.int32()), ("channels", pa.int32()),
    ("pann_embedding", _VEC), ("pann_logits", _VEC),
    ("vggish", _VEC), ("vggish_frames", pa.int32()),  # (frames × 128) flattened
    ("clap_audio", _VEC), ("clap_text", _VEC),
    ("cls_embedding", _VEC), ("cls_logits", _VEC),  # the label classifier's embedding and logits_head logits
    ("cls_pred", pa.string()),  # JSON {head: predicted class name}
])
CLS_COLUMNS = ("cls_embedding", "cls_logits", "cls_pred")


class FeatureStage:
    """Callable class for `Dataset.map_batches`: loads each available network once per actor.

    Rows (set, id, uri, text) → one FEATURE_SCHEMA row each. `generated` and `reference` clips get
    Cnn14, VGGish and label-classifier features, CLAP audio (and text when the row has one) for
    `generated` always and for `reference` when it has a caption; `train` clips only CLAP audio
    (SIM_AA). A file that cannot be read or decoded gets `error` and no features. Imports no Ray:
    runs the same in a plain loop.
    """

    def __init__(self, networks: Networks, device: str | None = None, torch_threads: int | None = None) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        quiet_libraries()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pann = PannCnn14(load_state_dict(networks.pann)[0], self.device) if networks.pann else None
        self.vggish = VGGish(load_state_dict(networks.vggish)[0], self.device) if networks.vggish else None
        self.clap = Clap(networks.clap, self.device) if networks.clap else None
        self.classifier = Classifier(networks.classifier, self.device) if networks.classifier else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._row(r) for r in batch.to_pylist()]
        texts = []
        for i, row in enumerate(rows):
            text = row.pop("_text", None)
            if text and row["error"] is None:
                texts.append((i, text))
        if texts and self.clap is not None:  # one batched text-tower call
            for (i, _), vec in zip(texts, self.clap.text([t for _, t in texts]), strict=True):
                rows[i]["clap_text"] = vec.tolist()
        return pa.Table.from_pylist(rows, schema=FEATURE_SCHEMA)

    def _row(self, request: dict) -> dict:
        out: dict[str, Any] = {"set": request["set"], "id": request["id"], "uri": request["uri"], "error": None}
        try:
            wave, sr = decode(storage.read_bytes(request["uri"]))
        except Exception as exc:  # unreadable: listed in metrics.json, never replaced by silence
            out["error"] = f"unreadable: {type(exc).__name__}: {_first_line(exc)}"
            return out
        out.update(duration_s=wave.shape[1] / sr, sample_rate=sr, channels=wave.shape[0])
        try:
            if request["set"] != "train" and self.pann is not None:
                emb, logits = self.pann(wave, sr)
                out.update(pann_embedding=emb.tolist(), pann_logits=logits.tolist())
            if request["set"] != "train" and self.vggish is not None:
                frames = self.vggish(wave, sr)
                out.update(vggish=frames.reshape(-1).tolist(), vggish_frames=frames.shape[0])
            if request["set"] != "train" and self.classifier is not None:
                emb, logits, pred = self.classifier(wave, sr)
                out.update(cls_embedding=emb.tolist(), cls_logits=logits.tolist(), cls_pred=json.dumps(pred))
            wants_clap = request["set"] in ("generated", "train") or bool(request.get("text"))
            if wants_clap and self.clap is not None:
                out["clap_audio"] = self.clap.audio(wave, sr).tolist()
                out["_text"] = request.get("text") if request["set"] != "train" else None
        except Exception as exc:
            out["error"] = f"feature extraction failed: {type(exc).__name__}: {_first_line(exc)}"
            for key in ("pann_embedding", "pann_logits", "vggish", "vggish_frames", "clap_audio", "_text",
                        *CLS_COLUMNS):
                out.pop(key, None)
        return out


def _first_line(exc: BaseException, limit: int = 300) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:limit]

