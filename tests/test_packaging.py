"""Our top-level `kernels` package shares its import name with HF's hub-kernels library, which
transformers probes for. Prove transformers does not mistake ours for it and still runs models."""

import subprocess
import sys
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
        "transformers would try `from kernels import get_kernel` on our package")
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
