"""Write examples/prompts.parquet: the demo manifest of `ray_jobs/batch_generate.py`.

Prompts in the embedded demo model's vocabulary (it was trained on synthetic soundfont music: piano, organ,
guitar, violin, trumpet, flute, marimba or synth lead; slow, mid-tempo or fast; major or minor; no drums, a
rock beat or a dance beat; see recipes/demo). A dozen short clips (the model's native 2.56 s window when
`duration_s` is null, or 5 s / 10.24 s by crop fusion) and three minute-long ones (30, 45 and 60 s). Optional
columns are filled on some rows only: a missing seed is derived from the id, missing steps/format take the
run's defaults. The label columns (`instrument`, `tempo`, `mode`, `drums`) are not manifest columns: they are
carried through to the metric rows, where `ray_jobs/evaluate.py --classifier` checks them.

    python examples/make_prompts.py [--out examples/prompts.parquet]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# (id, prompt, instrument, tempo, mode, drums)
SHORT = [
    ("slow-piano", "a slow sad piano piece without drums", "piano", "slow", "minor", "none"),
    ("rock-trumpet", "fast trumpet melody with a rock drum beat", "trumpet", "fast", "major", "rock"),
    ("dance-synth", "a lively synth lead in a major key with a four-on-the-floor dance beat", "synth", "fast",
     "major", "dance"),
    ("calm-flute", "a calm flute tune in a major key with no percussion", "flute", "slow", "major", "none"),
    ("organ-hymn", "a slow church organ piece in a minor key, without drums", "organ", "slow", "minor", "none"),
    ("guitar-rock", "mid-tempo acoustic guitar song with rock drums and a bass line", "guitar", "medium", "major",
     "rock"),
    ("violin-dance", "a fast violin melody over a driving dance beat", "violin", "fast", "minor", "dance"),
    ("marimba-happy", "a cheerful mid-tempo marimba tune with no drums", "marimba", "medium", "major", "none"),
    ("dark-synth", "a dark slow square-wave synth melody with a rock drum beat", "synth", "slow", "minor", "rock"),
    ("piano-dance", "a happy fast piano piece with a four-on-the-floor dance beat", "piano", "fast", "major",
     "dance"),
    ("trumpet-ballad", "a slow melancholic solo trumpet in a minor key without drums", "trumpet", "slow", "minor",
     "none"),
    ("flute-rock", "a bright mid-tempo flute melody with rock drums", "flute", "medium", "major", "rock"),
]
LONG = [
    ("marimba-30s", "a lively marimba tune in a major key with a dance beat", "marimba", "fast", "major", "dance",
     30.0),
    ("guitar-45s", "a relaxed classical guitar piece in a minor key with no percussion", "guitar", "slow", "minor",
     "none", 45.0),
    ("organ-rock-60s", "a steady church organ melody over a rock drum beat", "organ", "medium", "major", "rock",
     60.0),
]
LABELS = ("instrument", "tempo", "mode", "drums")


def build() -> pa.Table:
    """The demo manifest as a table (ids, prompts, optional columns, carried-through label columns)."""
    rows = []
    for i, (clip_id, prompt, *labels) in enumerate(SHORT):
        rows.append({
            "id": clip_id,
            "prompt": prompt,
            "duration_s": [None, 5.0, 10.24][i % 3],  # null: the model's native window
            "seed": i if i % 2 == 0 else None,  # null: derived from the id
            "steps": 2 if i % 4 == 3 else None,  # null: --default-steps
            "format": "wav" if i == 11 else None,  # null: --default-format
            **dict(zip(LABELS, labels, strict=True)),
        })
    for clip_id, prompt, *labels, duration in LONG:
        rows.append({"id": clip_id, "prompt": prompt, "duration_s": duration, "seed": 7, "steps": None,
                     "format": None, **dict(zip(LABELS, labels, strict=True))})
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("duration_s", pa.float64()),
                        ("seed", pa.int64()), ("steps", pa.int64()), ("format", pa.string()),
                        *((name, pa.string()) for name in LABELS)])
    return pa.Table.from_pylist(rows, schema=schema)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("prompts.parquet")), help="output Parquet file")
    args = parser.parse_args(argv)
    table = build()
    pq.write_table(table, args.out)
    print(f"wrote {table.num_rows} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
