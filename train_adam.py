"""train.py with --optimizer=adamw as the default, so the Sophia project's command lines work:

    torchrun --standalone --nproc_per_node=8 train_adam.py config/train_gpt2_small_adam.py --batch_size=12 --gradient_accumulation_steps=5
"""
import train
from opengpt.cli import run

if __name__ == "__main__":
    run(lambda: train.main(optimizer="adamw"))
