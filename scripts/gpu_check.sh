#!/usr/bin/env bash
# One prepared GPU check, at most 8 minutes on one GPU; the report goes to docs/reports/gpu_check_<device>.md.
#
#   bash scripts/gpu_check.sh              # on a machine with a CUDA GPU
#   bash scripts/gpu_check.sh --cpu-smoke  # every stage on tiny sizes on the CPU (a check of the script itself)
#
# Stages (each under its own time limit, so the whole stays within 8 minutes; a stage that runs out is reported
# as timed out and the others still run):
#   decode_base, decode_large2  the fast decode path (bf16, compiled blocks) against diffusers, eager bf16 for both,
#                               512 and 1024 px, with the condition (scripts/benchmark.py)
#   compiled                    the eager bf16 path of both implementations under torch.compile, 512 px
#   scale                       training step at 256 px: ours, the original two-forward step, ours --fast; peak
#                               memory with / without gradient checkpointing for base / large / large2 and the
#                               batch that fits 24 / 80 GB; shard loader against folder loader
#   plain, fast                 main.py and main.py --fast, 200 steps of the base recipe at 256 px from
#                               webdataset shards (median step time)
#   ddp                         main.py from the shards under Lightning's DDP strategy on the device
set -uo pipefail

SMOKE=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then SMOKE=1; fi
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
WORK=${GPU_CHECK_WORK:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$WORK"
: > "$WORK/stages.txt"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $WORK/NAME.log, note the exit status
  local name=$1 limit=$2 start
  shift 2
  start=$(date +%s)
  echo "== $name (at most ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $(( $(date +%s) - start ))" >> "$WORK/stages.txt"
  if [[ $rc -ne 0 ]]; then echo "   exit $rc; see $WORK/$name.log"; tail -n 5 "$WORK/$name.log"; fi
}

if [[ $SMOKE -eq 1 ]]; then
  DEVICE=(--device cpu --threads 1)
  DECODE=(--variants tiny --sizes 32 64)
  STEPS=30; SKIP=5; GPUS=(); LIMIT=900; REPORT_DIR="$WORK"  # CPUs: no time budget
  SCALE=(--suite scale_quick --device cpu)
else
  DEVICE=(--device cuda)
  DECODE=(--sizes 512 1024)
  STEPS=200; SKIP=20; GPUS=(--gpus "0,"); LIMIT=0; REPORT_DIR=docs/reports
  # the scale suite narrowed to the time budget: training-step rows for base only (the workers estimate)
  SCALE=(--device cuda --memory --loader --variants base --sizes --paths eager --tiled_sizes --attention_sizes
         --train_variants base --train_size 256 --memory_variants base large large2 --warmup 1 --repeats 3
         --loader_images 256 --no_diffusers)
fi
limit() { if [[ $LIMIT -gt 0 ]]; then echo "$LIMIT"; else echo "$1"; fi; }  # smoke: one generous limit for all

COMMON=(--condition on --paths eager fast --dtype bf16 --tiled_sizes --attention_sizes --no_train --warmup 3
        --repeats 10)
if [[ $SMOKE -eq 1 ]]; then
  stage decode_base "$(limit 0)" "$PY" scripts/benchmark.py "${COMMON[@]}" "${DEVICE[@]}" "${DECODE[@]}" \
    --dtype fp32 --warmup 1 --repeats 1 --out "$WORK/decode_base"
else
  stage decode_base "$(limit 65)" "$PY" scripts/benchmark.py "${COMMON[@]}" "${DEVICE[@]}" "${DECODE[@]}" \
    --variants base --out "$WORK/decode_base"
  stage decode_large2 "$(limit 80)" "$PY" scripts/benchmark.py "${COMMON[@]}" "${DEVICE[@]}" "${DECODE[@]}" \
    --variants large2 --out "$WORK/decode_large2"
  stage compiled "$(limit 45)" "$PY" scripts/benchmark.py "${COMMON[@]}" "${DEVICE[@]}" --variants base \
    --sizes 512 --paths eager --compile --out "$WORK/compiled"
fi
stage scale "$(limit 110)" "$PY" scripts/benchmark.py "${SCALE[@]}" --out "$WORK/scale"

stage prepare "$(limit 20)" "$PY" scripts/gpu_check.py prepare --work "$WORK" \
  $([[ $SMOKE -eq 1 ]] && echo --cpu-smoke)
TRAIN=(--base "$WORK/train.yaml" -t --no-test --wandb off --logdir "$WORK/logs" --max_steps "$STEPS"
       lightning.callbacks.image_logger.params.disabled=true
       lightning.callbacks.timer.target=scripts.gpu_check.StepTimer lightning.callbacks.timer.params.skip="$SKIP")
stage plain "$(limit 50)" "$PY" main.py "${TRAIN[@]}" "${GPUS[@]}" -n plain \
  lightning.callbacks.timer.params.path="$WORK/plain.json"
stage fast "$(limit 70)" "$PY" main.py "${TRAIN[@]}" "${GPUS[@]}" --fast -n fast \
  lightning.callbacks.timer.params.path="$WORK/fast.json"
stage ddp "$(limit 30)" "$PY" main.py "${TRAIN[@]}" "${GPUS[@]}" -n ddp --max_steps 20 \
  lightning.trainer.strategy=ddp_find_unused_parameters_true lightning.callbacks.timer.params.path="$WORK/ddp.json"

"$PY" scripts/gpu_check.py report --work "$WORK" --out "$REPORT_DIR"
echo "work folder: $WORK"
