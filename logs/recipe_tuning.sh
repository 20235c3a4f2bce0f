#!/bin/bash
# One candidate recipe, as the config's tuning notes were measured: a single thread, 16.5 minutes
# (about the steps 2 threads train in 10), val bits per character over the whole val split. Start
# two at once, one per core, to compare them side by side; each appends its last line to results.txt.
#   logs/recipe_tuning.sh muon_l4 --optimizer=muon --n_layer=4 & logs/recipe_tuning.sh base &
set -euo pipefail
name=$1; shift
cd "$(dirname "$0")/.."
out=logs/speedrun/tuning/$name
mkdir -p "$out"
# the log under a temp name, moved over train.log only when the run succeeds: a failed one keeps the earlier log
log="$out/.train.log.tmp$$"
trap 'rm -f "$log"' EXIT
OMP_NUM_THREADS=1 python train.py config/train_zh_speedrun.py --out_dir="$out" --device=cpu \
  --eval_interval=100000 --val_full_split=True --max_minutes=16.5 --overwrite_out_dir=True "$@" > "$log" 2>&1 || {
  echo "$0 $name: train.py failed: $(tail -n 1 "$log")" >&2; exit 1; }
mv "$log" "$out/train.log"
rm -f "$out/ckpt.pt"  # the logs are what the notes need
grep "val .* bits/char" "$out/train.log" | tail -n 1 | sed "s|^|$name $*: |" >> logs/speedrun/tuning/results.txt
