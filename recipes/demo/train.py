"""Train the demo world end to end: synthetic data, the small teacher's parts, the teacher, the eval classifier.

    python recipes/demo/train.py                       # everything, into outputs/demo (about an hour on 2 cores)
    python recipes/demo/train.py --stages data parts   # some stages; finished stages are skipped on rerun
Then distil with the job itself and install the student: see recipes/demo/README.md.
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
    for f in dataclasses.fields(recipe.RecipeConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"{f.name.replace('_', ' ')} (default: {f.default})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = recipe.RecipeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(recipe.RecipeConfig)})
    recipe.run(cfg, tuple(args.stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
