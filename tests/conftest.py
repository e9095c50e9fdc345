"""Test-wide environment: offline, CPU, quiet. Set before any test module imports torch/triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
