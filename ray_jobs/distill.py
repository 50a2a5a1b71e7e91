"""Consistency distillation of a MusicLDM teacher into a 1-4-step student on Ray Train (MusicCM §3.1-3.2).

Cluster (S3 settings from the standard AWS_* environment, e.g. via runtime_env env_vars):
    ray job submit --working-dir . -- python ray_jobs/distill.py --teacher ucsd-reach/musicldm \\
        --train-manifest s3://bucket/train.parquet --storage s3://bucket/runs --name musiccm-v1 \\
        --num-workers 16 --use-gpu --max-steps 4000
Local (starts a Ray instance; run under ./outputs/runs/<name>):
    python ray_jobs/distill.py --train-manifest train.parquet --max-steps 100
Rerunning with the same --name and --storage resumes from the run's latest checkpoint (the step counter
continues; raise --max-steps to train longer). --max-failures N lets Ray Train restart a failed worker
group N times from the latest checkpoint. Guidance: --w is the LCM/MusicCM weight, diffusers
guidance_scale = w + 1. Exit codes: 0 done and exported; 1 training failed; 2 bad input (nothing started, or a
model the workers could not load).
"""

from __future__ import annotations

import json
import sys
import time

from musiccm import retry, storage
from musiccm.jobs import distill_args
from musiccm.jobs.distill_preflight import PreflightError, check_cluster, preflight

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def error(message: str) -> int:
    print(f"distill: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    parser = distill_args.build_parser(__doc__)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed by argparse)
        return int(exc.code or 0)
    # 1. Flags → config → checks that need no Ray (teacher, manifest, storage).
    try:
        config = distill_args.to_config(args)
        retry.set_budget(config.storage_retry_s)
        distill_args.check_job_flags(args)
        fail_at = distill_args.fail_hook()
        config, manifest = preflight(config)
    except (PreflightError, ValueError, storage.StorageError) as exc:
        return error(storage.redact(str(exc)))
    # 2. Ray: connect (RAY_ADDRESS / `ray job submit`) or start a local instance; check its resources.
    import ray

    if not ray.is_initialized():
        ray.init()
    try:
        if args.resource_check:
            check_cluster(config, args.cpus_per_worker, ray.cluster_resources())
    except PreflightError as exc:
        return error(str(exc))
    from musiccm.jobs.distill_run import build_trainer, model_failure, summarize, write_summary

    # 3. Train (Ray Train V2 resumes from {storage}/{name} when the run exists), then summarise.
    start = time.perf_counter()
    trainer = build_trainer(config, manifest, args.cpus_per_worker, fail_at)
    result, failure = None, None
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:  # workers failed more than --max-failures times
        failure = exc
    summary = summarize(config, manifest, result, failure, time.perf_counter() - start)
    summary["summary"] = write_summary(config, summary)
    unusable = model_failure(failure)
    if unusable is not None:  # a model the workers cannot load (e.g. a hub id missing from a node's cache)
        return error(f"a training worker could not load its model: {unusable}")
    print(json.dumps(summary, indent=2, sort_keys=True))
    return EXIT_OK if summary["status"] == "ok" else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
