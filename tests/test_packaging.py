"""Our top-level `kernels` package shares its import name with HF's hub-kernels library, which
transformers probes for. Prove transformers does not mistake ours for it and still runs models."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging import version


def test_transformers_does_not_take_our_kernels_for_hub_kernels():
    from transformers.utils import import_utils

    import kernels

    assert hasattr(kernels, "merge_tokens")  # ours is the one on the path
    assert not hasattr(kernels, "get_kernel")  # the hub library's entry point
    exists, found_version = import_utils._is_package_available("kernels", return_version=True)
    # transformers resolves the import name to our distribution (simvlg) and reads its version;
    # it must fall outside the hub-kernels range transformers accepts.
    lo, hi = import_utils.KERNELS_MIN_VERSION, import_utils.KERNELS_MAX_VERSION
    assert not (version.parse(lo) <= version.parse(found_version) < version.parse(hi)), (
        f"simvlg's version {found_version} lies in transformers' hub-kernels range [{lo}, {hi}): "
        "transformers would try `from kernels import get_kernel` on our package"
    )
    assert import_utils.is_kernels_available() is False


def test_transformers_model_runs_with_our_kernels_installed():
    # A fresh interpreter, so nothing imported earlier in the session hides an import-time failure.
    code = """
import torch, kernels
from transformers import OPTConfig, OPTForCausalLM
cfg = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32)
model = OPTForCausalLM(cfg).eval()
ids = torch.randint(4, 64, (2, 9))
out = model(input_ids=ids, labels=ids)
assert torch.isfinite(out.loss), out.loss
gen = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
assert gen.shape == (2, 7), gen.shape
print("ok", model.config._attn_implementation)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


def test_console_script_installed():
    script = Path(sys.executable).parent / "simvlg"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "TomeFormer" in out.stdout


REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_every_module_and_config_and_resolves_them_from_anywhere(tmp_path):
    """A built wheel holds every module, the packaged YAML/JSON configs and the DeepSpeed configs
    (ds_configs/ at the repository's top, shipped as pipeline/ds_configs/); installed (here: the wheel
    unpacked onto PYTHONPATH) and run from an unrelated folder, a packaged config's ds_config resolves
    into the package, not into a checkout."""
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to setup.py
    src.mkdir()
    for name in ("setup.py", "setup.cfg", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("pipeline", "kernels", "ds_configs"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("simvlg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    def tracked(folder, pattern):
        return {
            str(p.relative_to(REPO)) for p in (REPO / folder).rglob(pattern) if "__pycache__" not in p.parts
        }

    modules = tracked("pipeline", "*.py") | tracked("kernels", "*.py")
    configs = tracked("pipeline/configs", "*.yaml") | tracked("pipeline/configs/arch", "*.json")
    ds = {f"pipeline/ds_configs/{p.name}" for p in (REPO / "ds_configs").glob("*.json")}
    assert ds and modules <= names and configs <= names and ds <= names, sorted(
        (modules | configs | ds) - names
    )
    assert not any(n.startswith(("tests/", "ds_configs/", "runs/")) for n in names), sorted(names)[:10]

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "from pipeline.config import load_config; cfg = load_config('simvlg_opt2.7b'); "
        "print(cfg.train.ds_config); print(load_config('demo').train.ds_config)"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    fp16, bf16 = run.stdout.split()
    assert fp16 == str(site / "pipeline" / "ds_configs" / "zero2_fp16.json")
    assert bf16 == str(site / "pipeline" / "ds_configs" / "zero2_bf16.json")
