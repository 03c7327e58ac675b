#!/usr/bin/env bash
# kdrun's GPU check: one prepared script, under 8 minutes on one H100/H200.
#
#   bash scripts/gpu_check.sh             # run it (needs a CUDA GPU and kdrun's venv active)
#   bash scripts/gpu_check.sh --dry-run   # print every command it would run, run nothing
#
# Steps, in order of importance (each under its own time limit, all within DEADLINE seconds, 470 by
# default: a step that would start too late is skipped and says so; a failing step is reported and
# the next one runs):
#   1. the device: torch's view of it
#   2. the test suite's CUDA tests (pytest -k cuda: AMP bf16 and fp16-with-GradScaler KD steps and
#      the teacher cache on the GPU, CUDA data loading)
#   3. AMP KD runs through the CLI: bf16, and fp16 with the grad scaler
#   4. torchrun with one process per GPU (1 GPU: one process; 2 or more: DDP over NCCL on two)
#   5. one real epoch: kdrun on 50,000 CIFAR-sized generated images, resnet56 -> resnet20 KD, 2 epochs
#      (metrics.csv: epoch_seconds, images_per_second)
#   6. scripts/bench.py on CUDA at batch 64 and 256: img/s and s/epoch of kdrun, the compute limit
#      and the plain reference loop, eager, torch.compile and CUDA graphs; evaluation of 10,000 images
# Everything goes to $OUT (default gpu_check_out/): log.txt (all output) and summary.txt.
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; elif [[ $# -gt 0 ]]; then
  echo "usage: bash scripts/gpu_check.sh [--dry-run]" >&2; exit 2
fi
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
OUT=${OUT:-gpu_check_out}
DEADLINE=${DEADLINE:-470}
RUNS="$OUT/runs"
FAILED=0

run_step() {  # run_step NAME SECONDS COMMAND...: run it under a time limit, log it, record ok/FAIL
  local name=$1 limit=$2
  shift 2
  local shown
  printf -v shown '%q ' "$@"
  echo "== $name (limit ${limit} s): ${shown% }"
  if (( DRY )); then return 0; fi
  local left=$((DEADLINE - SECONDS))
  if (( left < 15 )); then echo "SKIP  $name (the ${DEADLINE} s budget is spent)" | tee -a "$OUT/summary.txt"; return 0; fi
  (( limit > left )) && limit=$left
  local start=$SECONDS rc
  { echo "== $name: $*"; timeout "$limit" "$@"; } >>"$OUT/log.txt" 2>&1
  rc=$?
  local took=$((SECONDS - start))
  if (( rc == 0 )); then echo "ok    $name (${took} s)" | tee -a "$OUT/summary.txt"
  else FAILED=1; echo "FAIL  $name (exit $rc after ${took} s; see $OUT/log.txt)" | tee -a "$OUT/summary.txt"; fi
  tail -n 4 "$OUT/log.txt"
}

TINY=(dataset=synthetic trainer.device=cuda trainer.progress=off "paths.output_root=$RUNS")
KD=(teacher=resnet56 student=resnet20 loss=kd trainer.epochs=1 trainer.limit_train_batches=40)

if (( ! DRY )); then
  mkdir -p "$RUNS" && : >"$OUT/log.txt" && : >"$OUT/summary.txt"
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device; nothing to check here (--dry-run prints the steps)" >&2; exit 1
  fi
fi
NGPU=$( (( DRY )) && echo 1 || $PY -c "import torch; print(torch.cuda.device_count())")

run_step device 20 $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), \
torch.cuda.get_device_properties(0).total_memory // 2**30, 'GiB', 'bf16', torch.cuda.is_bf16_supported())"
run_step cuda-tests 75 $PY -m pytest -q -rs -k cuda -p no:cacheprovider tests
run_step amp-bf16 40 $PY -m kdrun "${TINY[@]}" "${KD[@]}" trainer.amp=bf16
run_step amp-fp16-scaler 40 $PY -m kdrun "${TINY[@]}" "${KD[@]}" trainer.amp=fp16
run_step torchrun-1gpu 40 torchrun --standalone --nproc_per_node=1 -m kdrun "${TINY[@]}" "${KD[@]}"
if (( NGPU >= 2 )); then
  run_step torchrun-2gpu-ddp 50 torchrun --standalone --nproc_per_node=2 -m kdrun "${TINY[@]}" "${KD[@]}" \
    trainer.sync_bn=true
fi
run_step epoch-50k 70 $PY -m kdrun "${TINY[@]}" dataset.n_train=50000 dataset.n_test=10000 dataset.image_size=32 \
  dataset.num_classes=100 teacher=resnet56 student=resnet20 loss=kd trainer.epochs=2 teacher.epochs=1 \
  trainer.batch_size=64
BENCH=($PY scripts/bench.py --device cuda --batch 64 --big-batch 256 --steps 40 --epoch-images 50000)
run_step bench-eager 60 "${BENCH[@]}" --rounds 2 --eval-images 10000
# compiling resnet56 + resnet20 takes most of these two (once per batch size; the loops then share it)
run_step bench-compile 100 "${BENCH[@]}" --rounds 1 --eval-images 0 --no-reference --compile
run_step bench-cuda-graphs 100 "${BENCH[@]}" --rounds 1 --eval-images 0 --no-reference --cuda-graphs

if (( ! DRY )); then
  echo "== figures"
  grep -hE "^(batch|eval|efficiency|speedup|device)|img/s" "$OUT/log.txt" | grep -vE "INFO +(teacher|student).*epoch" \
    | tee -a "$OUT/summary.txt"
  $PY - "$RUNS" <<'EOF' | tee -a "$OUT/summary.txt"
import csv, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("runs/*/*/metrics.csv")):
    print(path.parent.name)
    for r in csv.DictReader(open(path)):
        print(f"  {r['stage']:8s} epoch {r['epoch']:>3s}  test {r['test_top1']:>6s}%  {float(r['epoch_seconds']):7.2f} s"
              f"  {float(r['images_per_second']):9.1f} img/s")
EOF
fi
exit $FAILED
