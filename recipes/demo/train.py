"""Train the demo world end to end: synthetic data, the small teacher's parts, the teacher, the eval classifier.

    python recipes/demo/train.py                   # 'full' sizes (musiccm-demo-v1's) → outputs/demo (≈ 2.4 h, 2 cores)
    python recipes/demo/train.py --preset hour     # the shipped model's sizes → outputs/demo-hour (run by hour.sh)
    python recipes/demo/train.py --stages data parts  # some stages; finished stages are skipped on rerun
    python recipes/demo/train.py --device cpu      # training stages on the CPU even where a GPU is visible
Flags given explicitly override the preset's value. Then distil with the job itself and install the student:
see recipes/demo/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from musiccm.demo import recipe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=list(recipe.STAGES), choices=list(recipe.STAGES),
                   help=f"stages to run, in order (default: all: {' '.join(recipe.STAGES)})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="where the training stages run: auto (cuda when a GPU is "
                   "visible, else cpu), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--preset", choices=list(recipe.PRESETS), default="full",
                   help="named sizes: 'hour' (the shipped model's; with hour.sh's 750-step distillation 30 min end "
                        "to end on 2 cores on a fast day, 119 min on a slow one before a fix to the distillation "
                        "job; recipes/demo/README.md), 'full' (the first default model's, ≈ 3 h) (default: full)")
    for f in dataclasses.fields(recipe.RecipeConfig):
        by_preset = ", ".join(f"{name}: {getattr(cfg, f.name)}" for name, cfg in recipe.PRESETS.items())
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                       help=f"{f.name.replace('_', ' ')} (default by preset: {by_preset})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = recipe.preset(args.preset, **{f.name: getattr(args, f.name) for f in dataclasses.fields(recipe.RecipeConfig)})
    try:
        device = recipe.resolve_device(args.device)
    except ValueError as exc:
        p.error(str(exc))
    recipe.run(cfg, tuple(args.stages), device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
