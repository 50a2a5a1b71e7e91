#!/usr/bin/env bash
# The whole demo recipe at the "hour" preset in one command: data, parts, teacher, classifier (recipes/demo/train.py
# --preset hour) and three stages of recipes/demo/distill.sh, into outputs/demo-hour:
#   ablation  ray_jobs/distill.py without L_adv (measured better than with it; made musiccm-demo-v4), 750 steps
#             (--max-train-timestep 699: the solver trained only where the student's sampling starts);
#   dmd       a 225-step fine-tune of that student with distribution matching (--dmd-weight, batch 32) into
#             student-dmd (musiccm-demo-v6);
#   score     recipes/demo/two_step_score.py fits a copy of the teacher to student-dmd's own 2-step samples, then
#             200 more DMD steps of student-dmd with that fit as the real score (--w 0) into student-2step
#             (musiccm-demo-v7).
# The guidance is w = 6 (diffusers scale 7): at scale 7 this short-trained teacher's 4-step DDIM is both closer to the
# data and more on-prompt (benchmarks/RESULTS.md, "Guidance probe"). Stage times on 2 CPU cores vary by day (the
# machine ran about 3 times faster on some days): train.py + ablation 30 to 119 min, dmd about 21 min, score about
# 27 to 45 min; recipes/demo/README.md has the measured table. Rerunning skips finished stages and resumes the
# distillations from their last checkpoints. Extra arguments go to train.py (e.g. --threads 2); STEPS=... sets the
# first distillation's steps (STEPS=300 saves 3 to 14 min for a model about as good as musiccm-demo-v3), W=... its
# guidance weight, MAX_T=... the highest solver timestep and the students' first sampling timestep, DMD_STEPS=...
# and DMD_BATCH=... the dmd stage's steps (225) and batch (32), SCORE_STEPS=... the score stage's steps (200),
# RUNS=... the stages (default "ablation dmd score").
set -euo pipefail
cd "$(dirname "$0")/../.."
export WORK=${WORK:-outputs/demo-hour}
start=$(date +%s)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} .venv/bin/python recipes/demo/train.py --preset hour --work "$WORK" "$@"
export MAX_T=${MAX_T:-699}
STEPS=${STEPS:-750} RUNS=${RUNS:-ablation dmd score} recipes/demo/distill.sh --w "${W:-6.0}" \
  --max-train-timestep "$MAX_T"
echo "demo recipe (hour preset) finished in $(( ($(date +%s) - start) / 60 )) min: student in $WORK/student-2step" \
  "(before: $WORK/student-dmd after the first distribution matching, $WORK/student-noadv before it)"
