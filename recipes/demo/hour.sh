#!/usr/bin/env bash
# The whole demo recipe at the "hour" preset in one command: data, parts, teacher, classifier
# (recipes/demo/train.py --preset hour) and one distillation by ray_jobs/distill.py (without L_adv, the variant
# that measured better on the full run), into outputs/demo-hour. 54 min measured on 2 CPU cores; the model follows
# its prompts much less well than the shipped one (recipes/demo/README.md has both runs' figures). Rerunning
# skips finished stages and resumes the distillation from its last checkpoint. Extra arguments go to train.py
# (e.g. --threads 2); STEPS=... sets the distillation's steps.
set -euo pipefail
cd "$(dirname "$0")/../.."
export WORK=${WORK:-outputs/demo-hour}
start=$(date +%s)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} .venv/bin/python recipes/demo/train.py --preset hour --work "$WORK" "$@"
STEPS=${STEPS:-300} RUNS=ablation recipes/demo/distill.sh
echo "demo recipe (hour preset) finished in $(( ($(date +%s) - start) / 60 )) min: student in $WORK/student-noadv"
