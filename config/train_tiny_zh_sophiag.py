# The reference tiny Chinese experiment's budget (see train_tiny_zh.py: 30,720 tokens per step,
# 2000 steps) with SophiaG, warming up for 100 steps and decaying fully by step 2000. The
# learning rate, 1e-3, is not tuned per optimizer: the tuned comparison is logs/compare/results.md.
out_dir = "out-tiny-zh-sophiag"
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
optimizer = "sophiag"
beta1 = 0.965  # the Sophia authors' betas, weight decay and rho
beta2 = 0.99
weight_decay = 0.2
rho = 0.05
hess_interval = 10  # 0 reproduces the older project's runs: no Hessian, sign momentum
