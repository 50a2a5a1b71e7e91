"""Captioned synthetic music: procedural MIDI rendered with a General MIDI soundfont, labels kept.

Each clip is drawn from a seed: lead instrument, key, mode, tempo, chord progression, drum pattern,
bass line, register and dynamics. A melody over the progression (chord tones on strong beats, scale
steps between), block or broken chords and an optional bass line are played by real soundfont
instruments (pretty_midi's bundled ``TimGM6mb.sf2`` through ``tinysoundfont``) at 16 kHz mono. The
caption is written from the parameters in varied phrasing; the parameters stay as labels, so a
classifier can check what a generated clip contains. Everything is deterministic from the seed.

:func:`write_dataset` writes FLAC files and a Parquet manifest in the distillation job's format
(``uri``, ``caption`` + label columns); :func:`write_prompts` writes a batch-generation manifest
(``id``, ``prompt``, ``duration_s`` + labels) of held-out prompts.
"""

from __future__ import annotations

import functools
import io
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
DRUM_CHANNEL = 9
# (label, GM program, caption names). Chosen for distinct timbres in TimGM6mb.
INSTRUMENTS: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("piano", 0, ("piano", "acoustic piano", "grand piano")),
    ("organ", 19, ("church organ", "pipe organ", "organ")),
    ("guitar", 24, ("nylon guitar", "acoustic guitar", "classical guitar")),
    ("violin", 40, ("violin", "solo violin", "fiddle")),
    ("trumpet", 56, ("trumpet", "solo trumpet", "brass trumpet")),
    ("flute", 73, ("flute", "wooden flute", "solo flute")),
    ("marimba", 12, ("marimba", "mallet marimba", "wooden marimba")),
    ("synth", 80, ("synth lead", "square-wave synth", "retro synthesizer")),
)
INSTRUMENT_NAMES = tuple(name for name, _, _ in INSTRUMENTS)
TEMPOS = {"slow": (62, 80), "medium": (96, 116), "fast": (136, 160)}
TEMPO_WORDS = {"slow": ("slow", "unhurried", "relaxed"), "medium": ("mid-tempo", "moderate", "steady"),
               "fast": ("fast", "quick", "lively")}
MODES = ("major", "minor")
MODE_WORDS = {"major": ("bright", "happy", "cheerful"), "minor": ("dark", "sad", "melancholic")}
DRUMS = ("none", "rock", "dance")
DRUM_PHRASES = {"none": ("without drums", "with no percussion", "with no drums"),
                "rock": ("with a rock drum beat", "over a backbeat of kick and snare", "with rock drums"),
                "dance": ("with a four-on-the-floor dance beat", "over a driving dance beat", "with dance drums")}
REGISTERS = {"low": 48, "mid": 60, "high": 72}
DYNAMICS = {"soft": (48, 66), "loud": (92, 116)}
KEYS = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
# Progressions as scale degrees (0-based) of the chord roots, one chord per bar.
PROGRESSIONS = {"major": ((0, 4, 5, 3), (0, 3, 4, 3), (0, 5, 3, 4), (0, 3, 0, 4)),
                "minor": ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 4), (0, 3, 6, 2))}
LABELS = ("instrument", "tempo", "mode", "drums")  # the attributes a classifier predicts
CLASSES = {"instrument": INSTRUMENT_NAMES, "tempo": tuple(TEMPOS), "mode": MODES, "drums": DRUMS}


@dataclass(frozen=True)
class MusicParams:
    """Everything that decides one clip; also its labels."""

    instrument: str
    tempo: str  # "slow" | "medium" | "fast"
    bpm: int
    mode: str
    key: int  # 0 = C
    progression: int  # index into PROGRESSIONS[mode]
    drums: str  # "none" | "rock" | "dance"
    bass: bool
    register: str
    dynamics: str
    phrasing: int  # which caption template (caption variety)

    @property
    def key_name(self) -> str:
        return KEYS[self.key]


def sample_params(rng: np.random.Generator) -> MusicParams:
    """Draw one clip's parameters (uniform over the label classes)."""
    tempo = str(rng.choice(list(TEMPOS)))
    lo, hi = TEMPOS[tempo]
    mode = str(rng.choice(MODES))
    return MusicParams(
        instrument=str(rng.choice(INSTRUMENT_NAMES)),
        tempo=tempo,
        bpm=int(rng.integers(lo, hi + 1)),
        mode=mode,
        key=int(rng.integers(0, 12)),
        progression=int(rng.integers(0, len(PROGRESSIONS[mode]))),
        drums=str(rng.choice(DRUMS)),
        bass=bool(rng.random() < 0.5),
        register=str(rng.choice(list(REGISTERS))),
        dynamics=str(rng.choice(list(DYNAMICS))),
        phrasing=int(rng.integers(0, 1 << 30)),
    )


def caption(p: MusicParams) -> str:
    """A natural-language caption that names instrument, tempo, mode and drums (and sometimes more)."""
    rng = np.random.default_rng(p.phrasing)

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(0, len(options)))]

    inst = pick(dict((n, names) for n, _, names in INSTRUMENTS)[p.instrument])
    tempo = pick(TEMPO_WORDS[p.tempo])
    mood = pick(MODE_WORDS[p.mode])
    drums = pick(DRUM_PHRASES[p.drums])
    bass = ", plus a bass line" if p.bass else ""
    key = f"{p.key_name} {p.mode}"
    templates = (
        f"a {tempo} {mood} {inst} piece in {key} {drums}{bass}",
        f"{inst} melody at a {tempo} pace around {p.bpm} bpm, {p.mode} key, {drums}",
        f"{mood} music played on {inst}, {tempo}, {drums}{bass}",
        f"a {p.dynamics} {tempo} tune in {key} on the {inst} {drums}",
        f"{tempo} {p.mode} {inst} song at {p.bpm} bpm {drums}{bass}",
        f"{drums.removeprefix('with ').removeprefix('over ')}, {inst} playing a {mood} {tempo} melody",
    )
    return pick(templates)


def _melody(p: MusicParams, rng: np.random.Generator, bars: int) -> list[tuple[float, float, int]]:
    """(start beat, length in beats, pitch) of the lead melody: chord tones on beats, scale steps between."""
    scale = SCALES[p.mode]
    base = REGISTERS[p.register] + p.key
    prog = PROGRESSIONS[p.mode][p.progression]
    notes: list[tuple[float, float, int]] = []
    degree = 0
    for bar in range(bars):
        root = prog[bar % len(prog)]
        beat = 0.0
        while beat < 4.0:
            length = float(rng.choice([0.5, 1.0, 1.0, 2.0] if p.tempo != "fast" else [0.5, 1.0]))
            length = min(length, 4.0 - beat)
            if beat == int(beat):  # strong position: a chord tone of this bar's chord
                degree = root + int(rng.choice([0, 2, 4]))
            else:
                degree += int(rng.choice([-1, 1]))
            octave, step = divmod(degree, 7)
            notes.append((bar * 4 + beat, length, base + 12 * octave + scale[step]))
            beat += length
    return notes


def _events(p: MusicParams, rng: np.random.Generator, seconds: float) -> list[tuple[float, int, int, int, int]]:
    """Sorted (time s, kind 1=on/0=off, channel, key, velocity) for the whole clip."""
    spb = 60.0 / p.bpm
    bars = int(np.ceil(seconds / (4 * spb))) + 1
    vlo, vhi = DYNAMICS[p.dynamics]
    scale = SCALES[p.mode]
    prog = PROGRESSIONS[p.mode][p.progression]
    ev: list[tuple[float, int, int, int, int]] = []

    def note(ch: int, beat: float, length: float, key: int, vel: int) -> None:
        t0 = beat * spb
        if t0 < seconds:
            ev.append((t0, 1, ch, int(np.clip(key, 0, 127)), int(np.clip(vel, 1, 127))))
            ev.append((t0 + 0.95 * length * spb, 0, ch, int(np.clip(key, 0, 127)), 0))

    for start, length, key in _melody(p, rng, bars):  # channel 0: lead melody
        note(0, start, length, key, int(rng.integers(vlo, vhi + 1)))
    chord_base = REGISTERS[p.register] - 12 + p.key
    for bar in range(bars):  # channel 1: chords on the same instrument, softer
        root = prog[bar % len(prog)]
        tones = [chord_base + 12 * ((root + d) // 7) + scale[(root + d) % 7] for d in (0, 2, 4)]
        vel = int(0.6 * rng.integers(vlo, vhi + 1))
        if p.instrument in ("piano", "guitar", "marimba"):  # broken chords on eighths
            for i in range(8):
                note(1, bar * 4 + i / 2, 0.5, tones[i % 3], vel)
        else:  # sustained block chord, re-struck every half bar
            for half in (0, 2):
                for k in tones:
                    note(1, bar * 4 + half, 2.0, k, vel)
        if p.bass:  # channel 2: root on beats 1 and 3 (and 4 when fast)
            bass = 36 + p.key + scale[root % 7]
            for b in (0, 2, 3) if p.tempo == "fast" else (0, 2):
                note(2, bar * 4 + b, 1.0, bass, int(rng.integers(vlo, vhi + 1)))
        if p.drums != "none":  # channel 9: GM drum kit
            for i in range(8):
                beat = bar * 4 + i / 2
                hat_vel = 70 if i % 2 else 90
                if p.drums == "rock":
                    if i in (0, 4, 5):
                        note(DRUM_CHANNEL, beat, 0.5, 36, 110)  # kick
                    if i in (2, 6):
                        note(DRUM_CHANNEL, beat, 0.5, 38, 105)  # snare
                    note(DRUM_CHANNEL, beat, 0.5, 42, hat_vel)  # closed hat
                else:
                    if i % 2 == 0:
                        note(DRUM_CHANNEL, beat, 0.5, 36, 115)  # kick on every beat
                    else:
                        note(DRUM_CHANNEL, beat, 0.5, 46, 85)  # open hat off the beat
                    if i in (2, 6):
                        note(DRUM_CHANNEL, beat, 0.5, 39, 100)  # hand clap
    ev.sort(key=lambda e: (e[0], e[1]))
    return ev


@functools.lru_cache(maxsize=1)
def soundfont_path() -> str:
    """pretty_midi's bundled General MIDI soundfont (TimGM6mb.sf2, from the package registry)."""
    import pretty_midi

    path = os.path.join(os.path.dirname(pretty_midi.__file__), "TimGM6mb.sf2")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"General MIDI soundfont not found at {path}; reinstall pretty_midi")
    return path


def render(p: MusicParams, seconds: float, seed: int, sample_rate: int = SAMPLE_RATE,
           random_start: bool = True) -> np.ndarray:
    """Render one clip (float32 mono, exactly round(seconds · sample_rate) samples, peak ≤ 0.9)."""
    import tinysoundfont

    rng = np.random.default_rng(seed)
    synth = tinysoundfont.Synth(samplerate=sample_rate, gain=-9.0)
    sfid = synth.sfload(soundfont_path())
    program = dict((n, prog) for n, prog, _ in INSTRUMENTS)[p.instrument]
    synth.program_select(0, sfid, 0, program)
    synth.program_select(1, sfid, 0, program)
    synth.program_select(2, sfid, 0, 32)  # acoustic bass
    synth.program_select(DRUM_CHANNEL, sfid, 128, 0, True)  # standard kit
    total = round(seconds * sample_rate)
    out = np.zeros((total, 2), dtype=np.float32)
    # Start somewhere in the first four bars (the excerpt does not always begin on a downbeat); notes
    # struck before the excerpt's start are skipped.
    offset = float(rng.uniform(0.0, 16 * 60.0 / p.bpm)) if random_start else 0.0
    events = [(t - offset, *e) for t, *e in _events(p, rng, seconds + offset) if t >= offset]
    pos = 0
    for t, kind, ch, key, vel in events + [(seconds, -1, 0, 0, 0)]:
        until = min(round(t * sample_rate), total)
        if until > pos:
            buf = synth.generate_simple(until - pos)
            out[pos:until] = np.frombuffer(buf, dtype=np.float32).reshape(-1, 2)
            pos = until
        if kind == 1:
            synth.noteon(ch, key, vel)
        elif kind == 0:
            synth.noteoff(ch, key)
    mono = out.mean(axis=1)
    peak = float(np.abs(mono).max())
    return (mono * (0.9 / peak) if peak > 0.9 else mono).astype(np.float32)


def clip(index: int, seed: int) -> tuple[MusicParams, str]:
    """Parameters and caption of clip ``index`` of the data set with ``seed`` (independent of other clips)."""
    rng = np.random.default_rng([seed, index])
    params = sample_params(rng)
    return params, caption(params)


def render_seed(index: int, seed: int) -> int:
    """The seed of clip ``index``'s note choices (melody rhythm and velocities)."""
    return int(np.random.SeedSequence([seed, index, 1]).generate_state(1)[0])


def flac_bytes(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit FLAC of a mono float waveform."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def rows(start: int, count: int, seed: int) -> list[dict]:
    """Label rows (``id``, ``caption`` and every parameter) of clips start .. start+count-1."""
    out = []
    for i in range(start, start + count):
        params, text = clip(i, seed)
        out.append({"id": f"syn-{seed}-{i:06d}", "caption": text, **asdict(params), "key_name": params.key_name})
    return out


def _render_file(path: str, params: MusicParams, seconds: float, seed: int) -> None:
    """Render one clip to ``path`` as FLAC, through a temporary file so an interrupted run leaves no partial one."""
    target = Path(path)
    tmp = target.with_suffix(".flac.tmp")
    tmp.write_bytes(flac_bytes(render(params, seconds, seed=seed)))
    os.replace(tmp, target)


def _available_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells it, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Below this many clips to render, starting worker processes (each imports numpy and loads the soundfont) costs
# more than it saves: a 2.56 s clip renders in about 25 ms.
_MIN_CLIPS_FOR_WORKERS = 64


def write_dataset(directory: str | os.PathLike, count: int, seed: int = 0, seconds: float = 10.24,
                  start: int = 0, workers: int | None = None) -> str:
    """Render ``count`` clips to ``{directory}/audio/*.flac`` and write ``{directory}/manifest.parquet``.

    The manifest is the distillation job's format: ``uri`` (absolute path), ``caption``, plus ``id`` and
    the label columns (ignored by the job). Clips already on disk are kept (a rerun continues an interrupted
    one). On Linux ``workers`` processes render the clips (default: every CPU this process may use; 1 = in this
    process; elsewhere always in this process); each clip has its own seed, so the files are the same whatever the
    number. Returns the manifest path.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    workers = _available_cpus() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    root = Path(directory).resolve()
    (root / "audio").mkdir(parents=True, exist_ok=True)
    table = rows(start, count, seed)
    jobs = []
    for i, row in enumerate(table):
        path = root / "audio" / f"{row['id']}.flac"
        row["uri"] = str(path)
        if not path.exists():
            params = MusicParams(**{k: row[k] for k in MusicParams.__dataclass_fields__})
            jobs.append((str(path), params, seconds, render_seed(start + i, seed)))
    if workers == 1 or len(jobs) < _MIN_CLIPS_FOR_WORKERS or not sys.platform.startswith("linux"):
        for job in jobs:
            _render_file(*job)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # "fork" (Linux only): "spawn" would re-run the caller's main script in every worker, which breaks scripts
        # without an ``if __name__ == "__main__"`` guard. The children only render (tinysoundfont, numpy, soundfile)
        # and never touch the threads (torch, Ray) the parent may hold.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            list(pool.map(_render_file, *zip(*jobs, strict=True), chunksize=max(1, len(jobs) // (8 * workers))))
    manifest = root / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(table), manifest)
    return str(manifest)


def write_prompts(path: str | os.PathLike, count: int, seed: int, duration_s: float | None = None,
                  start: int = 0) -> str:
    """A batch-generation manifest of ``count`` captions (``id``, ``prompt``, labels; ``duration_s`` if given)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = rows(start, count, seed)
    for row in table:
        row["prompt"] = row.pop("caption")
        if duration_s is not None:
            row["duration_s"] = float(duration_s)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(table), path)
    return str(path)
