#!/usr/bin/env bash
# The one prepared GPU check: a single-GPU machine with no network and no Ray, at most 64 MiB of
# inputs, about 9 minutes (BUDGET seconds). It needs the bundle of
#     python bench/quality_gpu.py export --out .gpu_quality [--only ...]     (here; git-ignored: carry it)
# and writes everything under $OUT (default gpu_out/):
#   gpu.txt                the machine;
#   local_attention.txt    banded vs dense local attention, L = 64..512 (about 1 min);
#   model_throughput.txt   train samples/s and predict sentences/s, fp32 and bf16, on the bundle's
#                          pruned e5 and its largest KnowFREE-F training file (about 2 min);
#   results.jsonl          quality-harness records of the exported cells, trained 8 at a time
#                          until the budget ends less PREDICT_S (a rerun trains what is still missing);
#   predict_throughput.txt prediction sentences/s of a single-process loop, fp32 and bf16, on a model
#                          those cells saved (F first; PREDICT_MODEL to choose one) and the largest
#                          F training file (at most PREDICT_S = 45 s; skipped when no model was saved);
#   RESULTS.md             bench/RESULTS.md with the tables appended.
# Back here:
#   python bench/quality_gpu.py import --from <files_at>/results.jsonl
#   and copy the new tail of <files_at>/RESULTS.md into bench/RESULTS.md.
# A smoke run of this script on a CPU, appending nothing:
#   DEVICE=cpu LENGTHS=64 APPEND= BUDGET=240 PARALLEL=2 BUNDLE=/tmp/gq OUT=/tmp/gq-out bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu_out}
BUNDLE=${BUNDLE:-.gpu_quality}
BUDGET=${BUDGET:-540}
DEVICE=${DEVICE:-cuda}
PARALLEL=${PARALLEL:-8}
LENGTHS=${LENGTHS:-64 128 256 512}
PREDICT_S=${PREDICT_S:-45}   # kept from the quality cells for the prediction loop; 0: no prediction step
APPEND=${APPEND---append}   # empty: print the tables only
started=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - started) )); }
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
} | tee "$OUT/gpu.txt"
if [ ! -f "$BUNDLE/runs.json" ]; then
  echo "no bundle at $BUNDLE: run 'python bench/quality_gpu.py export --out $BUNDLE' first and carry it" >&2
  exit 2
fi

# The largest exported KnowFREE-F training file, and the test file of its dataset.
train=$(wc -l "$BUNDLE"/cells/*/*/F/train.jsonl 2>/dev/null | grep -v ' total$' | sort -n | tail -1 | awk '{print $2}')
if [ -n "$train" ]; then
  dataset=$(echo "$train" | awk -F/ '{print $(NF-3)}')
  size=$(wc -l < "$train")
fi

echo "== local attention ($(left) s left)"
# shellcheck disable=SC2086
timeout 150 python bench/local_attention.py --device "$DEVICE" --lengths $LENGTHS --repeats 3 $APPEND \
  2>&1 | tail -20 | tee "$OUT/local_attention.txt"

if [ -n "$train" ]; then
  echo "== model throughput on $train ($(left) s left)"
  precisions="fp32 bf16"; [ "$DEVICE" = cpu ] && precisions=fp32
  limit=(); [ "$DEVICE" = cpu ] && limit=(--limit 8 --train-batches 2)
  # shellcheck disable=SC2086
  timeout 200 python bench/model_throughput.py --encoder "$BUNDLE/e5" --device "$DEVICE" --data "$train" \
    --size "$size" --test "$BUNDLE/eval/$dataset/test.jsonl" --precision $precisions --batch-size 16 32 \
    "${limit[@]}" $APPEND 2>&1 | tail -20 | tee "$OUT/model_throughput.txt"
fi

echo "== quality cells ($(left) s left)"
deadline=$(( $(left) - 15 - PREDICT_S ))
if [ "$deadline" -gt 30 ]; then
  python bench/quality_gpu.py train --bundle "$BUNDLE" --results "$OUT/results.jsonl" --parallel "$PARALLEL" \
    --deadline "$deadline" 2>&1 | tail -40 | tee "$OUT/quality.txt"
fi
# jobs.predict's code in one process (no Ray here): a model saved by a quality cell, F first.
model=${PREDICT_MODEL:-}
if [ -z "$model" ]; then
  for manifest in "$BUNDLE"/runs/*/*/F/model/knowfree.json "$BUNDLE"/runs/*/*/*/model/knowfree.json; do
    if [ -f "$manifest" ]; then model=$(dirname "$manifest"); break; fi
  done
fi
seconds=$(( $(left) - 10 )); [ "$seconds" -gt "$PREDICT_S" ] && seconds=$PREDICT_S
if [ "$PREDICT_S" -gt 0 ] && [ -n "$model" ] && [ -n "$train" ] && [ "$seconds" -gt 20 ]; then
  echo "== prediction loop on $model ($(left) s left)"
  precisions="fp32 bf16"; [ "$DEVICE" = cpu ] && precisions=fp32
  limit=(); [ "$DEVICE" = cpu ] && limit=(--limit 32)
  # shellcheck disable=SC2086
  timeout "$seconds" python bench/predict_throughput.py --model "$model" --data "$train" --loop-only \
    --device "$DEVICE" --precision $precisions "${limit[@]}" $APPEND 2>&1 | tail -15 | tee "$OUT/predict_throughput.txt"
else
  echo "== prediction loop skipped: no saved model under $BUNDLE/runs (PREDICT_MODEL), no training file, or \
no time left ($(left) s)" | tee "$OUT/predict_throughput.txt"
fi

cp bench/RESULTS.md "$OUT/RESULTS.md"
echo "== done in $(( $(date +%s) - started )) s"
