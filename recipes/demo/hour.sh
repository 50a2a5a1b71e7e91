#!/usr/bin/env bash
# The whole demo recipe at the "hour" preset in one command: data, parts, teacher, classifier (recipes/demo/train.py
# --preset hour) and two runs of ray_jobs/distill.py: a distillation without L_adv (the variant that measured better
# on the full run; it made musiccm-demo-v4) and a 225-step fine-tune of that student with distribution matching
# (--dmd-weight, recipes/demo/distill.sh's "dmd" run, batch 32), into outputs/demo-hour; the second made the shipped
# default model (musiccm-demo-v6; musiccm-demo-v5 was 150 steps of 16). Without the fine-tune it took 30 min end to
# end on 2 CPU cores on 2026-12-02 (after the distillation job's report fix, on a day the machine ran about 3 times
# faster than for an earlier 119-min timing); the fine-tune takes about 21 min more (1,282 s, timed
# separately on 2026-12-03); recipes/demo/README.md has the stage times and figures. The
# distillation uses guidance w = 6 (diffusers scale 7) instead of distill.sh's w = 2: at scale 7 this short-trained
# teacher's 4-step DDIM is both closer to the data and more on-prompt (benchmarks/RESULTS.md, "Guidance probe" and
# "CLAP text warm-up probe"); it
# trains the solver only up to t = 699 (--max-train-timestep), where the student's sampling starts: 4 steps then
# measured FD_cls 17.4 instead of 19.9 (RESULTS.md, "Demo quality, musiccm-demo-v3"); and it runs 750 steps (≈ 2.4 s
# each on 2 cores in the first epoch, 1.7 s in the second with the job's latent cache, about 26 min, on the slower
# day; 0.62 s and 0.43 s, 7 min, on the faster one), where a
# validation probe of checkpoints 300 to 1,200 levelled off (RESULTS.md, "Demo quality, musiccm-demo-v4"). STEPS=300
# saves about 14 min on the slower day (3 on the faster) for a model about as good as musiccm-demo-v3. Rerunning
# skips finished stages and resumes the distillation from its last checkpoint. Extra arguments go to train.py (e.g.
# --threads 2); STEPS=... sets the first distillation's steps, W=... its guidance weight, MAX_T=... its highest solver
# timestep (both runs use W and MAX_T), DMD_STEPS=... the fine-tune's steps (default 225),
# DMD_BATCH=... its batch size (default 32).
set -euo pipefail
cd "$(dirname "$0")/../.."
export WORK=${WORK:-outputs/demo-hour}
start=$(date +%s)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} .venv/bin/python recipes/demo/train.py --preset hour --work "$WORK" "$@"
STEPS=${STEPS:-750} RUNS="ablation dmd" recipes/demo/distill.sh --w "${W:-6.0}" --max-train-timestep "${MAX_T:-699}"
echo "demo recipe (hour preset) finished in $(( ($(date +%s) - start) / 60 )) min: student in $WORK/student-dmd" \
  "(before distribution matching: $WORK/student-noadv)"
