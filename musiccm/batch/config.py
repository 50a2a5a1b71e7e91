"""The one configuration of a batch-generation run, saved in `_RUN.json` and `_SUMMARY.json`."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from musiccm import storage
from musiccm.defaults import DEFAULT_MODEL
from musiccm.retry import DEFAULT_BUDGET_S, MAX_BUDGET_S

FORMATS = ("flac", "wav")
DTYPES = ("float32", "float16", "bfloat16")
# Sampling steps: a distilled consistency student (LCMScheduler) is made for few steps; a MusicLDM teacher
# samples with DDIM + classifier-free guidance, at most one step per training timestep.
MAX_STEPS = 8  # distilled student
MAX_TEACHER_STEPS = 1000  # DDIM teacher, and a hub-id model whose kind is known only once an actor loads it
STUDENT_DEFAULT_STEPS, TEACHER_DEFAULT_STEPS = 4, 50  # as musiccm.pipeline.MusicCM.resolve
# Fields that change the audio written for a row: a rerun into the same output must keep them.
FINGERPRINT_FIELDS = ("model", "default_steps", "default_format", "hop_frames", "taper", "max_timestep", "dtype")
_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")
RUN_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
# Upper bounds that stop a typo from allocating the machine away before any work is checked.
MAX_DURATION_S = 3600.0  # one clip
MAX_BATCH = 4096  # clips or windows per call
MAX_ACTORS = 100_000
MAX_SECONDS = 7 * 24 * 3600.0  # any interval flag


@dataclass(frozen=True)
class BatchConfig:
    """Everything a batch run depends on; `ray_jobs/batch_generate.py` flags map 1:1 onto these fields."""

    manifest: str  # Parquet file or prefix of files, local or s3://
    output: str  # directory or s3:// prefix: audio/, metrics/, errors/, _RUN.json, _SUMMARY.json
    run_name: str = ""
    model: str = DEFAULT_MODEL  # MusicLDM-layout directory, s3:// prefix or hub id
    num_actors: int = 1  # one model replica each (one GPU each when the cluster has GPUs)
    # Batches an actor works on at once: one generates (a lock), the others encode and write (1: in series).
    calls_per_actor: int = 2
    batch_size: int = 8  # clips per generate() call for clips up to long_threshold_s
    long_batch_size: int = 1  # clips per call above long_threshold_s (crop fusion, memory ∝ duration)
    long_threshold_s: float = 20.0
    crop_batch_size: int = 8  # crop-fusion windows per UNet call
    hop_frames: int | None = None  # crop-fusion hop in latent frames (None: 3/4 of the window)
    taper: int | None = None  # crop-fusion cross-fade in latent frames (None: the overlap; 0: plain average)
    max_duration: float = 600.0  # longest allowed duration_s; longer rows are rejected
    default_steps: int | None = None  # rows without `steps` (None: the model's, 4 for a student, 50 for a teacher)
    default_format: str = "flac"  # rows without `format`
    max_timestep: int | None = None  # students: highest sampling timestep (None: the model's own, else 999)
    metrics_rows_per_shard: int = 1000
    metrics_flush_s: float = 60.0  # also write a (smaller) shard at least this often
    strict: bool = False  # any rejected row fails the run before generation starts
    device: str | None = None  # None: cuda when the cluster has GPUs, else cpu
    dtype: str = "float32"
    local_files_only: bool = False  # hub ids: never download
    clap_score: bool = True  # CLAP text-audio similarity per clip (needs the model's feature_extractor)
    verify_audio: bool = False  # resume: re-read every finished clip and compare its sha256
    cpus_per_actor: float | None = None  # Ray CPUs per actor (None: a share of the cluster's; see plan_resources)
    torch_threads: int | None = None  # intra-op threads per CPU actor (None: its Ray CPUs)
    no_progress_timeout_s: float | None = None  # Ray Data stall limit (None: max(1800, 60 · max_duration))
    progress_s: float = 10.0  # seconds between progress lines
    storage_retry_s: float = DEFAULT_BUDGET_S  # how long a storage call rides out an outage before the clip fails
    lease_s: float = 120.0  # the output's lease (_OWNER.json) is stale this long after its last renewal
    takeover: bool = False  # take the output from a live owner (which then stops)
    dry_run: bool = False  # check every row and report what would be done; generate and write nothing

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")

        need(bool(self.manifest), "manifest", "a Parquet file or prefix (local path or s3://)")
        need(bool(self.output), "output", "a directory or s3:// prefix")
        for name in ("manifest", "output", "model"):
            storage.check_uri(getattr(self, name))
        need(self.run_name == "" or bool(RUN_NAME_RE.fullmatch(self.run_name)), "run_name",
             "1-128 characters of A-Z a-z 0-9 . _ - not starting with '.' (it names a directory)")
        need(_int_in(self.num_actors, 1, MAX_ACTORS), "num_actors", f"an integer in 1..{MAX_ACTORS}")
        need(_int_in(self.calls_per_actor, 1, 8), "calls_per_actor", "an integer in 1..8 (1: generate, then write)")
        need(_int_in(self.batch_size, 1, MAX_BATCH), "batch_size", f"an integer in 1..{MAX_BATCH}")
        need(_int_in(self.long_batch_size, 1, MAX_BATCH), "long_batch_size", f"an integer in 1..{MAX_BATCH}")
        need(_positive(self.long_threshold_s, MAX_DURATION_S), "long_threshold_s",
             f"seconds in (0, {MAX_DURATION_S:g}]")
        need(_int_in(self.crop_batch_size, 1, MAX_BATCH), "crop_batch_size", f"an integer in 1..{MAX_BATCH}")
        need(self.hop_frames is None or _int_in(self.hop_frames, 1, MAX_BATCH), "hop_frames",
             "an integer ≥ 1 (≤ the native window) or None")
        need(self.taper is None or _int_in(self.taper, 0, MAX_BATCH), "taper",
             "an integer ≥ 0 (≤ half the native window) or None (the windows' overlap)")
        need(_positive(self.max_duration, MAX_DURATION_S), "max_duration", f"seconds in (0, {MAX_DURATION_S:g}]")
        need(self.default_steps is None or (_is_int(self.default_steps) and
                                             1 <= self.default_steps <= MAX_TEACHER_STEPS), "default_steps",
             f"None (the model's default) or an integer in 1..{MAX_STEPS} for a distilled student, "
             f"1..{MAX_TEACHER_STEPS} for a DDIM teacher")
        need(self.default_format in FORMATS, "default_format", " | ".join(FORMATS))
        need(self.max_timestep is None or (_is_int(self.max_timestep) and 0 <= self.max_timestep <= 999),
             "max_timestep", "None (the model's setting) or an integer in 0..999 (distilled students only)")
        need(_int_in(self.metrics_rows_per_shard, 1, 1_000_000), "metrics_rows_per_shard",
             "an integer in 1..1000000")
        need(_positive(self.metrics_flush_s, MAX_SECONDS), "metrics_flush_s", f"seconds in (0, {MAX_SECONDS:g}]")
        need(self.dtype in DTYPES, "dtype", " | ".join(DTYPES))
        need(self.cpus_per_actor is None or _positive(self.cpus_per_actor, 1024), "cpus_per_actor",
             "a number in (0, 1024]")
        need(self.torch_threads is None or _int_in(self.torch_threads, 1, 1024), "torch_threads",
             "an integer in 1..1024")
        need(self.no_progress_timeout_s is None or _positive(self.no_progress_timeout_s, MAX_SECONDS) or
             self.no_progress_timeout_s == -1, "no_progress_timeout_s",
             f"seconds in (0, {MAX_SECONDS:g}], or -1 for no limit")
        need(_positive(self.progress_s, MAX_SECONDS), "progress_s", f"seconds in (0, {MAX_SECONDS:g}]")
        need(_number_in(self.storage_retry_s, 0, MAX_BUDGET_S), "storage_retry_s",
             f"seconds in 0..{MAX_BUDGET_S:g} (0: no retries)")
        need(_number_in(self.lease_s, 10, MAX_SECONDS), "lease_s", f"seconds in 10..{MAX_SECONDS:g}")
        need(isinstance(self.takeover, bool), "takeover", "True or False")
        need(isinstance(self.dry_run, bool), "dry_run", "True or False")

    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BatchConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown BatchConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)

    def fingerprint(self) -> dict:
        """The fields a resumed run must share with the run that started its output."""
        return {name: getattr(self, name) for name in FINGERPRINT_FIELDS}

    @property
    def stall_timeout_s(self) -> float:
        """Ray Data's no-progress limit: long clips can keep an actor busy for many minutes."""
        if self.no_progress_timeout_s is not None:
            return self.no_progress_timeout_s
        return max(1800.0, 60.0 * self.max_duration)


def steps_limit(consistency: bool | None) -> int:
    """Most sampling steps a row may ask for: a student's limit, else a teacher's (also for an unknown kind)."""
    return MAX_STEPS if consistency else MAX_TEACHER_STEPS


def steps_range(max_steps: int) -> str:
    """How a steps limit reads in messages, e.g. `1..8` or `1..1000 for a DDIM teacher`."""
    return f"1..{max_steps}" + (" for a DDIM teacher" if max_steps == MAX_TEACHER_STEPS else "")


def resolve_default_steps(default_steps: int | None, consistency: bool | None) -> int | None:
    """The run's default steps for a kind of model (True: student, False: teacher, None: unknown hub id).

    None becomes the model's default (4 for a student, 50 for a teacher; for an unknown kind it stays None
    and the pipeline picks it once an actor has loaded the model). An explicit value outside the kind's
    limit is a ValueError saying what is allowed.
    """
    if default_steps is None:
        return None if consistency is None else STUDENT_DEFAULT_STEPS if consistency else TEACHER_DEFAULT_STEPS
    limit = steps_limit(consistency)
    if not 1 <= default_steps <= limit:
        kind = {True: "a distilled consistency student", False: "a DDIM teacher", None: "any model"}[consistency]
        default = {True: STUDENT_DEFAULT_STEPS, False: TEACHER_DEFAULT_STEPS, None: "the model's"}[consistency]
        raise ValueError(f"--default-steps {default_steps} is invalid for {kind}; allowed: 1..{limit} "
                         f"(default {default})")
    return default_steps


def default_run_name(manifest: str, model_name: str) -> str:
    """`<manifest stem>-<model name>`, reduced to characters that are safe in any path or key."""
    stem = Path(manifest.rstrip("/")).name.removesuffix(".parquet") or "manifest"
    model = Path(model_name.rstrip("/")).name or "model"
    return _NAME_RE.sub("-", f"{stem}-{model}").strip("-.") or "run"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(value: object, low: int, high: int) -> bool:
    return _is_int(value) and low <= value <= high  # type: ignore[operator]


def _number_in(value: object, low: float, high: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and \
        low <= value <= high


def _positive(value: object, high: float = math.inf) -> bool:
    return _number_in(value, 0, high) and value > 0  # type: ignore[operator]


@dataclass
class Resources:
    """How the actor pool is placed."""

    actors: int
    num_gpus: float
    num_cpus: float
    device: str
    torch_threads: int | None
    notes: list[str] = field(default_factory=list)
    io_threads: int = 4  # per actor: encoding (soundfile releases the GIL), hashing and storage writes


def plan_resources(config: BatchConfig, cluster: dict[str, float],
                   nodes: list[dict[str, float]] | None = None) -> Resources:
    """One GPU per actor when the cluster has GPUs; otherwise CPU actors leaving one Ray CPU for other tasks, each
    with torch threads for its share of a node's cores. `nodes`: each live node's resources (default: the cluster
    as one node)."""
    gpus, cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 1.0)
    nodes = nodes or [cluster]
    wants_gpu = config.device is None or config.device.startswith("cuda")
    notes = []
    if gpus >= 1 and wants_gpu:
        actors = min(config.num_actors, int(gpus))
        if actors < config.num_actors:
            notes.append(f"--num-actors {config.num_actors} > {int(gpus)} GPUs in the cluster: using {actors}")
        # CPUs per GPU actor: its share of its GPU node's, less one for Ray's tasks, 1 to 8 (the smallest GPU node
        # decides, so that every actor can be placed). The actor
        # encodes and writes beside generating, and a GPU at ~2,000x real time makes ~200 clips of 10 s a second
        # (FLAC: ~9 ms of one core each), so a single CPU would cap it; two I/O threads a CPU keep writes waiting
        # on storage from holding up encoding.
        gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= 1] or [cluster]
        share = max(1, min(8, *(math.floor((n.get("CPU", 1) - 1) / n["GPU"]) for n in gpu_nodes if n.get("GPU"))))
        num_cpus = config.cpus_per_actor or share
        return Resources(actors, 1, num_cpus, config.device or "cuda", config.torch_threads, notes,
                         io_threads=max(4, 2 * math.ceil(num_cpus)))
    if config.device is not None and config.device.startswith("cuda"):
        raise ValueError(f"--device {config.device}: the Ray cluster has no GPUs")
    spare = max(cpus - 1, cpus / 2)  # headroom: a pool holding every CPU starves the other tasks and hangs
    actors = max(1, min(config.num_actors, int(spare)))
    if actors < config.num_actors:
        notes.append(f"--num-actors {config.num_actors} needs more than the {cpus:g} CPUs less one: using {actors}")
    share = spare / actors
    num_cpus = config.cpus_per_actor or (math.floor(share) if share >= 1 else round(share, 2))
    # Torch threads: the actor's share of the node's cores, not of the Ray CPUs it reserves. The CPU kept free for
    # Ray's own tasks sits idle while the actors generate (the rows are checked before generation starts), and a
    # 2-core machine would otherwise generate on one core (measured: 0.60x a bare loop with 1 thread; see
    # benchmarks/RESULTS.md, "Batch job throughput").
    smallest = min(n.get("CPU", 1) for n in nodes)
    threads = config.torch_threads or max(1, int(smallest // max(1, math.ceil(actors / len(nodes)))))
    return Resources(actors, 0, num_cpus, config.device or "cpu", threads, notes)
