"""The quality benchmark's targets (issue 6) with confidence intervals from a bootstrap over prompts.

A row's FD_cls on 256 prompts moves by about half a point between noise draws, and by more when the prompts and
their reference clips are drawn again: a second draw of noise does not show the second kind of spread. The
targets here are judged on each row's clips pooled over all its draws (FD_cls of every generated clip against the
reference clips, attribute accuracy over every clip) and a paired bootstrap that draws the prompts again with
replacement: each resampled prompt brings its reference clip and its generated clips of every draw of both rows,
so the interval covers the prompt set, the reference set and the noise together.

    4 steps: FD_cls within 10 % of the 50-step teacher's       student-4 / teacher-ddim50  ratio < 1.10
    4 steps: attribute accuracy within 3 points of the teacher  student-4 - teacher-ddim50  >= -3 points
    1 step: FD_cls below the teacher's 4-step DDIM               student-1 / teacher-ddim4   ratio < 1

A target is "met" when the whole 95 % interval is on its side of the bound, "missed" when the whole interval is
on the other side, and "not resolved" otherwise (the benchmark is too small to tell). Percentile intervals: a
resample repeats some prompts, which raises both rows' FD by a similar small-sample bias and so pulls their ratio
towards 1; the intervals err on the side of "not resolved". (A check of their width, FD ratios on random halves of
the prompts, ``--halves``.)

Run by ``benchmarks/quality.py`` on the rows it ran; on its stored evaluations alone (no generation):

    python benchmarks/targets.py --out outputs/quality --rows student-1:10 teacher-ddim4:10 student-4 teacher-ddim50
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from musiccm.evaluation.metrics import MetricError, frechet_distance


@dataclass(frozen=True)
class Target:
    name: str
    row: str
    baseline: str
    statistic: str  # "fd_ratio": FD_cls(row) / FD_cls(baseline); "acc_diff": mean accuracy(row) - (baseline)
    bound: float
    below: bool  # True: met when the statistic is below the bound; False: met when it is at or above it


TARGETS = (
    Target("4 steps: FD_cls within 10 % of the 50-step teacher's", "student-4", "teacher-ddim50", "fd_ratio", 1.10,
           True),
    Target("4 steps: mean attribute accuracy within 3 points of the 50-step teacher's", "student-4", "teacher-ddim50",
           "acc_diff", -0.03, False),
    Target("1 step: FD_cls below the teacher's 4-step DDIM", "student-1", "teacher-ddim4", "fd_ratio", 1.0, True),
)


@dataclass
class RowClips:
    """One row's clips over its draws, aligned on ``ids``: embeddings (draws, prompts, dim) and per-clip
    correctness (draws, prompts, heads) of the label classifier's predictions."""

    embeddings: np.ndarray
    correct: np.ndarray


def draw_label(label: str, draw: int) -> str:
    """The name of a row's draw (its gen/ and eval/ directories): draw 0 is the row itself."""
    return label if draw == 0 else f"{label}-draw{draw}"


def read_features(eval_dir: Path) -> dict[str, dict[str, dict]]:
    """One evaluate.py --out's readable clips (an embedding and predictions): {"generated"/"reference": {id: row}}."""
    out: dict[str, dict[str, dict]] = {"generated": {}, "reference": {}}
    columns = ["set", "id", "cls_embedding", "cls_pred"]
    for r in pq.read_table(eval_dir / "features.parquet", columns=columns).to_pylist():
        if r["set"] in out and r["cls_embedding"] is not None and r["cls_pred"]:
            out[r["set"]][r["id"]] = r
    return out


def load_rows(draw_dirs: dict[str, list[Path]], labels: dict[str, dict],
              heads: list[str]) -> tuple[dict[str, RowClips], np.ndarray]:
    """Each row's clips of every draw (``draw_dirs``: label → one evaluate.py --out per draw) and the reference
    clips' embeddings (from the first row's first draw), aligned on the prompts readable in all of them."""
    features = {label: [read_features(d) for d in dirs] for label, dirs in draw_dirs.items()}
    reference = next(iter(features.values()))[0]["reference"]
    ids = sorted(set(reference).intersection(*(f["generated"] for fs in features.values() for f in fs)))

    def clips(f: dict[str, dict[str, dict]]) -> tuple[list, list]:
        gen = [f["generated"][i] for i in ids]
        preds = [json.loads(r["cls_pred"]) for r in gen]
        return ([r["cls_embedding"] for r in gen],
                [[p[h] == str(labels[i][h]) for h in heads] for i, p in zip(ids, preds, strict=True)])

    rows = {}
    for label, fs in features.items():
        emb, correct = zip(*(clips(f) for f in fs), strict=True)
        rows[label] = RowClips(np.asarray(emb, np.float64), np.asarray(correct, bool))
    return rows, np.asarray([reference[i]["cls_embedding"] for i in ids], np.float64)


def prompt_labels(prompts: Path, heads: list[str]) -> tuple[dict[str, dict], list[str]]:
    """The prompts' rows by id, and those of ``heads`` that the prompts carry as label columns."""
    table = pq.read_table(prompts)
    return {r["id"]: r for r in table.to_pylist()}, [h for h in heads if h in table.column_names]


def pooled_fd(row: RowClips, ref: np.ndarray, idx: np.ndarray) -> float:
    """FD_cls of the row's clips of prompts ``idx`` over all draws against those prompts' reference clips."""
    gen = row.embeddings[:, idx].reshape(-1, row.embeddings.shape[-1])
    return frechet_distance(gen, ref[idx])


def pooled_accuracy(row: RowClips, idx: np.ndarray) -> float:
    """Mean over heads of the fraction of the row's clips (prompts ``idx``, all draws) classified as labelled."""
    if row.correct.shape[-1] == 0:
        raise MetricError("the prompts carry none of the classifier's label columns: no attribute accuracy")
    return float(row.correct[:, idx].mean(axis=(0, 1)).mean())


def statistic(target: Target, rows: dict[str, RowClips], ref: np.ndarray, idx: np.ndarray) -> float:
    a, b = rows[target.row], rows[target.baseline]
    if target.statistic == "fd_ratio":
        return pooled_fd(a, ref, idx) / pooled_fd(b, ref, idx)
    return pooled_accuracy(a, idx) - pooled_accuracy(b, idx)


def verdict(target: Target, low: float, high: float) -> str:
    if target.below:
        met, missed = high < target.bound, low >= target.bound
    else:
        met, missed = low >= target.bound, high < target.bound
    return "met" if met else "missed" if missed else "not resolved"


def evaluate(targets: list[Target], rows: dict[str, RowClips], ref: np.ndarray, resamples: int,
             seed: int = 0) -> list[dict]:
    """Each target's estimate on all prompts and its 95 % percentile interval over ``resamples`` paired bootstrap
    draws of the prompts (the same resampled prompts for every target). A target whose FD cannot be computed (too
    few clips for a stable covariance) is reported as "not computable" with the reason, not dropped."""
    n = ref.shape[0]
    draws = np.random.default_rng(seed).integers(0, n, (resamples, n))
    out = []
    for t in targets:
        result = {"target": t.name, "row": t.row, "baseline": t.baseline, "statistic": t.statistic, "bound": t.bound,
                  "prompts": n, "draws": [rows[t.row].embeddings.shape[0], rows[t.baseline].embeddings.shape[0]],
                  "resamples": resamples}
        try:
            estimate = statistic(t, rows, ref, np.arange(n))
            samples = [statistic(t, rows, ref, idx) for idx in draws]
        except MetricError as exc:
            out.append({**result, "estimate": None, "low": None, "high": None, "verdict": "not computable",
                        "error": str(exc)})
            continue
        low, high = (float(x) for x in np.percentile(samples, [2.5, 97.5])) if resamples else (None, None)
        out.append({**result, "estimate": estimate, "low": low, "high": high,
                    "verdict": verdict(t, low, high) if resamples else "not resolved"})
    return out


def comparisons(pairs: list[tuple[str, str]]) -> list[Target]:
    """Row ``a`` against row ``b`` for each pair, judged like a target: FD_cls ratio a / b below 1 ("met": a is
    closer to the data over its whole interval, "missed": b is) and mean accuracy a − b at or above 0."""
    return [t for a, b in pairs for t in (Target(f"{a} vs {b}: FD_cls", a, b, "fd_ratio", 1.0, True),
                                         Target(f"{a} vs {b}: mean accuracy", a, b, "acc_diff", 0.0, False))]


def judge(draw_dirs: dict[str, list[Path]], prompts: Path, heads: list[str], resamples: int,
          seed: int = 0, extra: list[Target] | None = None) -> list[dict]:
    """The targets whose two rows were both run (``draw_dirs``: label → one evaluate.py --out per draw), then
    ``extra`` (e.g. ``comparisons``), on the same bootstrap resamples."""
    targets = [t for t in TARGETS if t.row in draw_dirs and t.baseline in draw_dirs] + list(extra or [])
    if not targets:
        return []
    labels, heads = prompt_labels(prompts, heads)
    used = sorted({label for t in targets for label in (t.row, t.baseline)})
    rows, ref = load_rows({label: draw_dirs[label] for label in used}, labels, heads)
    return evaluate(targets, rows, ref, resamples, seed)


def table(results: list[dict]) -> str:
    """Markdown: each target's estimate, 95 % interval and verdict."""
    def show(r: dict, x: float | None) -> str:
        if x is None:
            return "–"
        return f"{x:.3f}" if r["statistic"] == "fd_ratio" else f"{100 * x:+.1f} points"

    bound = {"fd_ratio": lambda r: f"FD_cls ratio < {r['bound']:g}",
             "acc_diff": lambda r: f"accuracy difference >= {100 * r['bound']:+.0f} points"}
    head = ("| target | rows (draws) | statistic | estimate | 95 % interval | verdict |\n"
            "|---|---|---|---|---|---|\n")
    lines = [f"| {r['target']} | {r['row']} ({r['draws'][0]}) vs {r['baseline']} ({r['draws'][1]}) | "
             f"{bound[r['statistic']](r)} | {show(r, r['estimate'])} | {show(r, r['low'])} to {show(r, r['high'])} | "
             f"{r['verdict']}{': ' + r['error'] if r.get('error') else ''} |" for r in results]
    return head + "\n".join(lines) + "\n"


def halves(draw_dirs: dict[str, list[Path]], prompts: Path, target: Target, splits: int, seed: int = 1) -> float:
    """The standard deviation of ``target``'s statistic on all prompts implied by its spread between random halves
    of them: var(half A - half B) = 2 var(at n / 2) ~ 4 var(at n), so the deviation is that of the difference / 2.
    An estimate apart from the bootstrap's (no prompt is repeated), to check its intervals' width."""
    labels, _ = prompt_labels(prompts, [])
    rows, ref = load_rows({label: draw_dirs[label] for label in (target.row, target.baseline)}, labels, [])
    rng, n = np.random.default_rng(seed), len(ref)
    diffs = []
    for _ in range(splits):
        order = rng.permutation(n)
        diffs.append(statistic(target, rows, ref, order[: n // 2]) - statistic(target, rows, ref, order[n // 2:]))
    return float(np.std(diffs) / 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a benchmarks/quality.py --out directory (its eval/ and prompts)")
    p.add_argument("--rows", nargs="+", required=True, metavar="LABEL[:DRAWS]",
                   help="rows to use and how many noise draws of each to pool (default 1): e.g. student-1:10")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default %(default)s)")
    p.add_argument("--halves", type=int, default=0,
                   help="also split the prompts into random halves this many times and print the FD ratio's standard "
                        "deviation that implies, next to the bootstrap's (default 0: no check)")
    p.add_argument("--compare", nargs="+", default=[], metavar="A/B",
                   help="also compare two of the --rows, e.g. noadv-4/student-4: FD_cls ratio A / B (met: A closer "
                        "to the data over the whole interval; missed: B is) and mean accuracy A - B")
    args = p.parse_args(argv)
    out = Path(args.out)
    draw_dirs: dict[str, list[Path]] = {}
    for spec in args.rows:
        label, _, n = spec.partition(":")
        if n and not (n.isdigit() and int(n) >= 1):
            p.error(f"--rows {spec!r}: the draw count after ':' must be an integer >= 1")
        dirs = [out / "eval" / draw_label(label, d) for d in range(int(n or 1))]
        missing = [str(d) for d in dirs if not (d / "features.parquet").exists()]
        if missing:
            p.error(f"--rows {spec!r}: no evaluation in {', '.join(missing)} (run benchmarks/quality.py first)")
        draw_dirs[label] = dirs
    if args.bootstrap < 0 or args.halves < 0:
        p.error("--bootstrap and --halves must be integers >= 0")
    pairs = [tuple(spec.split("/")) for spec in args.compare]
    for spec, pair in zip(args.compare, pairs, strict=True):
        if len(pair) != 2 or not all(label in draw_dirs for label in pair):
            p.error(f"--compare {spec!r}: expected A/B, two labels of --rows ({', '.join(draw_dirs)})")
    results = judge(draw_dirs, out / "prompts.parquet", ["instrument", "tempo", "mode", "drums"], args.bootstrap,
                    extra=comparisons(pairs))
    if not results:
        p.error(f"no target has both its rows among {sorted(draw_dirs)}; targets: "
                + "; ".join(dict.fromkeys(f"{t.row} vs {t.baseline}" for t in TARGETS)))
    print(table(results))
    for t in TARGETS:
        if args.halves and t.statistic == "fd_ratio" and t.row in draw_dirs and t.baseline in draw_dirs:
            r = next(r for r in results if r["target"] == t.name)
            boot = "–" if r["low"] is None else f"{(r['high'] - r['low']) / 3.92:.4f}"
            print(f"{t.row} / {t.baseline}: FD ratio's standard deviation from {args.halves} random halves "
                  f"{halves(draw_dirs, out / 'prompts.parquet', t, args.halves):.4f}, from the bootstrap's 95 % "
                  f"interval (width / 3.92) {boot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
