"""Evaluate a batch-generation output with the MusicCM paper's metrics on Ray Data.

Local (starts a Ray instance; feature networks from the given files):
    python ray_jobs/evaluate.py --generated outputs/run1 --reference data/ref --out outputs/eval/run1 \\
        --pann-ckpt weights/Cnn14_16k_mAP=0.438.pth --vggish-ckpt weights/vggish-10086976.pth
Cluster (storage settings from the standard AWS environment, e.g. runtime_env env_vars):
    ray job submit --working-dir . -- python ray_jobs/evaluate.py --generated s3://b/gen/run1 \\
        --reference s3://b/ref --train-reference s3://b/train-embeddings.parquet --out s3://b/eval/run1 \\
        --pann-ckpt s3://b/w/Cnn14_16k_mAP=0.438.pth --vggish-ckpt s3://b/w/vggish-10086976.pth --num-actors 8
Writes {out}/metrics.json, {out}/features.parquet and a row of the Markdown table {out}/table.md (or --table).
A metric whose network has no weights is reported unavailable (with how to provide them); the rest still run.
With --classifier DIR (a label classifier, e.g. the demo's outputs/demo/classifier) also FD_cls, KID_cls, IS_cls,
KL_cls and attribute accuracy against the label columns (instrument, mode, ...) of the generated metric rows.
Exit codes: 0 metrics written; 1 no generated clip could be read; 2 unusable inputs, weights or output.
"""

from __future__ import annotations

import argparse
import sys

from musiccm.jobs import evaluate


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--generated", required=True, help="batch-generation output (local or s3://): audio/{id}.flac|wav named by "
      "metrics/*.parquet (prompts, steps, latency); a plain directory of audio files also works")
    a("--reference", required=True, help="reference audio: a directory/prefix of audio files (id = file name "
      "without extension; Parquet files in it with id + caption/prompt add captions), or a .parquet with id, "
      "audio_uri (absolute, or relative to the Parquet) and optionally caption. KL pairs clips by id")
    a("--train-reference", default=None, help="training set for SIM_AA@0.90/0.95: a directory of audio files, or a "
      ".parquet of CLAP audio embeddings (id + embedding columns; {out}/train_clap_embeddings.parquet of an "
      "earlier run has this form). Must use the same CLAP as --clap-model")
    a("--out", required=True, help="output directory or s3:// prefix for metrics.json, features.parquet, table.md")
    a("--table", default=None, help="Markdown table to add this run's row to (default {out}/table.md); point "
      "several runs at one file to compare them; a row with the same --label is replaced")
    a("--label", default=None, help="the table row's name (default: the batch run's name)")
    a("--pann-ckpt", default=None, help="Cnn14 16 kHz weights Cnn14_16k_mAP=0.438.pth (.pth or .safetensors, local "
      "or s3://; default ./ckpt/Cnn14_16k_mAP=0.438.pth if it exists). Needed for FD_pann, IS, KL, KID")
    a("--vggish-ckpt", default=None, help="VGGish weights vggish-10086976.pth (.pth or .safetensors, local or s3://; "
      "default torch.hub's cache, $TORCH_HOME/hub/checkpoints/vggish-10086976.pth with TORCH_HOME=~/.cache/torch, "
      "if it exists). Needed for FD_vgg")
    a("--clap-model", default=None, help="CLAP for the text-audio score and SIM_AA: a MusicLDM-layout model "
      "directory or a transformers ClapModel directory (local or s3://); default: the generating model's own CLAP")
    a("--no-clap", action="store_true", help="skip the CLAP metrics")
    a("--classifier", default=None, metavar="DIR", help="a label classifier saved by "
      "musiccm.evaluation.classifier.save (config.json + model.safetensors, local dir or s3:// prefix), e.g. the "
      "demo's outputs/demo/classifier; its embedding feeds FD_cls/KID_cls, its `logits_head` logits feed "
      "IS_cls/KL_cls, its heads give attribute accuracy against label columns of the generated metric rows "
      "(and of the reference, when it has them). Optional; a given one that does not load is an error (exit 2)")
    a("--num-actors", type=int, default=1, help="feature-extraction actors; one GPU each when the cluster has "
      "GPUs (default 1)")
    a("--batch-size", type=int, default=4, help="clips per actor call (default 4)")
    a("--device", default=None, help="torch device of the actors (default: cuda when the cluster has GPUs, else cpu)")
    a("--cpus-per-actor", type=float, default=None, help="Ray CPUs per actor (default 1 with GPUs; on CPU-only "
      "clusters a share that leaves one CPU free)")
    a("--torch-threads", type=int, default=None, help="torch threads per CPU actor (default CPUs / actors)")
    a("--sim-thresholds", type=float, nargs="+", default=[0.90, 0.95], help="SIM_AA thresholds (default 0.90 0.95)")
    a("--is-splits", type=int, default=10, help="Inception Score splits, capped at the clip count (default 10)")
    a("--kid-subsets", type=int, default=100, help="KID random subsets (default 100)")
    a("--kid-subset-size", type=int, default=1000, help="KID subset size, capped at the clip counts (default 1000)")
    a("--seed", type=int, default=2020, help="seed of the IS shuffle and KID subsets (default 2020, audioldm_eval's)")
    a("--progress-s", type=float, default=10.0, help="seconds between progress lines (default 10)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = evaluate.EvalConfig(
            generated=args.generated, reference=args.reference, out=args.out, train_reference=args.train_reference,
            table=args.table, label=args.label, pann_ckpt=args.pann_ckpt, vggish_ckpt=args.vggish_ckpt,
            clap_model=args.clap_model, no_clap=args.no_clap, classifier=args.classifier,
            num_actors=args.num_actors, batch_size=args.batch_size,
            device=args.device, cpus_per_actor=args.cpus_per_actor, torch_threads=args.torch_threads,
            sim_thresholds=tuple(args.sim_thresholds), is_splits=args.is_splits, kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size, seed=args.seed, progress_s=args.progress_s,
        )
    except ValueError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return evaluate.EXIT_USAGE
    return evaluate.run_job(config)


if __name__ == "__main__":
    sys.exit(main())
