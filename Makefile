# The two commands of the README. `make demo`: install, then prepare the embedded default Chinese
# corpus, train the tiny model on the CPU for a few minutes, and sample from it. `make test`: install
# with the test tools, then run the test suite. The demo retrains from scratch when run again: it passes
# --overwrite_out_dir=True, which train.py otherwise requires before replacing a run's checkpoint.
PYTHON ?= python3

.PHONY: demo test

demo:
	PYTHON=$(PYTHON) ./install.sh
	$(PYTHON) prepare.py
	$(PYTHON) train.py config/train_tiny_zh_cpu.py --overwrite_out_dir=True --max_iters=600 --lr_decay_iters=600 --warmup_iters=60 --eval_interval=200 --log_interval=50
	$(PYTHON) sample.py --out_dir=out-tiny-zh-cpu --start=滚滚长江 --max_new_tokens=100 --num_samples=2

test:
	PYTHON=$(PYTHON) ./install.sh --test
	$(PYTHON) -m pytest -q tests
