#!/usr/bin/env bash
# The GPU tier in one short run: the CUDA-only tests (`-m gpu`), then the speed and memory benchmarks on the
# device, each appending its section to benchmarks/RESULTS.md. Every step has its own time limit so one slow step
# cannot eat the others; logs and the updated RESULTS.md are copied to $OUT after each step.
#
# Usage (on a CUDA machine, from the repository root, with the project's packages importable):
#   OUT=outputs/gpu-tier benchmarks/gpu_tier.sh
#   ONLY="tests distill" benchmarks/gpu_tier.sh   # just these steps: tests throughput teacher-throughput
#                                                 # demo-latency fp16-latency longform distill (recipe-hour: only
#                                                 # when named, it alone takes up to 7 minutes)
# The default steps' limits add up to 8 minutes of device time, so the tier fits one call with room to rerun.
# On a machine whose Python lacks some of them (the H200 image did), benchmarks/gpu_wheels.sh downloads the wheels
# here; install them there into a target dir and put it on PYTHONPATH (the usage line in gpu_wheels.sh).
set -u
OUT=${OUT:-outputs/gpu-tier}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
failed=0

step() {  # step NAME LIMIT_S COMMAND...: run with a limit, log, keep RESULTS.md current in $OUT
  local name=$1 limit=$2 rc start=$SECONDS
  shift 2
  [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  echo "== $* (limit ${limit} s)" | tee -a "$OUT/log.txt"
  timeout "$limit" "$@" >>"$OUT/log.txt" 2>&1
  rc=$?
  echo "== exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
  [ "$rc" -eq 0 ] || failed=1
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# Fail fast (and cheaply) when the environment lacks something the steps import.
$PY -c "import soundfile, boto3, librosa, pretty_midi, tinysoundfont; from diffusers import UNet2DConditionModel; import musiccm.distill.distiller" \
  || { echo "import check failed: the environment lacks a package the GPU tier needs"; exit 2; }

step tests 100 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_distiller.py \
  tests/test_demo_recipe.py
# Clips per second of the full-size random-weight student through the real batch job (4 steps, 10.24 s, bf16), in
# series and pipelined, beside a bare loop; then the 50-step teacher with CFG the same way, for the ratio.
step throughput 150 $PY benchmarks/throughput.py --model full --dtype bfloat16 --clips 256 --batch-size 16 \
  --calls 1 2 --write
step teacher-throughput 60 $PY benchmarks/throughput.py --model full-teacher --steps 50 --dtype bfloat16 --clips 32 \
  --batch-size 16 --calls 2 --write
step demo-latency 30 $PY benchmarks/generate_latency.py --model musiccm/assets/default --durations 2.56 10.24 60 \
  --student-steps 1 2 4 6 --repeats 5 --write
step fp16-latency 45 $PY benchmarks/generate_latency.py --dtype float16 --durations 10.24 60 --write
step longform 30 $PY benchmarks/longform_memory.py --duration 600 --write
step distill 65 $PY benchmarks/distill_throughput.py --sizes full --batch-size 8 --steps 5 --mixed-precision bf16 --write
# The demo recipe's one-hour preset (without its Ray distillation) on the GPU: its stage times ("stage … done in").
# Not in the default tier: ONLY=recipe-hour.
[ -n "${ONLY:-}" ] && step recipe-hour 420 $PY recipes/demo/train.py --preset hour --work /tmp/demo-hour --device cuda
grep -h "stage .* done in\|data: \|passed\|failed\|error" "$OUT/log.txt" | tail -12
exit $failed
