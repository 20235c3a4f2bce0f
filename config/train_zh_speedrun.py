# The CPU recipe, tuned for 10 minutes on 2 cores; on a GPU (device "auto") it trains this same small model there.
# The lowest val bits per character we measured for a fixed wall-clock budget on a laptop CPU
# (logs/speedrun/speedrun.md, logs/speedrun/tokenizers.md). How each setting was picked, with the
# runs: logs/README.md#tuning-the-cpu-recipe. Give the budget on the command line:
#   python prepare.py --vocab_size=12288 && python train.py config/train_zh_speedrun.py --max_minutes=10
# 32 batch * 128 block * 1 accumulation = 4,096 tokens (~5,600 characters) per step.
out_dir = "out-zh"
dataset = "zh_default_bpe12288"  # python prepare.py --vocab_size=12288: ahead of the default 8,192 at 10 minutes (behind at 2)
n_layer = 4  # depth and a larger batch paid; width cost more than it gave
n_head = 2
n_embd = 128
block_size = 128
batch_size = 32
gradient_accumulation_steps = 1
sampling = "epochs"  # every token once per epoch, in shuffled windows (data.ShuffledEpochs): beat windows drawn anywhere
dropout = 0.0  # 0.1 is worse even at equal steps, and its steps cost 50% more
weight_decay = 0.4  # on the hidden matrices (Muon) and the embedding (AdamW): train loss ends far below val
bias = False
rotary = True  # rotary position embeddings; export.py writes the model as GPT-NeoX
activation = "relu2"  # ReLU squared in the MLP
optimizer = "muon"  # Muon on the hidden matrices, AdamW on embeddings and norms (opengpt/muon.py)
muon_momentum = 0.9  # Muon's authors use 0.95; 0.9 won here with query, key and value orthogonalised apart
learning_rate = 6e-3  # the 2-minute sweeps pick 6e-3 or 1.2e-2; 6e-3 won over 10 minutes
min_lr = 6e-4
ema_decay = 0.995  # evaluate and save a moving average of the weights (opengpt/weight_average.py)
warmup_iters = 100
max_iters = 5000  # replaced by the horizon that --max_minutes measures
lr_decay_iters = 5000
eval_interval = 100000  # evaluate at the end only: evaluations spend the budget
eval_iters = 4  # train batches per evaluation: the train loss is only a check; val is the whole split
val_full_split = True  # val bits per character over the whole val split
log_interval = 50
dtype = "auto"  # bfloat16 where the CPU multiplies it natively (AVX512_BF16, AMX), else float32
# torch.compile fuses the small ops around the matmuls: it pays from ~1.5 minutes of budget on. On a CPU
# it needs a C++ compiler: without one the run stops at once with a one-line error; --compile=False runs eagerly.
compile = True
