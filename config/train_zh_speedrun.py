# Our default recipe for a laptop CPU: the best val bits per character we measured for a fixed
# wall-clock budget on 2 cores (see the README's speedrun and tokenizer tables, written by
# logs/speedrun.py). Give the budget on the command line:
#   python train.py config/train_zh_speedrun.py --max_minutes=10
# 16 batch * 128 block * 1 accumulation = 2,048 tokens (~2,800 characters) per step.
# The shape was picked by pairs of runs side by side (one thread each, same budget, 8,192-token
# BPE, lr 3e-3, AMD EPYC Zen 4): at 3 minutes 2 layers x 128 wide reached 7.19 bits/char (twice),
# 3 x 192 7.63, 4 x 256 7.96; at 5 minutes 2 x 128 6.90, 4 x 128 7.22. In minutes on a CPU, more
# tokens through a small model beat fewer through a large one.
out_dir = "out-zh"
dataset = "zh_default"  # the 8,192-token BPE trained on the default corpus's train split
n_layer = 2
n_head = 2
n_embd = 128
block_size = 128
batch_size = 16
gradient_accumulation_steps = 1
dropout = 0.0  # a few epochs at most in 10 minutes: nothing to regularise yet
bias = False
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 100
max_iters = 5000  # replaced by the horizon that --max_minutes measures
lr_decay_iters = 5000
eval_interval = 100000  # evaluate at the end only: evaluations spend the budget
eval_iters = 4  # train batches per evaluation: the train loss is only a check; val is the whole split
val_full_split = True  # val bits per character over the whole val split
log_interval = 50
device = "cpu"
dtype = "auto"  # bfloat16 where the CPU multiplies it natively (AVX512_BF16, AMX), else float32
# torch.compile fuses the small ops around the matmuls: 72.7 vs 91.0 ms per step here (Zen 4, 2 cores,
# bf16), for ~16 s of compiling at the start: from ~1.5 minutes of budget on it trains more steps (10
# minutes: ~7,900 vs ~6,600). It needs a C++ compiler on a CPU: without one the run stops at once with
# a one-line error, and --compile=False runs eagerly.
compile = True
