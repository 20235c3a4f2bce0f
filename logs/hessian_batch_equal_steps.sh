#!/bin/bash
# SophiaG's Hessian on fresh windows (the authors') against on the step's own (--hessian_batch=step),
# at equal steps: the comparison's setting where SophiaG did best (logs/compare/results.md: 8 x 64 tokens
# per step, 1,562 steps, rho 0.05, lr 1.25e-4, k = 10), seeds 1-3, one thread, val bits per character
# over the whole val split at the end. Fixed steps: a busy machine changes the time, not the result.
# Prints one line per run, then the mean per mode; runs go to out-hessian-batch/. SEEDS (default "1 2 3")
# from the environment:
#   logs/hessian_batch_equal_steps.sh > logs/hessian_batch/results.txt 2>&1   (each run, then the means)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
mkdir -p out-hessian-batch
for seed in ${SEEDS:-1 2 3}; do
  for mode in fresh step; do
    out=out-hessian-batch/${mode}_seed$seed
    python train.py --data_dir=data/zh_default --out_dir="$out" --overwrite_out_dir=True --device=cpu --dtype=float32 \
      --compile=False --optimizer=sophiag --beta1=0.965 --beta2=0.99 --weight_decay=0.2 --decay_embeddings=False \
      --hess_interval=10 --rho=0.05 --learning_rate=1.25e-4 --min_lr=1.25e-5 --seed=$seed \
      --n_layer=2 --n_head=2 --n_embd=128 --block_size=64 --bias=False --dropout=0.0 --batch_size=8 \
      --gradient_accumulation_steps=1 --max_iters=1562 --lr_decay_iters=1562 --warmup_iters=78 \
      --eval_interval=1562 --eval_iters=4 --val_full_split=True --log_interval=500 \
      --hessian_batch=$mode > "$out.log" 2>&1 || {
      echo "hessian_batch=$mode seed=$seed: train.py failed: $(tail -n 1 "$out.log")" >&2; exit 1; }
    bpc=$(grep -o "val [0-9.]* bits/char" "$out.log" | tail -n 1 | cut -d' ' -f2)
    line="hessian_batch=$mode seed=$seed val_bits_per_char=$bpc"
    # to stderr as it is, never reopened (tee /dev/stderr would truncate a file it points at), and to the means
    echo "$line" >&2
    echo "$line"
  done
done | awk '{split($1, m, "="); split($3, v, "="); s[m[2]] += v[2]; n[m[2]]++}
  END {for (k in s) printf "hessian_batch=%s mean over %d seeds: %.3f\n", k, n[k], s[k] / n[k]}'
