"""Evaluation on Ray Data: a batch-generation output + a reference set → metrics.json + a Table-1 row.

    python ray_jobs/evaluate.py --generated s3://b/gen/run1 --reference s3://b/ref --out s3://b/eval/run1 \\
        --pann-ckpt s3://b/weights/Cnn14_16k_mAP=0.438.pth --vggish-ckpt s3://b/weights/vggish-10086976.pth

Steps: (1) before Ray: list the generated clips (metric shards name them and their prompts), the
reference clips and the training clips or embeddings; find and check the feature networks' weights
(a network without weights makes its metrics "unavailable", the others still run; a given --classifier
must load); probe that --out is writable. (2) Ray Data actors (one GPU each when the cluster has GPUs)
read every clip straight from storage and extract Cnn14 / VGGish / CLAP / label-classifier features,
each network loaded once per actor; only small feature vectors come back. (3) On the driver: the
metrics (`musiccm.evaluation.metrics`) and the classifier's attribute accuracy against the label
columns of the metric rows (and of the reference), then `metrics.json`, `features.parquet` and the
appended Markdown table (`musiccm.evaluation.report`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from musiccm import storage
from musiccm.evaluation import features as feat
from musiccm.evaluation import metrics, report

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
CAPTION_COLUMNS = ("caption", "prompt", "text")
AUDIO_COLUMNS = ("audio_uri", "path", "uri")
EMBEDDING_COLUMNS = ("embedding", "clap_audio", "clap_audio_embedding")
NETWORKS = ("pann", "vggish", "clap", "classifier")


@dataclass(frozen=True)
class EvalConfig:
    """Everything an evaluation depends on; the flags of `ray_jobs/evaluate.py` map 1:1 onto these fields."""

    generated: str  # batch-generation output (audio/, metrics/) or a plain directory of audio files
    reference: str  # directory of audio files, or a Parquet with id, audio_uri (+ caption)
    out: str  # metrics.json, features.parquet, table.md
    train_reference: str | None = None  # training audio, or a Parquet of CLAP audio embeddings (SIM_AA)
    table: str | None = None  # Markdown table to append to (None: {out}/table.md)
    label: str | None = None  # the table row's name (None: the run name of the generated output)
    pann_ckpt: str | None = None  # None: audioldm_eval's ./ckpt/Cnn14_16k_mAP=0.438.pth if present
    vggish_ckpt: str | None = None  # None: torch.hub's cache checkpoints/vggish-10086976.pth if present
    clap_model: str | None = None  # None: the generating model's own CLAP
    no_clap: bool = False
    classifier: str | None = None  # a label classifier directory (FD_cls, KID_cls, IS_cls, KL_cls, accuracy)
    num_actors: int = 1
    batch_size: int = 4  # clips per actor call
    device: str | None = None  # None: cuda when the cluster has GPUs, else cpu
    cpus_per_actor: float | None = None
    torch_threads: int | None = None
    sim_thresholds: tuple[float, ...] = (0.90, 0.95)
    is_splits: int = metrics.IS_SPLITS
    kid_subsets: int = metrics.KID_SUBSETS
    kid_subset_size: int = metrics.KID_SUBSET_SIZE
    seed: int = metrics.SEED
    progress_s: float = 10.0

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")

        def count(value: object, low: int = 1) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        for name in ("generated", "reference", "out"):
            need(isinstance(getattr(self, name), str) and bool(getattr(self, name)), name,
                 "a local path or s3:// URI")
        need(self.classifier is None or (isinstance(self.classifier, str) and bool(self.classifier.strip())),
             "classifier", "a directory or s3:// prefix of a classifier saved by musiccm.evaluation.classifier.save")
        need(self.label is None or ("|" not in self.label and "\n" not in self.label and bool(self.label.strip())),
             "label", "a non-empty name without '|' or newlines")
        need(count(self.num_actors), "num_actors", "an integer ≥ 1")
        need(count(self.batch_size), "batch_size", "an integer ≥ 1")
        need(self.cpus_per_actor is None or self.cpus_per_actor > 0, "cpus_per_actor", "a number > 0")
        need(self.torch_threads is None or count(self.torch_threads), "torch_threads", "an integer ≥ 1")
        need(bool(self.sim_thresholds) and all(0 < t < 1 for t in self.sim_thresholds), "sim_thresholds",
             "numbers in (0, 1)")
        need(count(self.is_splits), "is_splits", "an integer ≥ 1")
        need(count(self.kid_subsets), "kid_subsets", "an integer ≥ 1")
        need(count(self.kid_subset_size, 2), "kid_subset_size", "an integer ≥ 2")
        need(self.progress_s > 0, "progress_s", "seconds > 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EvalConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown EvalConfig field(s) {unknown}")
        return cls(**{**data, "sim_thresholds": tuple(data.get("sim_thresholds", (0.90, 0.95)))})

    @property
    def table_uri(self) -> str:
        return self.table or storage.join(self.out, "table.md")


# ---------------------------------------------------------------- inputs (no Ray)


@dataclass
class Inputs:
    """What will be evaluated: one row per clip (set, id, uri, text) plus what is known about the run."""

    items: list[dict] = field(default_factory=list)
    generation: list[dict] = field(default_factory=list)  # metric rows of the generated clips
    summary: dict | None = None  # the batch run's _SUMMARY.json
    missing_audio: list[str] = field(default_factory=list)  # generated ids with a metric row but no audio
    reference_labels: dict[str, dict] = field(default_factory=dict)  # id → label columns of the reference rows
    train_embeddings: np.ndarray | None = None  # precomputed CLAP audio embeddings (N, D)
    train_meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _stem(uri: str) -> str:
    return PurePosixPath(uri).stem


def _audio_files(uri: str) -> list[str]:
    return [u for u in storage.list_files(uri) if u.lower().endswith(AUDIO_SUFFIXES)]


def _read_parquet(uri: str) -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
    except (pa.ArrowInvalid, OSError) as exc:
        cause = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{uri}: not a readable Parquet file ({cause})") from None


def _column(table: pa.Table, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in table.column_names), None)


def _label_columns(table: pa.Table) -> list[str]:
    """Columns that may hold attribute labels (scalar strings, booleans, integers): all but id/audio/caption."""
    def scalar(t: pa.DataType) -> bool:
        return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)
                or pa.types.is_boolean(t) or pa.types.is_integer(t))

    skip = {"id", *AUDIO_COLUMNS, *CAPTION_COLUMNS}
    return [f.name for f in table.schema if scalar(f.type) and f.name not in skip]


def _keep_labels(table: pa.Table, inputs: Inputs) -> None:
    """Attach a reference Parquet's label columns by id (the classifier's accuracy on real audio needs them)."""
    columns = _label_columns(table)
    if columns and "id" in table.column_names:
        for row in table.select(["id", *columns]).to_pylist():
            inputs.reference_labels[str(row.pop("id"))] = row


def _unique_ids(flag: str, uri: str, found: list[tuple[str, str]]) -> None:
    """ValueError if two files map to one id (KL pairs clips by id)."""
    seen: dict[str, str] = {}
    for clip_id, path in found:
        if clip_id in seen:
            raise ValueError(f"{flag} {uri}: id {clip_id!r} names two files ({seen[clip_id]}, {path}); ids must be "
                             "unique: rename one, or pass a Parquet with an explicit id column")
        seen[clip_id] = path


def read_generated(uri: str, inputs: Inputs) -> None:
    """Generated clips of a batch output (metric shards name them) or, failing that, every audio file under `uri`."""
    from musiccm import results

    rows = results.read_metrics(uri).to_pylist()
    if not rows:
        files = _audio_files(uri)
        if not files:
            raise ValueError(f"--generated {uri}: no metric shards (metrics/*.parquet) and no audio files")
        inputs.notes.append(f"--generated {uri} has no metric shards: evaluating its {len(files)} audio files "
                            "(no prompts, so no CLAP text–audio score; no latency)")
        _unique_ids("--generated", uri, [(_stem(f), f) for f in files])
        inputs.items += [{"set": "generated", "id": _stem(f), "uri": f, "text": None} for f in files]
        return
    audio = {PurePosixPath(f).name: f for f in _audio_files(storage.join(uri, "audio"))}
    by_stem = {_stem(name): f for name, f in sorted(audio.items())}
    for row in rows:
        path = audio.get(f"{row['id']}.{row.get('format')}") or by_stem.get(row["id"])
        if path is None:
            inputs.missing_audio.append(row["id"])
            continue
        inputs.items.append({"set": "generated", "id": row["id"], "uri": path, "text": row.get("prompt")})
        inputs.generation.append(row)
    if not inputs.generation:
        raise ValueError(f"--generated {uri}: {len(rows)} metric rows but none of their audio files exist")
    with contextlib.suppress(FileNotFoundError):
        inputs.summary = results.read_summary(uri)


def read_reference(uri: str, inputs: Inputs) -> None:
    """Reference clips: a Parquet (id, audio_uri[, caption]) or every audio file under a directory (id = stem).

    A directory may also hold Parquet files with id and caption/prompt columns (a batch output does:
    its metric shards); their captions are attached by id. Label columns of either Parquet form
    (e.g. instrument, mode) are kept by id for the label classifier's reference accuracy.
    """
    captions: dict[str, str] = {}
    if uri.endswith(".parquet"):
        table = _read_parquet(uri)
        path_col, text_col = _column(table, AUDIO_COLUMNS), _column(table, CAPTION_COLUMNS)
        if "id" not in table.column_names or path_col is None:
            raise ValueError(f"--reference {uri}: needs an id column and one of {', '.join(AUDIO_COLUMNS)}")
        _keep_labels(table, inputs)
        base = uri.rsplit("/", 1)[0] if "/" in uri else "."
        found = []
        for row in table.to_pylist():
            path = row[path_col]
            if not path or row["id"] is None:
                raise ValueError(f"--reference {uri}: a row has no id or no {path_col}: {row}")
            absolute = storage.is_s3(path) or path.startswith("/")
            found.append((str(row["id"]), path if absolute else storage.join(base, path),
                          row.get(text_col) if text_col else None))
    else:
        files = _audio_files(uri)
        found = [(_stem(f), f, None) for f in files]
        for pq_uri in storage.list_files(uri, suffix=".parquet"):
            table = _read_parquet(pq_uri)
            _keep_labels(table, inputs)
            text_col = _column(table, CAPTION_COLUMNS)
            if "id" in table.column_names and text_col:
                captions.update((str(r["id"]), r[text_col]) for r in table.select(["id", text_col]).to_pylist())
    if not found:
        raise ValueError(f"--reference {uri}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
    _unique_ids("--reference", uri, [(i, p) for i, p, _ in found])
    inputs.items += [{"set": "reference", "id": i, "uri": p, "text": t or captions.get(i)} for i, p, t in found]


def read_train(uri: str, inputs: Inputs) -> None:
    """Training set for SIM_AA: a Parquet of CLAP audio embeddings, or audio files (embedded by the actors)."""
    if uri.endswith(".parquet"):
        table = _read_parquet(uri)
        col = _column(table, EMBEDDING_COLUMNS)
        if col is None:
            raise ValueError(f"--train-reference {uri}: needs one of the columns {', '.join(EMBEDDING_COLUMNS)}")
        vectors = table.column(col).to_pylist()
        sizes = {len(v) for v in vectors if v is not None}
        if len(sizes) != 1 or any(v is None for v in vectors):
            raise ValueError(f"--train-reference {uri}: column {col} must hold equal-length vectors, no nulls")
        inputs.train_embeddings = np.asarray(vectors, dtype=np.float32)
        meta = table.schema.metadata or {}
        inputs.train_meta = {"uri": uri, "rows": len(vectors),
                             "clap_model": (meta.get(b"musiccm.clap_model") or b"").decode() or None}
        return
    files = _audio_files(uri)
    if not files:
        raise ValueError(f"--train-reference {uri}: no audio files and not a .parquet of embeddings")
    root = uri.rstrip("/")
    inputs.items += [{"set": "train", "id": f[len(root) + 1:], "uri": f, "text": None} for f in files]
    inputs.train_meta = {"uri": uri, "rows": len(files), "clap_model": None}


# ---------------------------------------------------------------- feature networks (no Ray)


def _weights(flag: str, given: str | None, default: str, howto: str, check) -> tuple[str | None, dict]:
    """(uri or None, info): a given path must work; a missing default makes the metrics unavailable."""
    uri = given or (default if os.path.isfile(default) else None)
    if uri is None:
        return None, {"reason": f"no weights: {default} does not exist and {flag} was not given",
                      "how_to_provide": howto}
    try:
        digest = check(uri)
    except ImportError as exc:
        return None, {"reason": f"{exc}", "how_to_provide": "pip install torchvggish==0.2"}
    except feat.WeightsError as exc:
        if given:
            raise ValueError(f"{flag} {given}: {exc}") from None
        return None, {"reason": f"{default}: {exc}", "how_to_provide": howto}
    return uri, {"uri": uri, "sha256_16": digest, "default_location": given is None}


def default_clap(inputs: Inputs) -> tuple[str | None, str]:
    """(the generating model's location, which holds its CLAP, or None; why not)."""
    uris = [r.get("model_uri") for r in inputs.generation if r.get("model_uri")]
    if not uris and inputs.summary:
        uris = [inputs.summary.get("model", {}).get("uri")]
    uri = next((u for u in uris if u), None)
    if uri is None:
        return None, "the generated set names no model (no metric rows with model_uri, no _SUMMARY.json)"
    if storage.is_s3(uri) or os.path.exists(os.path.expanduser(uri)):
        return uri, ""
    from musiccm import model

    try:  # a hub id: only from the local cache, never downloaded
        return model.resolve(uri, local_files_only=True), ""
    except model.ModelError:
        return None, f"the generating model {uri!r} is neither a path readable from here nor a cached hub model"


def _classifier(given: str | None) -> tuple[str | None, dict]:
    """(uri or None, info) of --classifier: optional, but a given one must load (else a usage error)."""
    if given is None:
        return None, dict(metrics.NO_CLASSIFIER)
    try:
        return given, feat.check_classifier(given)
    except feat.WeightsError as exc:
        raise ValueError(f"--classifier {given}: {str(exc).removeprefix(f'{given}: ')}") from None


def resolve_networks(config: EvalConfig, inputs: Inputs) -> tuple[feat.Networks, dict, dict]:
    """(Networks for the actors, {network: info}, {network: unavailable reason}); bad given paths → ValueError."""
    info: dict[str, dict] = {}
    missing: dict[str, dict] = {}
    pann, info["pann"] = _weights("--pann-ckpt", config.pann_ckpt, feat.default_pann_path(), feat.PANN_HOWTO,
                                  lambda uri: feat.check_weights("pann", uri))
    vggish, info["vggish"] = _weights("--vggish-ckpt", config.vggish_ckpt, feat.default_vggish_path(),
                                      feat.vggish_howto(), lambda uri: feat.check_weights("vggish", uri))
    clap = None
    if config.no_clap:
        info["clap"] = {"reason": "--no-clap was given", "how_to_provide": "leave out --no-clap"}
    else:
        clap, why = (config.clap_model, "") if config.clap_model else default_clap(inputs)
        if clap is None:
            info["clap"] = {"reason": f"{why}, and --clap-model was not given", "how_to_provide": feat.CLAP_HOWTO}
        else:
            try:
                info["clap"] = {"uri": clap, "layout": feat.check_clap(clap), "own_model": not config.clap_model}
            except feat.WeightsError as exc:
                if config.clap_model:
                    raise ValueError(f"--clap-model {config.clap_model}: {exc}") from None
                info["clap"] = {"reason": f"the generating model's CLAP is not usable: {exc}",
                                "how_to_provide": feat.CLAP_HOWTO}
                clap = None
    classifier, info["classifier"] = _classifier(config.classifier)
    for name, uri in (("pann", pann), ("vggish", vggish), ("clap", clap), ("classifier", classifier)):
        if uri is None:
            missing[name] = info[name]
    return feat.Networks(pann=pann, vggish=vggish, clap=clap, classifier=classifier), info, missing


# ---------------------------------------------------------------- extraction


@dataclass
class Resources:
    actors: int
    num_gpus: float
    num_cpus: float
    device: str
    torch_threads: int | None
    notes: list[str] = field(default_factory=list)


def plan_resources(config: EvalConfig, cluster: dict[str, float]) -> Resources:
    """One GPU per actor when the cluster has GPUs; otherwise CPU actors leaving one CPU for other tasks."""
    gpus, cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 1.0)
    if gpus >= 1 and (config.device is None or config.device.startswith("cuda")):
        actors = min(config.num_actors, int(gpus))
        notes = [f"--num-actors {config.num_actors} > {int(gpus)} GPUs: using {actors}"] * (actors < config.num_actors)
        return Resources(actors, 1, config.cpus_per_actor or 1, config.device or "cuda", config.torch_threads, notes)
    if config.device is not None and config.device.startswith("cuda"):
        raise ValueError(f"--device {config.device}: the Ray cluster has no GPUs")
    spare = max(cpus - 1, cpus / 2)  # a pool holding every CPU starves the other tasks
    actors = max(1, min(config.num_actors, int(spare)))
    notes = [f"--num-actors {config.num_actors} needs more CPUs than {cpus:g} less one: using {actors}"] * (
        actors < config.num_actors)
    share = spare / actors
    num_cpus = config.cpus_per_actor or (math.floor(share) if share >= 1 else round(share, 2))
    threads = config.torch_threads or max(1, int(cpus // actors))
    return Resources(actors, 0, num_cpus, config.device or "cpu", threads, notes)


def extract(items: list[dict], networks: feat.Networks, config: EvalConfig, use_ray: bool = True) -> pa.Table:
    """FEATURE_SCHEMA rows for every item: Ray Data actors (or, with use_ray=False, this process)."""
    table = pa.Table.from_pylist(items, schema=feat.INPUT_SCHEMA)
    blocks = [table.slice(i, config.batch_size) for i in range(0, table.num_rows, config.batch_size)]
    progress = _Progress(table.num_rows, config.progress_s)
    if not use_ray:
        stage = feat.FeatureStage(networks, config.device, config.torch_threads)
        return pa.concat_tables([progress(stage(block)) for block in blocks])
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init()  # joins the cluster under `ray job submit`, else starts a local one
    try:
        res = plan_resources(config, ray.cluster_resources())
        for note in res.notes:
            print(f"[evaluate] note: {note}", flush=True)
        ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
        out = ray.data.from_arrow(blocks).map_batches(
            feat.FeatureStage,
            fn_constructor_kwargs={"networks": networks, "device": res.device, "torch_threads": res.torch_threads},
            batch_size=config.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=min(res.actors, len(blocks))),
            num_gpus=res.num_gpus or None,
            num_cpus=res.num_cpus,
        )
        return pa.concat_tables([progress(b) for b in out.iter_batches(batch_size=None, batch_format="pyarrow")])
    finally:
        if started:
            ray.shutdown()


class _Progress:
    def __init__(self, total: int, every_s: float) -> None:
        self.total, self.every_s, self.done = total, every_s, 0
        self.start = self.last = time.monotonic()

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.done += batch.num_rows
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            print(f"[evaluate] features: {self.done}/{self.total} clips in {now - self.start:.0f} s", flush=True)
        return batch


def set_features(rows: pa.Table, name: str) -> metrics.Features:
    """The readable clips of one set as `metrics.Features`."""
    out = metrics.Features()
    part = rows.filter(pc.and_(pc.equal(rows.column("set"), name),
                                       pc.is_null(rows.column("error"))))
    data = part.to_pydict()
    for kind in ("pann_embedding", "pann_logits", "clap_audio", "clap_text", "cls_embedding", "cls_logits"):
        have = [(i, v) for i, v in zip(data["id"], data[kind], strict=True) if v is not None]
        if have:
            out.ids[kind] = [i for i, _ in have]
            out.arrays[kind] = np.asarray([v for _, v in have], dtype=np.float32)
    frames = [np.asarray(v, np.float32).reshape(-1, 128) for v in data["vggish"] if v is not None]
    if frames:
        out.arrays["vggish"] = np.concatenate(frames)
        out.vggish_clips = sum(len(f) > 0 for f in frames)
    return out


# ---------------------------------------------------------------- the run


def run(config: EvalConfig, use_ray: bool = True) -> dict:
    """Evaluate; write metrics.json, features.parquet and the table row; return the report."""
    started, t0 = datetime.now(UTC), time.monotonic()
    # 1. Pre-flight, before any Ray work: inputs, weights, a writable output.
    inputs = Inputs()
    read_generated(config.generated, inputs)
    read_reference(config.reference, inputs)
    if config.train_reference:
        read_train(config.train_reference, inputs)
    networks, network_info, missing = resolve_networks(config, inputs)
    if config.train_reference is None:
        missing.setdefault("train", {"reason": "no training set given", "how_to_provide": "--train-reference"})
    storage.check_writable(config.out)
    if networks.clap is None:  # training clips serve only SIM_AA, which needs CLAP
        inputs.items = [i for i in inputs.items if i["set"] != "train"]
    counts = {s: sum(i["set"] == s for i in inputs.items) for s in feat.SETS}
    print(f"[evaluate] {counts['generated']} generated, {counts['reference']} reference, {counts['train']} training "
          f"clips; networks: {', '.join(n for n in NETWORKS if n not in missing) or 'none'}",
          flush=True)
    # 2. Features in parallel.
    rows = extract(inputs.items, networks, config, use_ray)
    # 3. Metrics on the driver.
    gen, ref = set_features(rows, "generated"), set_features(rows, "reference")
    train = inputs.train_embeddings
    if train is None and counts["train"]:
        train = set_features(rows, "train").arrays.get("clap_audio", np.zeros((0, 512), np.float32))
    values, unavailable, notes = metrics.corpus_metrics(
        gen, ref, train, missing=missing, thresholds=config.sim_thresholds, is_splits=config.is_splits,
        kid_subsets=config.kid_subsets, kid_subset_size=config.kid_subset_size, seed=config.seed)
    attributes, attribute_notes = _attributes(rows, inputs, network_info["classifier"].get("heads"))
    counted = _counts(rows, inputs, gen)
    failed = f"failed: none of the {counts['generated']} generated clips could be read (see unreadable)"
    result = report.build(
        status="ok" if counted["generated"] else failed, config=config.to_dict(),
        label=config.label or report.default_label(config.generated, inputs.summary),
        inputs={"generated": config.generated, "reference": config.reference, "train_reference":
                config.train_reference, **({"train": inputs.train_meta} if inputs.train_meta else {})},
        counts=counted, generation=inputs.generation, summary=inputs.summary, values=values,
        unavailable=unavailable, attributes=attributes,
        notes=inputs.notes + notes + attribute_notes + _feature_notes(rows, gen, inputs, networks.clap),
        networks=network_info, missing_audio=inputs.missing_audio,
        unreadable=[{k: r[k] for k in ("set", "id", "uri", "error")}
                    for r in rows.filter(pc.is_valid(rows.column("error"))).to_pylist()],
        started_at=started.isoformat(), wall_seconds=time.monotonic() - t0,
    )
    # 4. Outputs.
    storage.write_bytes(storage.join(config.out, "features.parquet"), _parquet_bytes(rows))
    if networks.clap and counts["train"]:
        storage.write_bytes(storage.join(config.out, "train_clap_embeddings.parquet"),
                            _train_embeddings(rows, networks.clap))
    report.write(result, config.out, config.table_uri)
    return result


def _counts(rows: pa.Table, inputs: Inputs, gen: metrics.Features) -> dict:
    ok = rows.filter(pc.is_null(rows.column("error")))
    readable = {s: sum(1 for x in ok.column("set").to_pylist() if x == s) for s in feat.SETS}
    pairs = metrics.pair_by_id(gen.ids.get("pann_logits", []), [
        r["id"] for r in ok.to_pylist() if r["set"] == "reference"])[0].size
    return {"generated": readable["generated"], "reference": readable["reference"],
            "train": readable["train"] if inputs.train_embeddings is None else len(inputs.train_embeddings),
            "paired_for_kl": int(pairs), "unreadable": rows.num_rows - ok.num_rows,
            "missing_audio": len(inputs.missing_audio), "vggish_clips_generated": gen.vggish_clips}


def _feature_notes(rows: pa.Table, gen: metrics.Features, inputs: Inputs, clap: str | None) -> list[str]:
    notes = []
    short = [r["id"] for r in rows.to_pylist()
             if r["set"] != "train" and r["error"] is None and r["vggish_frames"] == 0]
    if short:
        notes.append(f"{len(short)} clip(s) shorter than 0.975 s have no VGGish frame and do not count in FD_vgg "
                     f"(e.g. {', '.join(short[:3])})")
    if inputs.missing_audio:
        notes.append(f"{len(inputs.missing_audio)} generated id(s) have a metric row but no audio file")
    for kind, name in (("pann_embedding", "FD_pann/KID"), ("cls_embedding", "FD_cls/KID_cls")):
        n_gen, dims = gen.arrays[kind].shape if kind in gen.arrays else (0, 0)
        if 0 < n_gen < dims:
            notes.append(f"{name} from {n_gen} generated clips: fewer than the {dims} embedding dimensions, so the "
                         "covariance is rank-deficient and FD is biased upward; compare runs with equal clip counts")
    made_with = inputs.train_meta.get("clap_model")
    if inputs.train_embeddings is not None and made_with != clap:
        notes.append(f"the training embeddings were made with CLAP {made_with or '(not recorded)'}, the generated "
                     f"clips are embedded with {clap}: SIM_AA is only meaningful when both are the same CLAP")
    return notes


def attribute_accuracy(rows: pa.Table, which: str, labels: dict[str, dict],
                       heads: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """({head: fraction of `which` clips whose predicted class equals their label}, heads with no label column).

    `labels` maps id → {column: value}; a head counts when it names a column. Clips whose label is
    null or missing, and clips without a prediction (unreadable), are skipped.
    """
    part = rows.filter(pc.and_(pc.equal(rows.column("set"), which), pc.is_valid(rows.column("cls_pred"))))
    predicted = {r["id"]: json.loads(r["cls_pred"]) for r in part.select(["id", "cls_pred"]).to_pylist()}
    columns = {column for row in labels.values() for column in row}
    out: dict[str, float] = {}
    for head in (h for h in heads if h in columns):
        hits = [pred[head] == str(labels[i][head]) for i, pred in predicted.items()
                if labels.get(i, {}).get(head) is not None]
        if hits:
            out[head] = float(np.mean(hits))
    return out, [h for h in heads if h not in columns]


def _mean(accuracy: dict[str, float]) -> float | None:
    return float(np.mean(list(accuracy.values()))) if accuracy else None


def _attributes(rows: pa.Table, inputs: Inputs, heads: Sequence[str] | None) -> tuple[dict, list[str]]:
    """metrics.json's attribute accuracy keys (generated and reference) and notes on heads left out."""
    heads = list(heads or ())
    gen, absent = attribute_accuracy(rows, "generated", {r["id"]: r for r in inputs.generation}, heads)
    ref, _ = attribute_accuracy(rows, "reference", inputs.reference_labels, heads)
    notes = []
    if absent:
        notes.append(f"classifier head(s) {', '.join(absent)} name no label column of the generated metric rows: "
                     "no attribute accuracy for them (the batch job carries manifest columns into its metric rows)")
    unlabelled = [h for h in heads if h not in absent and h not in gen]
    if unlabelled:
        notes.append(f"no generated clip has a {'/'.join(unlabelled)} label: no attribute accuracy for it")
    if heads and not ref:
        notes.append("the reference set carries none of the classifier's label columns: no "
                     "reference_attribute_accuracy (a reference Parquet with those columns adds it)")
    return {"attribute_accuracy": gen, "attribute_accuracy_mean": _mean(gen),
            "reference_attribute_accuracy": ref, "reference_attribute_accuracy_mean": _mean(ref)}, notes


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _train_embeddings(rows: pa.Table, clap_uri: str) -> bytes:
    """Training clips' CLAP audio embeddings in the form --train-reference accepts (reuse across runs)."""
    train = rows.filter(pc.and_(pc.equal(rows.column("set"), "train"),
                                        pc.is_valid(rows.column("clap_audio"))))
    table = pa.table({"id": train.column("id"), "embedding": train.column("clap_audio")})
    return _parquet_bytes(table.replace_schema_metadata({"musiccm.clap_model": clap_uri}))


def run_job(config: EvalConfig, use_ray: bool = True) -> int:
    """Run and print; exit code 0 metrics written, 1 no generated clip readable, 2 unusable inputs/weights/output."""
    try:
        result = run(config, use_ray)
    except (ValueError, storage.StorageError, feat.WeightsError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    print(report.summary_text(result), flush=True)
    return EXIT_OK if result["status"] == "ok" else EXIT_FAILED
