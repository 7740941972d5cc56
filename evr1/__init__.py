"""evr1: reinforcement learning on video understanding for Qwen-VL models, on Slurm clusters."""

__version__ = "0.1.0"
