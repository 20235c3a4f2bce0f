# Our default recipe for a laptop CPU: the best val bits per character we measured for a fixed
# wall-clock budget on 2 cores (see the README's speedrun and tokenizer tables, written by
# logs/speedrun.py). It trains on a 12,288-token BPE (prepare.py's default is 8,192); give the budget
# on the command line:
#   python prepare.py --vocab_size=12288 && python train.py config/train_zh_speedrun.py --max_minutes=10
# 32 batch * 128 block * 1 accumulation = 4,096 tokens (~5,600 characters) per step.
# Shape and optimizer were picked by pairs of runs side by side (logs/recipe_tuning.sh: one thread
# each for 16.5 minutes, about the steps 2 threads train in 10; AMD EPYC Zen 4; the runs' logs and
# flags are in logs/speedrun/tuning/). Val bits/char, starting from the earlier recipe (2 layers,
# batch 16, AdamW, lr 3e-3):
#   earlier recipe 5.847 | Muon 5.772 (lr 6e-3: 5.801, 1.2e-2: 5.832)
#   Muon + dropout 0.1 5.870 (a third fewer steps) | + weight decay 0.5 5.823 | + batch 8 5.993
#   Muon, 4 layers 5.702 | 6 layers 5.714 | batch 32 5.721 | 4 layers and batch 32 5.666
# Regularising does not pay in 10 minutes; Muon, depth and a larger batch do. (Earlier, with AdamW,
# 2 x 128 beat 3 x 192 and 4 x 256 at 3 minutes: width costs more than it gives.)
# Then, with half-length pairs (8.25 minutes, one thread each; "fixed" = both trained the same 1,200
# steps, so the comparison does not depend on the machine's speed), val bits/char:
#   rotary positions 5.869 vs learned 5.921 (8.25 min) | BPE 4,096 5.924 vs 8,192 5.812 (8.25 min)
#   fixed, rotary: lr 3e-3 5.828 | 6e-3 5.735 | 1.2e-2 5.723 | min_lr 0 5.873 | 4 heads 5.842
#   fixed, rotary, lr 6e-3: relu2 5.723 | min_lr 1.2e-3 5.745 | no gradient clipping 5.758
#   a hashed bigram input table (32k or 128k rows) memorised the corpus: 6.061 and 6.167 vs 5.828
# Ten minutes read the train split about six times (2,500 steps x 4,096 tokens, 1.76M tokens), and by
# the end train loss was 0.85 nats below val (0.75 with the 0.4 below): weight decay pays. Fixed 1,200 steps:
#   weight decay 0.1 5.723 (and dropout 0.1: 5.810) | 0.2 5.707 | 0.4 5.683 | 0.6 5.689 | 1.0 5.731
#   with 0.4: not on the embeddings 5.696 | lr 1.2e-2 5.694 | untied head 5.714 | zero-initialised output
#   projections 5.691 | constant lr, then linear decay over the last half 5.693 | block 256 x batch 16 5.773
#   8.25 min: 96 wide (1,712 steps) 5.718 vs 128 wide (1,295 steps) 5.674
# Then runs of the whole regime: a fixed 2,830 steps (the horizon of the last 10-minute run on 2 threads),
# one thread each; "average" = the moving average of the weights, evaluated beside the weights:
#   windows drawn anywhere (nanoGPT's) 5.505, average 0.99 / 0.995 / 0.998: 5.446 / 5.425 / 5.413
#   read in shuffled epochs 5.390, average 0.99 / 0.995 / 0.998: 5.344 / **5.333** / 5.341
#   with both (average 0.995): lr 1.2e-2 5.363 | weight decay 0.8 5.375 | AdamW part at half the lr 5.364 |
#   RMS-normalised queries and keys 5.338 (not kept: no gain, and GPT-NeoX has no place for it)
# and on top of this config (5.333), with the steps the same time buys where a change alters a step's cost:
#   lr 4.2e-3 5.359 | AdamW part at twice the lr 5.334 | Muon momentum 0.9 5.331 (a tie) | one head 5.377 |
#   5 layers 5.344 | batch 64 5.348
# and then (logs/speedrun/tuning/r_*): Muon orthogonalising query, key and value apart 5.328, and with
#   momentum 0.9 **5.314**: both kept | block 64 x batch 64 5.368 | rotary on half of each head 5.342 |
#   attention kept inside each document 5.338 | BPE-dropout 0.1 on the train split 5.441 | a 12,288-token
#   BPE (1.2x a step: 2,320 steps) 5.328, and with both kept changes 5.294 (2,348 steps); over 10 minutes on
#   2 threads 5.307 against 5.322 on 8,192 (README, tokenizer table)
# and the vocabulary at the steps the same time buys (step cost against 8,192's timed in alternation, 2 threads):
#   8,192 5.314 (2,830 steps) | 10,240 5.300 (1.09x a step, 2,599) | 12,288 5.294 (1.2x, 2,348) |
#   16,384 5.291 (1.46x, 1,940): 12,288 kept, level with 16,384 on cheaper steps. At 2 minutes 8,192 is
#   ahead (the tokenizer table), so make demo's 3 minutes train on prepare.py's default folder.
out_dir = "out-zh"
dataset = "zh_default_bpe12288"  # python prepare.py --vocab_size=12288: the BPE trained on the default corpus's train split
n_layer = 4
n_head = 2
n_embd = 128
block_size = 128
batch_size = 32
gradient_accumulation_steps = 1
sampling = "epochs"  # every token once per epoch, in shuffled windows (data.ShuffledEpochs); measured above
dropout = 0.0  # measured above: 0.1 is worse even at equal steps, and its steps cost 50% more
weight_decay = 0.4  # on the hidden matrices (Muon) and the embedding (AdamW); measured above
bias = False
rotary = True  # rotary position embeddings; export.py writes the model as GPT-NeoX
activation = "relu2"  # ReLU squared in the MLP
optimizer = "muon"  # Muon on the hidden matrices, AdamW on embeddings and norms (muon_adamw.py)
muon_momentum = 0.9  # measured above (Muon's authors use 0.95)
learning_rate = 6e-3  # 1.2e-2 tied it at 1,200 steps; over 10 minutes (2 threads) 6e-3 gave 5.530, 1.2e-2 5.571,
# and with shuffled epochs and the weight average 5.371 and 5.382, then 5.343 and 5.368 (the speedrun tables, README);
# with Muon splitting query, key and value at momentum 0.9, the 2-minute sweep picked 6e-3 itself: 5.322;
# on the 12,288-token BPE it picked 1.2e-2, which gave 5.303 over 10 minutes against 5.293 at 6e-3
min_lr = 6e-4
ema_decay = 0.995  # evaluate and save a moving average of the weights (weight_average.py); measured above
warmup_iters = 100
max_iters = 5000  # replaced by the horizon that --max_minutes measures
lr_decay_iters = 5000
eval_interval = 100000  # evaluate at the end only: evaluations spend the budget
eval_iters = 4  # train batches per evaluation: the train loss is only a check; val is the whole split
val_full_split = True  # val bits per character over the whole val split
log_interval = 50
device = "cpu"
dtype = "auto"  # bfloat16 where the CPU multiplies it natively (AVX512_BF16, AMX), else float32
# torch.compile fuses the small ops around the matmuls: 72.7 vs 91.0 ms per step (the earlier recipe;
# Zen 4, 2 cores, bf16), for ~16 s of compiling at the start, so from ~1.5 minutes of budget on it
# trains more steps. It needs a C++ compiler on a CPU: without one the run stops at once with
# a one-line error, and --compile=False runs eagerly.
compile = True
