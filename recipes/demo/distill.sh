#!/usr/bin/env bash
# Distil the demo teacher with the real job (ray_jobs/distill.py, Ray Train on a local Ray instance) twice: with
# MusicCM's adversarial term (demo-student) and without it (demo-student-noadv; measured better, so it ships).
# Extra arguments go to every run (e.g. --use-gpu --num-workers 2).
# Rerunning resumes each run from its latest checkpoint (same --name and --storage). RUNS="student" or
# RUNS="ablation" runs only one of the two. RUNS="... dmd" adds a third run after them: the ablation student
# fine-tuned with distribution matching (--dmd-weight 1, DMD2's loss on its 1-step jump, with L_distil at λ = 0.3 as
# the regulariser that keeps its later steps consistent; lr 3e-5 without warm-up, DMD_STEPS=225 steps of
# DMD_BATCH=32 clips: batch 32 measured closer to the data than 16, benchmarks/RESULTS.md) into $WORK/student-dmd;
# it needs $WORK/student-noadv. RUNS="... score" adds a fourth run after that: recipes/demo/two_step_score.py fits a
# copy of the teacher to the DMD student's own 2-step samples (sampled from MAX_T, default 699; 12,000 samples, 1,500
# steps) into $WORK/two-step-score, and the DMD student is fine-tuned for SCORE_STEPS=200 more steps of 32 with that
# model as the real score and the solver's teacher (--w 0: the samples already carry the distilled guidance) into
# $WORK/student-2step (benchmarks/RESULTS.md, "Distribution matching towards the student's own 2-step samples").
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-outputs/demo}
STEPS=${STEPS:-450}
# Ray gives a 1-CPU worker OMP_NUM_THREADS=1 unless the environment sets it: use both cores for the worker.
# --r1-gamma 0.01: R1 sums squared gradients over every token of a head's input (1,024 + 64 tokens for the demo
# CLAP's layers 1 and 3), ~200 at the start, so γ = 1 would drown the hinge loss (≈ 2) and freeze the heads.
# --k-skip 5 (AudioLCM's multi-step solver, one guided DDIM jump of 100 timesteps): the boundary condition at t = 0
# reaches t = 999 in 10 hops instead of 50. With k = 1, 300 steps left the 1-step student clipping and at chance
# on instrument (this schedule's sqrt(alpha_bar) at t = 999 is 0.012, so an eps-parameterised x0 is fragile there).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
RUNS=" ${RUNS:-student ablation} "
common=(
  --teacher "$WORK/teacher" --train-manifest "$WORK/data/train/manifest.parquet" --storage "$WORK/runs"
  --max-steps "$STEPS" --batch-size 16 --lr 1e-4 --warmup-steps 50 --w 2.0 --k-skip 5
  --feature-network clap --disc-layers 1 3 --r1-gamma 0.01
  --checkpoint-every 150 --validate-every 150 --validation-steps 1 2 4
  --validation-prompts "a slow sad piano piece without drums" "fast trumpet melody with a rock drum beat"
  "a lively synth lead with a four-on-the-floor dance beat" "a calm flute tune in a major key with no percussion"
)
if [[ $RUNS == *" student "* ]]; then
  .venv/bin/python ray_jobs/distill.py --name demo-student --output "$WORK/student" "${common[@]}" "$@"
fi
if [[ $RUNS == *" ablation "* ]]; then
  .venv/bin/python ray_jobs/distill.py --name demo-student-noadv --output "$WORK/student-noadv" --adv-weight 0 \
    "${common[@]}" "$@"
fi
if [[ $RUNS == *" dmd "* ]]; then
  .venv/bin/python ray_jobs/distill.py --name demo-student-dmd --output "$WORK/student-dmd" "${common[@]}" \
    --adv-weight 0 --student-init "$WORK/student-noadv" --dmd-weight 1 --distill-weight 0.3 --lr 3e-5 \
    --warmup-steps 0 --max-steps "${DMD_STEPS:-225}" --batch-size "${DMD_BATCH:-32}" --checkpoint-every 25 "$@"
fi
if [[ $RUNS == *" score "* ]]; then
  if [[ ! -f $WORK/two-step-score/model_index.json ]]; then
    .venv/bin/python recipes/demo/two_step_score.py --student "$WORK/student-dmd" --teacher "$WORK/teacher" \
      --out "$WORK/two-step-score" --max-timestep "${MAX_T:-699}"
  fi
  # "${common[@]}" names $WORK/teacher; the later --teacher and --w take precedence (argparse keeps the last).
  .venv/bin/python ray_jobs/distill.py --name demo-student-2step --output "$WORK/student-2step" "${common[@]}" \
    "$@" --teacher "$WORK/two-step-score" --w 0 --adv-weight 0 --student-init "$WORK/student-dmd" --dmd-weight 1 \
    --distill-weight 0.3 --lr 3e-5 --warmup-steps 0 --max-steps "${SCORE_STEPS:-200}" --batch-size 32 \
    --checkpoint-every 25
fi
