# The two commands of the README. `make demo`: install, then prepare the embedded default Chinese
# corpus (training its 8,192-token tokenizer), train the speedrun recipe on the CPU for 3 minutes on
# it, and sample from it. (The recipe's own 12,288-token vocabulary pays over 10 minutes; at 2
# logs/speedrun/tokenizers.md has 8,192 ahead, so the demo reads prepare.py's default folder.)
# `make test`: install with the test tools, then run the test suite, a process per core (pytest-xdist;
# a test file stays in one process, so its module fixtures are made once). The demo retrains from scratch
# when run again: it passes --overwrite_out_dir=True, which train.py otherwise requires before
# replacing a run's checkpoint.
PYTHON ?= python3
DEMO_MINUTES ?= 3

.PHONY: demo test

demo:
	PYTHON=$(PYTHON) ./install.sh
	$(PYTHON) prepare.py
	$(PYTHON) train.py config/train_zh_speedrun.py --dataset=zh_default --device=cpu --max_minutes=$(DEMO_MINUTES) --out_dir=out-demo --overwrite_out_dir=True
	$(PYTHON) sample.py --out_dir=out-demo --start=滚滚长江 --max_new_tokens=100 --num_samples=2

test:
	PYTHON=$(PYTHON) ./install.sh --test
	$(PYTHON) -m pytest -q -n auto --dist loadfile tests
