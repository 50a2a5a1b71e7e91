"""Quality benchmark of the demo world, laid out like MusicCM Table 1: teacher vs distilled student.

Rows: the teacher with 50-step DDIM + CFG, the teacher with 4-step DDIM + CFG, the student with 1, 2, 4 and 6
consistency steps (first timestep ``--max-timestep``), the student with LCM's own timesteps from t = 999 (1 and
4 steps), and (``--student-noadv``) the "w/o L_adv" ablation. Each row is one run of the real jobs:
``ray_jobs/batch_generate.py`` on the held-out prompts, then ``ray_jobs/evaluate.py --classifier`` against the
held-out reference clips (the same prompts rendered by the soundfont), so FD/KID use the label classifier's
embedding, IS/KL its instrument logits, and attribute accuracy its heads; CLAP is the model's own. Latency is
one clip at batch size 1 in this process (median of ``--latency-runs``), as the paper's seconds per clip.

One noise draw per prompt measures FD on 256 clips to within about a point; ``--draws N`` runs every row N times
with different noise (draw 0: the seeds the batch job derives from the prompt ids; draw d: seeds derived from
``{id}/draw-{d}``), and the table then shows each metric's mean over the draws, FD_cls as mean ± standard
deviation, with a second table of every draw's FD_cls.

The issue's targets (4 steps: FD_cls within 10 % and attribute accuracy within 3 points of the 50-step teacher's;
1 step: FD_cls below the teacher's 4-step DDIM) are judged for each pair of rows that ran, on the clips pooled over
the draws, with 95 % intervals from a bootstrap over the prompts (``--bootstrap``; see ``targets.py``): a second
noise draw does not show how much FD_cls moves when the prompts and their reference clips are drawn again.

    python benchmarks/quality.py --write            # the demo's outputs/demo/{teacher,student,...}
    python benchmarks/quality.py --limit 8 --configs teacher-ddim4 student-1   # a quick subset
    python benchmarks/quality.py --configs teacher-ddim4 student-1 --draws 5     # FD's spread over noise draws
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from report import header, publish
from targets import draw_label, judge
from targets import table as targets_table

from musiccm.batch.manifest import derive_seed

ROOT = Path(__file__).resolve().parents[1]
# (label, which model, steps, first-timestep rule, row name). The teacher rows sample with classifier-free guidance
# --teacher-guidance (default 3.0 = the w = 2 the student was distilled with, diffusers convention), so they show
# what the student imitates. The rule "max" = --max-timestep (students), "lcm" = LCMScheduler's own
# timesteps from t = 999, None = DDIM (teacher).
CONFIGS = (
    ("teacher-ddim50", "teacher", 50, None, "Teacher (DDIM + CFG)"),
    ("teacher-ddim4", "teacher", 4, None, "Teacher (DDIM + CFG)"),
    ("student-1", "student", 1, "max", "Student (MusicCM)"),
    ("student-2", "student", 2, "max", "Student (MusicCM)"),
    ("student-4", "student", 4, "max", "Student (MusicCM)"),
    ("student-6", "student", 6, "max", "Student (MusicCM)"),
    ("student-1-t999", "student", 1, "lcm", "Student, LCM timesteps from t=999"),
    ("student-4-t999", "student", 4, "lcm", "Student, LCM timesteps from t=999"),
    ("noadv-1", "student_noadv", 1, "max", "Student w/o L_adv"),
    ("noadv-2", "student_noadv", 2, "max", "Student w/o L_adv"),
    ("noadv-4", "student_noadv", 4, "max", "Student w/o L_adv"),
    ("noadv-6", "student_noadv", 6, "max", "Student w/o L_adv"),
)
LABEL_HEADS = ("instrument", "tempo", "mode", "drums")


def _row_name(which: str) -> str:
    """CONFIGS' row name of a model's rows at its own first timestep (rule "max")."""
    return next(name for _, w, _, rule, name in CONFIGS if w == which and rule == "max")


def parse(argv: list[str] | None) -> argparse.Namespace:
    demo = "outputs/demo"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=f"{demo}/teacher", help="teacher model directory (default %(default)s)")
    p.add_argument("--student", default=f"{demo}/student", help="distilled student directory (default %(default)s)")
    p.add_argument("--student-noadv", default=f"{demo}/student-noadv",
                   help="student distilled with --adv-weight 0 (its rows are skipped if missing; default %(default)s)")
    p.add_argument("--student-name", default=None,
                   help=f"row name of --student's rows in the table (default: {_row_name('student')!r})")
    p.add_argument("--student-noadv-name", default=None,
                   help=f"row name of --student-noadv's rows (default: {_row_name('student_noadv')!r})")
    p.add_argument("--prompts", default=f"{demo}/data/heldout/prompts.parquet",
                   help="held-out prompts with label columns (default %(default)s)")
    p.add_argument("--reference", default=f"{demo}/data/heldout/manifest.parquet",
                   help="held-out reference clips: manifest with id, uri, caption (default %(default)s)")
    p.add_argument("--classifier", default=f"{demo}/classifier", help="label classifier (default %(default)s)")
    p.add_argument("--out", default="outputs/quality", help="work directory (default %(default)s)")
    p.add_argument("--configs", nargs="+", default=[c[0] for c in CONFIGS], choices=[c[0] for c in CONFIGS],
                   help="rows to run (default: all)")
    p.add_argument("--teacher-guidance", type=float, default=3.0,
                   help="the teacher rows' classifier-free guidance scale (diffusers convention, = w + 1 of the "
                        "distillation; default %(default)s, the w = 2 of recipes/demo/distill.sh)")
    p.add_argument("--max-timestep", type=int, default=None,
                   help="students' highest sampling timestep for the rows that use it (default: each model's own "
                        "setting in model_index.json, else 999); the *-t999 rows always start at 999")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--batch-size", type=int, default=16, help="batch job --batch-size (default %(default)s)")
    p.add_argument("--latency-runs", type=int, default=5, help="timed single-clip runs per row (default 5)")
    p.add_argument("--draws", type=int, default=1,
                   help="noise draws per row: each row is generated and evaluated this many times with different "
                        "seeds (draw 0 = the seeds derived from the prompt ids) and reported as the mean, FD_cls "
                        "with its standard deviation (default %(default)s)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples of the prompts for the targets' 95 %% intervals (0 = estimates only; "
                        "default %(default)s)")
    p.add_argument("--reuse", action="store_true",
                   help="keep a row's generations and evaluation from an earlier run into the same --out when its "
                        "model files, settings and prompts are unchanged (latency is always measured again)")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--title", default="Demo quality (Table 1 layout): teacher vs distilled student",
                   help="title of the RESULTS.md section (default: %(default)s)")
    args = p.parse_args(argv)
    if not (math.isfinite(args.teacher_guidance) and args.teacher_guidance >= 1):
        p.error(f"--teacher-guidance must be a finite number >= 1 (1 = no guidance), got {args.teacher_guidance}")
    if args.draws < 1:
        p.error(f"--draws must be an integer >= 1, got {args.draws}")
    if args.bootstrap < 0:
        p.error(f"--bootstrap must be an integer >= 0, got {args.bootstrap}")
    return args


def run(cmd: list[str]) -> None:
    """Run a job script like a user would; fail loudly with its output."""
    print("+", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
        raise SystemExit(f"{cmd[1]} failed with exit code {r.returncode}")


def inputs(args: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    """The prompt manifest (limited) and a reference Parquet in evaluate.py's form (id, audio_uri, caption, labels)."""
    prompts = pq.read_table(args.prompts)
    ref = pq.read_table(args.reference)
    if args.limit:
        prompts = prompts.slice(0, args.limit)
        ref = ref.filter(pc.is_in(ref["id"], prompts["id"]))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(prompts, out / "prompts.parquet")
    ref = ref.rename_columns(["audio_uri" if n == "uri" else n for n in ref.column_names])
    pq.write_table(ref, out / "reference.parquet")
    return out / "prompts.parquet", out / "reference.parquet"


def latency(model_dir: str, steps: int, guidance: float | None, max_t: int | None, runs: int) -> float:
    """Median seconds for one native-length clip at batch size 1 (after one warm-up)."""
    from musiccm import model
    from musiccm.pipeline import GenerationConfig, MusicCM

    gen = MusicCM(model.load(model_dir), GenerationConfig(steps=steps, guidance_scale=guidance, max_timestep=max_t))
    duration = gen.c.geometry.native_duration
    gen.generate(["warm-up"], duration, [0])
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        gen.generate(["a calm piano piece"], duration, [i + 1])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def draw_manifest(prompts: Path, out: Path, label: str, guidance: float | None, draw: int) -> Path:
    """The prompts as the batch job gets them for one row and draw: the teacher's guidance scale as a column, and
    for draw d > 0 a seed column derived from ``{id}/draw-{d}`` (draw 0 leaves the job to derive seeds from ids)."""
    if guidance is None and draw == 0:
        return prompts
    table = pq.read_table(prompts)
    if guidance is not None:
        table = table.append_column("guidance_scale", pa.array([guidance] * table.num_rows, pa.float64()))
    if draw:
        seeds = pa.array([derive_seed(f"{i}/draw-{draw}") for i in table["id"].to_pylist()], pa.int64())
        if "seed" in table.column_names:
            table = table.drop_columns(["seed"])
        table = table.append_column("seed", seeds)
    manifest = out / f"prompts-{label}.parquet"
    pq.write_table(table, manifest)
    return manifest


def one_row(args: argparse.Namespace, label: str, model_dir: str, steps: int, guidance: float | None, max_t: int | None,
            prompts: Path, ref: Path, out: Path, draw: int = 0) -> dict:
    """Generate and evaluate one configuration (one noise draw, named ``label``); returns its metrics.json."""
    manifest = draw_manifest(prompts, out, label, guidance, draw)
    gen_dir, eval_dir = out / "gen" / label, out / "eval" / label
    key, key_file = row_key(model_dir, steps, guidance, max_t, manifest), eval_dir / "row-key.json"
    if args.reuse and (eval_dir / "metrics.json").exists() and key_file.exists() \
            and json.loads(key_file.read_text()) == key:
        print(f"reusing {label}: {eval_dir}/metrics.json was made from the same model, settings and prompts",
              flush=True)
    else:
        if key_file.exists() and json.loads(key_file.read_text()) != key:
            # This --out holds the row from another model, sampler or prompt set; the batch job would refuse to mix
            # the two (it resumes only identical runs), so the row starts afresh.
            print(f"replacing {label}: {gen_dir} and {eval_dir} were made from another model, settings or prompts",
                  flush=True)
            shutil.rmtree(gen_dir, ignore_errors=True)
            shutil.rmtree(eval_dir, ignore_errors=True)
        py = sys.executable
        run([py, "ray_jobs/batch_generate.py", "--manifest", str(manifest), "--output", str(gen_dir), "--model",
             model_dir, "--default-steps", str(steps), "--batch-size", str(args.batch_size), "--progress-s", "60",
             *(["--max-timestep", str(max_t)] if max_t is not None else [])])
        run([py, "ray_jobs/evaluate.py", "--generated", str(gen_dir), "--reference", str(ref), "--out",
             str(eval_dir), "--classifier", args.classifier, "--table", str(out / "table.md"), "--label", label,
             "--progress-s", "60"])
        key_file.write_text(json.dumps(key, indent=2))
    return json.loads((eval_dir / "metrics.json").read_text())


def mean_over_draws(draws: list[dict]) -> dict:
    """The first draw's metrics.json with every metric and accuracy replaced by its mean over ``draws``, the
    draws' FD_cls kept as ``fd_cls_draws`` (and their standard deviation, with two or more)."""
    def mean(key: str, sub: str | None = None) -> Any:
        vals = [(d.get(sub) or {}).get(key) if sub else d.get(key) for d in draws]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        return statistics.fmean(vals) if numeric else vals[0]

    row = dict(draws[0])
    row["metrics"] = {k: mean(k, "metrics") for k in draws[0].get("metrics", {})}
    row["attribute_accuracy"] = {k: mean(k, "attribute_accuracy") for k in draws[0].get("attribute_accuracy") or {}}
    row["attribute_accuracy_mean"] = mean("attribute_accuracy_mean")
    fd = [d["metrics"].get("frechet_distance_cls") for d in draws]
    if None not in fd:
        row["fd_cls_draws"] = fd
        row["fd_cls_std"] = statistics.stdev(fd) if len(fd) > 1 else None
    row["draws"] = len(draws)
    return row


def row_key(model_dir: str, steps: int, guidance: float | None, max_t: int | None, manifest: Path) -> dict:
    """What a row's generations depend on: the model's weights and index, the sampler settings, the prompts."""
    digest = hashlib.sha256()
    for f in sorted(Path(model_dir).rglob("*")):
        if f.is_file() and (f.suffix in (".safetensors", ".json")):
            digest.update(f.relative_to(model_dir).as_posix().encode() + f.read_bytes())
    rows = json.dumps(pq.read_table(manifest).to_pylist(), default=str).encode()
    return {"model": model_dir, "model_sha256": digest.hexdigest(), "steps": steps, "guidance": guidance,
            "max_timestep": max_t, "prompts_sha256": hashlib.sha256(rows).hexdigest()}


def fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def table(rows: dict[str, dict]) -> str:
    """Markdown table laid out like MusicCM Table 1, plus attribute accuracy and CLAP."""
    head = ("| model | steps | FD_cls ↓ | KID_cls ↓ | IS_cls ↑ | KL_cls ↓ | acc instrument / tempo / mode / drums ↑ | "
            "acc mean ↑ | CLAP ↑ | latency s/clip ↓ |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for m in rows.values():
        v = m.get("metrics", m)
        acc = m.get("attribute_accuracy") or {}
        accs = " / ".join(f"{100 * acc[h]:.1f}" if h in acc else "–" for h in LABEL_HEADS)
        mean = m.get("attribute_accuracy_mean")
        fd = fmt(v.get("frechet_distance_cls"))
        if m.get("fd_cls_std") is not None:
            fd += f" ± {m['fd_cls_std']:.2f}"
        lines.append(f"| {m['name']} | {m['steps']} | {fd} | "
                     f"{fmt(v.get('kernel_inception_distance_cls_mean'), 4)} | "
                     f"{fmt(v.get('inception_score_cls_mean'))} | "
                     f"{fmt(v.get('kullback_leibler_divergence_cls_softmax'))} | {accs} | "
                     f"{fmt(None if mean is None else 100 * mean, 1)} | {fmt(v.get('clap_text_audio_mean'), 3)} | "
                     f"{m['latency_s']:.3f} |")
    return head + "\n".join(lines) + "\n"


def draws_table(rows: dict[str, dict]) -> str:
    """Every draw's FD_cls per row (rows of a run with ``--draws`` > 1)."""
    n = max(len(m.get("fd_cls_draws", [])) for m in rows.values())
    head = ("| model | steps | " + " | ".join(f"draw {d}" for d in range(n)) + " | mean ± sd |\n|---|---|"
            + "---|" * (n + 1) + "\n")
    lines = [f"| {m['name']} | {m['steps']} | " + " | ".join(f"{x:.2f}" for x in m["fd_cls_draws"])
             + f" | {statistics.fmean(m['fd_cls_draws']):.2f} ± {m['fd_cls_std']:.2f} |"
             for m in rows.values() if m.get("fd_cls_std") is not None]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    prompts, ref = inputs(args, out)
    models = {"teacher": args.teacher, "student": args.student, "student_noadv": args.student_noadv}
    rows: dict[str, dict] = {}
    draw_dirs: dict[str, list[Path]] = {}
    for label, which, steps, rule, name in CONFIGS:
        if label not in args.configs:
            continue
        if not os.path.isdir(models[which]):
            print(f"skipping {label}: {models[which]} does not exist", flush=True)
            continue
        max_t = {"max": args.max_timestep, "lcm": 999, None: None}[rule]
        guidance = args.teacher_guidance if which == "teacher" else None
        draw_labels = [draw_label(label, d) for d in range(args.draws)]
        draws = [one_row(args, dl, models[which], steps, guidance, max_t, prompts, ref, out, d)
                 for d, dl in enumerate(draw_labels)]
        draw_dirs[label] = [out / "eval" / dl for dl in draw_labels]
        metrics = mean_over_draws(draws)
        metrics["latency_s"] = latency(models[which], steps, guidance, max_t, args.latency_runs)
        renamed = {"student": args.student_name, "student_noadv": args.student_noadv_name}.get(which)
        if renamed and rule == "max":
            name = renamed
        rows[label] = {**metrics, "steps": steps, "name": name, "max_timestep": max_t}
        (out / "rows.json").write_text(json.dumps(rows, indent=2, default=str))
    targets = judge(draw_dirs, prompts, list(LABEL_HEADS), args.bootstrap)
    (out / "targets.json").write_text(json.dumps(targets, indent=2))
    reference = next(iter(rows.values()), {}).get("reference_attribute_accuracy")
    first = args.max_timestep if args.max_timestep is not None else "each model's own setting"
    text = (header(args.title, "quality.py", argv)
            + f"{pq.read_metadata(prompts).num_rows} held-out prompts, native 2.56 s clips; latency: one clip at "
            f"batch size 1 in this process; teacher rows' guidance scale {args.teacher_guidance:g}; student rows' "
            f"first timestep: {first} unless named"
            + (f"; every metric the mean over {args.draws} noise draws per prompt, FD_cls ± its standard deviation "
               f"over the draws" if args.draws > 1 else "") + "\n\n"
            f"{table(rows)}\n" + (f"FD_cls ↓ of each draw:\n\n{draws_table(rows)}\n" if args.draws > 1 else "")
            + (f"Targets, on each row's clips pooled over its draws, 95 % intervals from {args.bootstrap} bootstrap "
               f"resamples of the prompts (each with its reference clip and its clips of every draw):\n\n"
               f"{targets_table(targets)}\n" if targets else "")
            + "Classifier accuracy on the real reference clips: "
            f"{json.dumps(reference)}\n")
    publish(text, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
