# The reference experiment of the project this one is modelled on: a tiny GPT-2 on Chinese text.
# Its command left gradient_accumulation_steps at nanoGPT's default of 40, so one optimizer step is
# 12 batch * 64 block * 40 accumulation = 30,720 tokens; 2000 steps = 61.4M tokens.
# Too slow for a laptop CPU: see train_tiny_zh_cpu.py.
out_dir = "out-tiny-zh"
dataset = "zh_default"
n_layer = 2
n_head = 2
n_embd = 128
block_size = 64
batch_size = 12
gradient_accumulation_steps = 40
dropout = 0.1
bias = True
max_iters = 2000
lr_decay_iters = 2000
eval_interval = 100
eval_iters = 20  # train batches per evaluation
val_full_split = True  # val loss over the whole val split (~800 windows of the default corpus)
log_interval = 10
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
