# The reference experiment of the project this one is modelled on: a tiny GPT-2 on Chinese text.
# Its command left gradient_accumulation_steps at nanoGPT's default of 40, so one optimizer step is
# 12 batch * 64 block * 40 accumulation = 30,720 tokens; 2000 steps = 61.4M tokens.
# Everything it did not set stays at nanoGPT's defaults (train.py's): lr 6e-4, 2000 warmup steps,
# cosine decay over 600,000 steps. So at step 2000 the learning rate has only just finished warming
# up: kept as it was, to reproduce. train_tiny_zh_adam.py / _sophiag.py run the same budget with a
# schedule that decays; train_tiny_zh_cpu.py is the laptop-sized version.
out_dir = "out-tiny-zh"
dataset = "zh_default_gpt2"  # GPT-2's BPE, as the reference used: python prepare.py --tokenizer=gpt2
n_layer = 2
n_head = 2
n_embd = 128
block_size = 64
batch_size = 12
gradient_accumulation_steps = 40
dropout = 0.1
bias = True
max_iters = 2000
eval_interval = 100
eval_iters = 20  # train batches per evaluation
val_full_split = True  # val loss over the whole val split (~800 windows of the default corpus)
log_interval = 10
