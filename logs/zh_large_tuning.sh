#!/bin/bash
# One candidate recipe on the corpus a 10-minute run does not repeat (data/zh_large, 37.5M train
# tokens; issue #27): a single thread, a FIXED number of steps so that a busy machine does not bias
# the comparison (a budget's steps would depend on the load), the cosine finished at those steps, the
# config's 100 warm-up steps (what a --max_minutes run keeps at this length), val bits per character
# over the whole val split, train loss over 20 batches at the end (does the run memorise?). With the
# weight average on (the recipe's ema_decay), the trained weights are evaluated too (eval.py on a copy
# of the checkpoint): the average never feeds back into training, so they are the ema-off run's
# weights. Start two at once, one per core; each appends its lines to results.txt. STEPS (default
# 600) and DATA (default data/zh_large) come from the environment:
#   logs/zh_large_tuning.sh base & logs/zh_large_tuning.sh wd0.1 --weight_decay=0.1 &
#   logs/zh_large_tuning.sh --eval-only base    # the evaluations of a run whose training finished
set -euo pipefail
train=1
if [ "${1:-}" = --eval-only ]; then train=0; shift; fi
name=$1; shift
steps=${STEPS:-600}
data=${DATA:-data/zh_large}
cd "$(dirname "$0")/.."
out=logs/speedrun/zh_large/tuning/$name
results=logs/speedrun/zh_large/tuning/results.txt
export OMP_NUM_THREADS=1
if [ $train = 1 ]; then
  mkdir -p "$out"
  # the log under a temp name, moved over train.log only when the run succeeds: a failed one keeps the earlier log
  log="$out/.train.log.tmp$$"
  trap 'rm -f "$log"' EXIT
  python train.py config/train_zh_speedrun.py --data_dir="$data" --out_dir="$out" --device=cpu \
    --max_minutes=0 --max_iters="$steps" --lr_decay_iters="$steps" --warmup_iters=100 \
    --eval_interval=100000 --eval_iters=20 --val_full_split=True --overwrite_out_dir=True "$@" > "$log" 2>&1 || {
    echo "$0 $name: train.py failed: $(tail -n 1 "$log")" >&2; exit 1; }
  mv "$log" "$out/train.log"
fi
grep "^step .*val .* bits/char" "$out/train.log" | tail -n 1 | cut -d';' -f1 | sed "s|^|$name steps=$steps $*: |" >> "$results"
python - "$out" <<'PY'
import os, sys
from opengpt import checkpoint as ckpt
out = sys.argv[1]
checkpoint = ckpt.load(os.path.join(out, ckpt.FILENAME))
if "trained_model" in checkpoint:  # "model" is the weight average; evaluate the weights trained
    checkpoint["model"] = checkpoint.pop("trained_model")
    os.makedirs(os.path.join(out, "trained"), exist_ok=True)
    ckpt.save(checkpoint, os.path.join(out, "trained", ckpt.FILENAME))  # with a new checksum
PY
if [ -f "$out/trained/ckpt.pt" ]; then
  python eval.py --out_dir="$out/trained" --device=cpu --dtype=float32 --batch_size=32 > "$out/trained_weights_eval.txt" 2>&1
  grep "^val of" "$out/trained_weights_eval.txt" | sed "s|^|$name steps=$steps $*, trained weights (no average): |" >> "$results"
  rm -rf "$out/trained"
fi
rm -f "$out/ckpt.pt"  # the logs are what the notes need
