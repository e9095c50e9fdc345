"""`simvlg bench flops`: meta-device FLOP / parameter / memory counts, checked against analytic counts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pipeline.models import flops


def test_count_step_on_a_known_module():
    torch.manual_seed(0)
    frozen, head = nn.Linear(8, 16), nn.Linear(16, 4)
    frozen.requires_grad_(False)
    x = torch.randn(3, 8)
    params = list(frozen.parameters()) + list(head.parameters())
    c, _, _ = flops.count_step(lambda: head(frozen(x)).sum(), params)
    assert c.fwd == 2 * 3 * (8 * 16 + 16 * 4)
    assert c.bwd == 2 * 3 * 16 * 4  # only the trainable head's weight gradient (no input needs grad)
    # the head saves its input [3, 16] fp32 for the weight gradient; parameters are not counted
    assert c.saved_bytes == 3 * 16 * 4


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """The paper config with --vs blip2, through main() as the CLI calls it (~40 s: meta models)."""
    out = tmp_path_factory.mktemp("flops") / "flops.json"
    rc = flops.main(["simvlg_opt2.7b", "--vs", "blip2", "--json", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_paper_config_counts(paper):
    s = paper["simvlg"]
    # the official text row: BOS + caption + "\n" capped at max_txt_len 32 (empty prompt)
    assert s["soft_prompt"] == 29 and s["vision_tokens"] == 257 and s["text_tokens"] == 32
    p = s["params"]
    assert p["trainable"] == 88_504_320 and p["frozen"] == p["vision"] + p["llm"]
    parts = s["count"]["parts"]
    vit_f, vit_b = parts["vision"]
    # frozen ViT: ~2 x params x tokens forward (+ attention), no backward at all
    assert vit_b == 0 and 1.0 < vit_f / (2 * p["vision"] * 257) < 1.05
    # frozen LLM: forward over soft prompt + text; backward = gradients w.r.t. its inputs only (~1x)
    llm_f, llm_b = parts["llm"]
    L = 29 + s["text_tokens"]
    non_embedding = p["llm"] - 50272 * 2560 - 2050 * 2560
    assert 1.0 < llm_f / (2 * non_embedding * L) < 1.06
    assert 0.95 < llm_b / llm_f < 1.05
    # trainable connector: backward ~2x forward (input and weight gradients)
    con_f, con_b = parts["connector"]
    assert 1.9 < con_b / con_f < 2.1
    assert s["count"]["fwd"] == vit_f + con_f + llm_f
    assert s["count"]["total"] == s["count"]["fwd"] + s["count"]["bwd"]
    assert 100 * 2**20 < s["count"]["saved_bytes"] < 2 * 2**30  # activations per sample


def test_blip2_comparison(paper, capsys):
    s1, s2 = paper["blip2_stage1"]["count"], paper["blip2_stage2"]
    assert s2["soft_prompt"] == 32 and 100e6 < s2["params"]["trainable"] < 115e6  # Q-Former ~110M
    assert s1["parts"]["vision"][0] == paper["simvlg"]["count"]["parts"]["vision"][0]
    itc, itm = s1["parts"]["ITC"], s1["parts"]["ITM (3 pairs)"]
    assert itm[0] > 2.5 * itc[0]  # three multimodal passes vs one query + one text pass
    assert s1["fwd"] < s2["count"]["fwd"]  # stage 1 has no LLM


@pytest.mark.slow
def test_video_activation_memory_with_and_without_vit_checkpointing(capsys):
    """The official video run: 4 frames, fp32 ViT, gradients through all 39 blocks."""
    assert flops.main(["simvlg_video_msrvtt"]) == 0
    out = capsys.readouterr().out
    assert "ViT activation checkpointing" in out and "this config: on" in out
    cfg = flops.load_config("simvlg_video_msrvtt")
    ck = flops.checkpointing_memory(cfg.model, flops.pixel_shape(cfg), flops.text_length(cfg.model, None))
    assert ck["blocks"] == 39 and ck["block_inputs"] == 39 * 4 * 257 * 1408 * 4  # fp32 inputs kept
    assert ck["with"] < ck["without"] / 4  # the blocks' intermediates dominate
    assert 0 < ck["one_block"] < ck["without"] / 39 * 1.01
    lines = [ln for ln in out.splitlines() if ln.strip().startswith(("without:", "with:"))]
    assert len(lines) == 2 and "per micro-batch of 4" in out
    # the recompute costs up to one ViT forward (torch's checkpoint stops once the saved inputs of
    # the block's backward are rebuilt, so the last matmul of each block is not rerun)
    vit_fwd = flops.report(cfg)["simvlg"]["count"].parts["vision"][0]
    assert 0.5 * vit_fwd < ck["recompute_flops"] <= vit_fwd


def test_bad_inputs_exit_1(capsys):
    assert flops.main(["demo"]) == 1  # demo backbones are folders: no arch_config for the meta device
    assert "arch_config" in capsys.readouterr().err
    assert flops.main(["no_such_config.yaml"]) == 1


@pytest.mark.slow
def test_pformer_stage0_counts_bert_once_per_masked_view():
    """pformer_opt2.7b at full size on the meta device: the frozen OPT's forward is the same with one or
    two masked views; the P-Former's (BERT-base, 32 tokens) doubles with the second view; one sentence's
    BERT forward is about 2 x 110 M parameters x 32 tokens."""
    from pipeline.config import load_config

    one = flops.report(load_config("pformer_opt2.7b"))["pformer_stage0"]
    two = flops.report(load_config("pformer_opt2.7b", ["model.pformer.views=2"]))["pformer_stage0"]
    assert one["count"].parts["llm"][0] == two["count"].parts["llm"][0]  # backward: what the rest leaves
    assert one["count"].parts["llm"][1] == pytest.approx(two["count"].parts["llm"][1], rel=1e-4)
    bert_fwd = one["count"].parts["pformer"][0]
    assert 2 * 85e6 * 32 < bert_fwd < 2 * 130e6 * 32
    assert two["count"].parts["pformer"][0] == pytest.approx(2 * bert_fwd, rel=0.05)
