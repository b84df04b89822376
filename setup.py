from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megatron-lowp",
    version="0.1.0",
    description="LLM pretraining in low precision: BF16 baseline, FP8, FP4 (NVFP4) and nGPT-FP4 recipes",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_lowp", "megatron_lowp.*"]),
    # Everything read at run time ships inside the package: the corpus, model presets, recipe packages
    # and DeepSpeed presets (tests/test_wheel.py installs the wheel outside the checkout to check).
    package_data={"megatron_lowp": ["configs/*/*.yaml", "configs/*/*.json"], "megatron_lowp.data": ["corpus/*"]},
    install_requires=[
        "torch>=2.5",
        "matplotlib",
        "numpy",
        "pyyaml",
        "sentencepiece",
        "tqdm",
    ],
    extras_require={
        # torchao: an independent reference for the MX/NVFP4 tests; triton: its interpreter runs our kernels on CPU
        "dev": ["pytest", "hypothesis", "ruff", "tensorboard", "wandb", "torchao", "triton", "datasets", "deepspeed>=0.19,<0.20", "transformers", "safetensors", "protobuf", "lm_eval>=0.4.13,<0.5"],
        "deepspeed": ["deepspeed>=0.19,<0.20"],
        "te": ["transformer-engine[pytorch]"],
        "hpu": [],  # Gaudi's PyTorch bridge ships with Intel's Gaudi software stack, not PyPI
        "wandb": ["wandb"],
        "data": ["datasets"],
        # lm-evaluation-harness for `megatron-lowp eval --tasks`; transformers, safetensors and protobuf (which
        # reads the sentencepiece model's settings) for `export --format hf`
        "eval": ["lm_eval>=0.4.13,<0.5", "transformers", "safetensors", "protobuf"],
    },
    entry_points={"console_scripts": ["megatron-lowp=megatron_lowp.cli:main"]},
)
