# GPT-2 medium (24 layers, 16 heads, 1024 wide) on OpenWebText-sized data with adamw, with the hyperparameters
# of the Sophia authors' config (Liu et al. 2023, github.com/Liuhong99/Sophia).
# gradient_accumulation_steps is per process. Tokens per optimizer step:
# 6 batch size * 1024 block size * 10 accumulation * 8 GPUs = 491,520 (~0.5M).
# Keep processes * batch_size * gradient_accumulation_steps = 480 on other hardware, e.g.
# torchrun --standalone --nproc_per_node=8 train_adam.py config/train_gpt2_medium_adam.py --batch_size=12 --gradient_accumulation_steps=5
wandb_log = False
wandb_project = "sophia"
wandb_run_name = "gpt2-medium_adam-100k"
out_dir = "out-gpt2-medium_adam"
dataset = "openwebtext"  # prepare it with: python prepare.py --hf_dataset=openwebtext --out=data/openwebtext

batch_size = 6
block_size = 1024
gradient_accumulation_steps = 10

n_layer = 24
n_head = 16
n_embd = 1024
dropout = 0.0  # for pretraining 0 is good, for finetuning try 0.1+
bias = False
scale_attn_by_inverse_layer_idx = True

# 100k steps * 491,520 tokens = 49B tokens
max_iters = 100000
lr_decay_iters = 100000
warmup_iters = 2000

eval_interval = 1000
eval_iters = 200
log_interval = 10

optimizer = "adamw"
learning_rate = 3e-4
min_lr = 6e-5
weight_decay = 1e-1
decay_embeddings = False  # as the Sophia authors: no weight decay on wte (the tied head) and wpe
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
compile = True
