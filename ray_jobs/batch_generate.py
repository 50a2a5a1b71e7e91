"""Batch text-to-music generation on Ray Data: a Parquet manifest of prompts → audio + metric shards.

Local (starts a Ray instance, bundled default model, writes ./outputs/<run-name>/):
    python ray_jobs/batch_generate.py --manifest examples/prompts.parquet
Cluster (storage settings from the standard AWS environment, e.g. runtime_env env_vars):
    ray job submit --working-dir . -- python ray_jobs/batch_generate.py --manifest s3://bucket/prompts.parquet \\
        --output s3://bucket/gen/run1 --model s3://bucket/models/musiccm-v1 --num-actors 8
Rerunning the same command resumes: only ids without a finished clip are generated.
Steps: 1-8 for a distilled student (default 4); 1-1000 for a MusicLDM DDIM teacher (default 50, with
classifier-free guidance `guidance_scale`, default 2.0), e.g. a 50-step teacher baseline:
    python ray_jobs/batch_generate.py --manifest prompts.parquet --model ucsd-reach/musicldm --default-steps 50
Exit codes: 0 ok; 1 clips failed or --strict rejected rows; 2 unusable manifest, output or model, or the
output is in use by another live job.
"""

from __future__ import annotations

import argparse
import sys

from musiccm.batch.config import BatchConfig
from musiccm.defaults import DEFAULT_MODEL, TAPER_HELP
from musiccm.jobs import batch
from musiccm.retry import DEFAULT_BUDGET_S


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--manifest", required=True, help="Parquet file or prefix of files (local or s3://) with columns id, prompt "
      "and optionally duration_s, seed, steps (1-8 for a distilled student, 1-1000 for a DDIM teacher), guidance_scale "
      "(a teacher's classifier-free guidance, default 2.0), format; other columns are carried into the metrics")
    a("--output", default=None, help="output directory or s3:// prefix (default ./outputs/<run-name>)")
    a("--run-name", default=None, help="name of the run (default <manifest stem>-<model name>)")
    a("--model", default=DEFAULT_MODEL, help="MusicLDM-layout directory, s3:// prefix (fetched once per actor) "
      "or hub id; a distilled student (LCMScheduler) or a MusicLDM teacher (DDIM + classifier-free guidance); "
      "default: the bundled demo student (recipes/demo: synthetic soundfont music, 2.56 s native window)")
    a("--num-actors", type=int, default=1, help="model replicas; one GPU each when the cluster has GPUs (default 1)")
    a("--calls-per-actor", type=int, default=2, help="batches an actor works on at once: one generates while the "
      "others encode and write their audio (1: generate, then write, in series; default 2)")
    a("--batch-size", type=int, default=8, help="clips per generate() call up to --long-threshold-s (default 8)")
    a("--long-batch-size", type=int, default=1, help="clips per call above --long-threshold-s (default 1)")
    a("--long-threshold-s", type=float, default=20.0, help="clips longer than this many seconds use "
      "--long-batch-size (default 20)")
    a("--crop-batch-size", type=int, default=8, help="crop-fusion windows per UNet call for clips longer than "
      "the native window (default 8)")
    a("--hop-frames", type=int, default=None, help="crop-fusion hop in latent frames (default 3/4 of the window)")
    a("--taper", type=int, default=None, help=TAPER_HELP)
    a("--max-duration", type=float, default=600.0, help="rows with a longer duration_s are rejected (default 600)")
    a("--default-steps", type=int, default=None, help="sampling steps for rows without `steps`: 1-8 for a "
      "distilled student (default 4), 1-1000 for a DDIM teacher (default 50, with classifier-free guidance "
      "guidance_scale, default 2.0); for a hub-id model the default is the model's own, chosen once loaded")
    a("--default-format", choices=["flac", "wav"], default="flac", help="audio format for rows without `format`")
    a("--max-timestep", type=int, default=None, help="distilled students: highest sampling timestep, 0..999 "
      "(default: the model's own setting in model_index.json, else LCM's 999; the bundled demo student uses 699)")
    a("--metrics-rows-per-shard", type=int, default=1000, help="metric rows per Parquet shard (default 1000)")
    a("--metrics-flush-s", type=float, default=60.0, help="also write a metric shard at least this often, so an "
      "interrupted driver loses little (default 60)")
    a("--strict", action="store_true", help="fail (exit 1, nothing generated) if any manifest row is rejected")
    a("--device", default=None, help="torch device of the actors (default: cuda when the cluster has GPUs, else cpu)")
    a("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
      help="UNet/CLAP dtype (the VAE stays float32 when its config forces upcasting)")
    a("--local-files-only", action="store_true", help="hub-id models: use the local cache, never download")
    a("--no-clap-score", action="store_true", help="skip the CLAP text-audio similarity column")
    a("--verify-audio", action="store_true", help="on resume, re-read finished clips and compare their sha256 "
      "(default: compare sizes from one listing)")
    a("--cpus-per-actor", type=float, default=None, help="Ray CPUs per actor (default: with GPUs, each actor's "
      "share of its GPU node's CPUs less one, 1 to 8, for encoding and writing beside generation; on CPU-only "
      "clusters a share that leaves one CPU free)")
    a("--torch-threads", type=int, default=None, help="torch threads per CPU actor (default: its share of its "
      "node's cores)")
    a("--no-progress-timeout-s", type=float, default=None, help="fail when Ray Data makes no progress this long "
      "(default max(1800, 60 x max-duration); -1: never)")
    a("--progress-s", type=float, default=10.0, help="seconds between progress lines (default 10)")
    a("--storage-retry-s", type=float, default=DEFAULT_BUDGET_S, help="how long each storage call rides out "
      "an outage (unreachable endpoint, 5xx, throttling, resets) with jittered exponential back-off before its "
      f"clip fails; 0 = no retries (default {DEFAULT_BUDGET_S:g})")
    a("--lease-s", type=float, default=120.0, help="the output's owner lease (_OWNER.json) is stale this long "
      "after its owner's last renewal, so a crashed job on another host cannot lock the output for ever "
      "(default 120; a dead owner on this host is noticed at once)")
    a("--dry-run", action="store_true", help="check every row and print what would be generated, skipped (already "
      "done) and rejected, with the first reasons; generate nothing and write nothing to the output")
    a("--takeover", action="store_true", help="take the output from a job that still holds its lease (that "
      "job stops at its next renewal); without it a second job on the same --output exits 2")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run_name, output = batch.resolve_names(args.manifest, args.model, args.run_name, args.output)
        config = BatchConfig(
            manifest=args.manifest, output=output, run_name=run_name, model=args.model, num_actors=args.num_actors,
            calls_per_actor=args.calls_per_actor,
            batch_size=args.batch_size, long_batch_size=args.long_batch_size, long_threshold_s=args.long_threshold_s,
            crop_batch_size=args.crop_batch_size, hop_frames=args.hop_frames, taper=args.taper,
            max_duration=args.max_duration,
            default_steps=args.default_steps, default_format=args.default_format, max_timestep=args.max_timestep,
            metrics_rows_per_shard=args.metrics_rows_per_shard, metrics_flush_s=args.metrics_flush_s,
            strict=args.strict, device=args.device, dtype=args.dtype, local_files_only=args.local_files_only,
            clap_score=not args.no_clap_score, verify_audio=args.verify_audio, cpus_per_actor=args.cpus_per_actor,
            torch_threads=args.torch_threads, no_progress_timeout_s=args.no_progress_timeout_s,
            progress_s=args.progress_s, storage_retry_s=args.storage_retry_s, lease_s=args.lease_s,
            takeover=args.takeover, dry_run=args.dry_run,
        )
    except ValueError as exc:
        print(f"batch_generate: error: {exc}", file=sys.stderr)
        return batch.EXIT_USAGE
    return batch.run_job(config)


if __name__ == "__main__":
    sys.exit(main())
