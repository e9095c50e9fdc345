"""pipeline.models.joint: the joint adaptive representation connector (shapes, gates, the text side,
gradients, meta-device build and its FLOPs, and that it learns)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.joint import JointConnector, text_input_mask

DV, DL = 24, 40  # vision width, LLM width


def tiny(**kw) -> JointConnector:
    torch.manual_seed(0)
    args = dict(width=32, heads=4, num_latents=6, iterations=2, dropout=0.0, max_text_len=16) | kw
    return JointConnector(DV, DL, **args)


def gates(m: JointConnector) -> list[torch.nn.Parameter]:
    return [p for layer in m.layers for p in (layer.alpha, layer.beta)]


# ------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("nv,length", [(1, 1), (17, 5), (65, 16)])
def test_output_is_n_tokens_whatever_the_input_lengths(nv, length):
    m = tiny()
    out = m(
        torch.randn(3, nv, DV),
        text_embeds=torch.randn(3, length, DL),
        text_mask=torch.ones(3, length, dtype=torch.long),
    )
    assert out.shape == (3, 6, DL)
    assert m(torch.randn(2, nv, DV)).shape == (2, 6, DL)  # no text: the other connectors' call


def test_interface_matches_the_other_connectors():
    m = tiny()
    assert isinstance(m.ln_vision, torch.nn.LayerNorm) and m.temporal is None
    x = torch.randn(2, 9, DV)
    assert m(x).shape == (2, 6, DL)  # connector(feats), as SimVLG calls the others
    with pytest.raises(ValueError, match="no merge sources"):  # what eval's merge figures catch
        m.forward_with_sources(x)


def test_bad_sizes_fail_with_one_line():
    with pytest.raises(ValueError, match="width 30 is not a multiple of heads 4"):
        tiny(width=30)


def test_a_text_longer_than_max_text_len_is_read_up_to_it():
    m = tiny().eval()
    x, text = torch.randn(1, 4, DV), torch.randn(1, 20, DL)
    assert torch.allclose(m(x, text_embeds=text), m(x, text_embeds=text[:, :16]), atol=1e-6)
    left = torch.cat([torch.randn(1, 3, DL), text], 1)  # left padded: the same first 16 tokens
    mask = torch.tensor([[0] * 3 + [1] * 20])
    assert torch.allclose(m(x, text_embeds=left, text_mask=mask), m(x, text_embeds=text[:, :16]), atol=1e-5)


# -------------------------------------------------------------------------------------- gates
def test_gates_start_at_gate_init_and_are_trained():
    m = tiny()
    assert [g.item() for g in gates(m)] == [1.0] * 4
    assert [g.item() for g in gates(tiny(gate_init=0.25))] == [0.25] * 4
    names = {n for n, _ in m.named_parameters()}
    assert {"layers.0.alpha", "layers.0.beta", "layers.1.alpha", "layers.1.beta"} <= names
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    out = m(torch.randn(2, 9, DV), text_embeds=torch.randn(2, 3, DL))
    F.mse_loss(out, torch.randn_like(out)).backward()
    opt.step()
    assert all(g.item() != 1.0 for g in gates(m))


def test_gradient_reaches_latents_gates_and_both_projections():
    m = tiny()
    out = m(torch.randn(2, 9, DV), text_embeds=torch.randn(2, 3, DL))
    F.mse_loss(out, torch.randn_like(out)).backward()
    for p in [
        m.image_resampler.latents,
        m.text_resampler.latents,
        m.proj_vision.weight,
        m.proj_text.weight,
        m.text_pos,
        *gates(m),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_closed_gates_make_the_soft_prompt_image_blind():
    """Eq. 2 with tanh(α) = 0: the image enters nowhere else (why gate_init is not 0)."""
    m = tiny(gate_init=0.0)
    text = torch.randn(1, 3, DL).expand(2, -1, -1)
    out = m(torch.randn(2, 9, DV), text_embeds=text)
    assert torch.allclose(out[0], out[1], atol=1e-6)
    out = tiny()(torch.randn(2, 9, DV), text_embeds=text)
    assert not torch.allclose(out[0], out[1], atol=1e-3)


# ---------------------------------------------------------------------------------- text side
def test_text_changes_the_output_and_padding_does_not():
    m = tiny().eval()
    x = torch.randn(1, 9, DV)
    a, b = torch.randn(1, 4, DL), torch.randn(1, 4, DL)
    base = m(x, text_embeds=a)
    assert not torch.allclose(base, m(x, text_embeds=b), atol=1e-4)
    assert not torch.allclose(base, m(x), atol=1e-4)
    assert not torch.allclose(base, m(x, text_embeds=a.flip(1)), atol=1e-4)  # positions: order counts
    pad = torch.randn(1, 3, DL)  # junk in padded slots is never read; left = right padding
    right = m(x, text_embeds=torch.cat([a, pad], 1), text_mask=torch.tensor([[1] * 4 + [0] * 3]))
    left = m(x, text_embeds=torch.cat([pad, a], 1), text_mask=torch.tensor([[0] * 3 + [1] * 4]))
    assert torch.allclose(base, right, atol=1e-5) and torch.allclose(base, left, atol=1e-5)


def test_a_row_without_text_equals_no_text():
    m = tiny().eval()
    x = torch.randn(2, 9, DV)
    out = m(x, text_embeds=torch.randn(2, 3, DL), text_mask=torch.tensor([[1, 1, 0], [0, 0, 0]]))
    assert torch.isfinite(out).all()
    assert torch.allclose(out[1], m(x[1:])[0], atol=1e-5)


# ---------------------------------------------------------------------------------- meta, FLOPs
def test_paper_size_builds_on_meta_and_forward_flops_match_the_counter():
    with torch.device("meta"):
        m = JointConnector(1408, 2560, width=768, heads=12, num_latents=32, iterations=4)
        feats, text = torch.empty(1, 257, 1408), torch.empty(1, 12, 2560)
    assert m.proj_out.weight.is_meta
    fc = FlopCounterMode(display=False)
    with fc:
        out = m(feats, text_embeds=text, text_mask=torch.ones(1, 12, device="meta"))
    assert out.shape == (1, 32, 2560) and out.is_meta
    assert fc.get_total_flops() == m.forward_flops(257, 12)
    with FlopCounterMode(display=False) as fc:
        m(feats)
    assert fc.get_total_flops() == m.forward_flops(257, 0)
    # longer inputs cost more
    assert m.forward_flops(257, 24) > m.forward_flops(257, 12) > m.forward_flops(65, 12)


# ----------------------------------------------------------------------------------- learning
@pytest.fixture
def one_thread():
    """Tiny matmuls: a second thread only spins (3 min instead of 3 s on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def toy_fit(gate_init: float, steps: int, lr: float = 1e-3, seed: int = 0) -> tuple[float, list[float]]:
    """8 (image, question) pairs -> random target soft prompts; the answer depends on both. Returns the
    best an image-blind output can do (predict the mean over images per question) and the loss curve."""
    g = torch.Generator().manual_seed(seed)
    n_img, n_q, N = 4, 2, 4
    feats = torch.randn(n_img, 10, DV, generator=g)
    questions = torch.randn(n_q, 3, DL, generator=g)
    target = torch.randn(n_img, n_q, N, DL, generator=g)
    img, q = torch.arange(n_img).repeat(n_q), torch.arange(n_q).repeat_interleave(n_img)
    blind = F.mse_loss(target.mean(0)[q], target[img, q]).item()
    torch.manual_seed(seed)
    m = JointConnector(
        DV, DL, width=32, heads=4, num_latents=N, iterations=2, dropout=0.0, gate_init=gate_init
    )
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    curve = []
    for _ in range(steps):
        loss = F.mse_loss(m(feats[img], text_embeds=questions[q]), target[img, q])
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return blind, curve


def test_tiny_connector_overfits_an_image_and_text_dependent_mapping(one_thread):
    blind, curve = toy_fit(1.0, steps=80, lr=5e-3)
    assert curve[-1] < 0.1 * blind  # far below anything that ignores the image
    assert curve[-1] < 0.1 * curve[0]


def test_gate_init(one_thread):
    """Closed gates (Flamingo's 0) learn the image-dependent toy slower than the default 1."""
    steps = {}
    for gate in (0.0, 1.0):
        blind, curve = toy_fit(gate, steps=140)
        steps[gate] = next(i for i, x in enumerate(curve) if x < 0.5 * blind)
    assert steps[1.0] < 0.9 * steps[0.0], steps


# ------------------------------------------------------------------------------ with a frozen LM
def test_plugs_into_a_frozen_causal_lm_reading_only_the_text_input(one_thread):
    """The SimVLG wiring: text side = the LM's input embeddings of the rows' text-input tokens
    (attended, no loss); [soft prompt, text input, target] into the LM; loss on the target only."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    lm = (
        OPTForCausalLM(
            OPTConfig(
                vocab_size=64,
                hidden_size=DL,
                num_hidden_layers=2,
                ffn_dim=64,
                num_attention_heads=4,
                max_position_embeddings=64,
                word_embed_proj_dim=DL,
                init_std=0.3,
            )
        )
        .eval()
        .requires_grad_(False)
    )
    m = tiny()
    # two rows: BOS + 3 text-input tokens + 2 target tokens; BOS + 2 + 1, right padded
    ids = torch.tensor([[2, 10, 11, 12, 40, 41], [2, 13, 14, 42, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, -100, 40, 41], [-100, -100, -100, 42, -100, -100]])
    text_mask = text_input_mask(mask, labels)
    assert text_mask.tolist() == [[True] * 4 + [False] * 2, [True] * 3 + [False] * 3]
    feats = torch.randn(2, 9, DV)
    embed = lm.get_input_embeddings()

    def loss_of(ids, labels):
        soft = m(feats, text_embeds=embed(ids), text_mask=text_input_mask(mask, labels))  # [2, 6, DL]
        x = torch.cat([soft, embed(ids)], 1)
        full = torch.cat([torch.ones(2, soft.shape[1], dtype=mask.dtype), mask], 1)
        logits = lm(inputs_embeds=x, attention_mask=full).logits[:, soft.shape[1] - 1 : -1]
        return F.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), ignore_index=-100), soft

    loss, soft = loss_of(ids, labels)
    other = ids.clone()
    other[0, 4:] = torch.tensor([50, 51])  # another target: the soft prompt must not change
    assert torch.equal(loss_of(other, labels.where(labels < 0, other))[1], soft)
    loss.backward()
    assert m.text_resampler.latents.grad.abs().sum() > 0 and all(p.grad is None for p in lm.parameters())
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(30):
        opt.zero_grad()
        loss = loss_of(ids, labels)[0]
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first  # (init_std 0.3: at 0.02 a random LM hardly reads its context)


@pytest.mark.slow
def test_bench_flops_prints_the_joint_connector_beside_the_others(capsys, tmp_path):
    """`simvlg bench flops simvlg_opt2.7b --vs connectors` (~17 s on the meta device): one sample's
    training step with each connector at paper size (EVA ViT-g 257 x 1408, OPT-2.7b, the official
    32-token text row whose text input is the BOS alone). Connector forward + backward: TomeFormer 76.3
    GFLOP, Q-Former 38.6, joint (N 32, 4 iterations, its text side over the 32-token row) 16.2."""
    import json

    from pipeline.models import flops

    assert flops.main(["simvlg_opt2.7b", "--vs", "connectors", "--json", str(tmp_path / "f.json")]) == 0
    out = capsys.readouterr().out
    table = out[out.index("Connectors side by side") :].splitlines()
    rows = {ln.split()[0]: ln.split() for ln in table[2:5]}
    assert list(rows) == ["tomeformer", "qformer", "joint"]
    assert [rows[c][3] for c in rows] == ["76.3", "38.6", "16.2"]  # connector GFLOP
    assert [rows[c][1] for c in rows] == ["29", "32", "32"]  # soft-prompt tokens
    saved = json.loads((tmp_path / "f.json").read_text())["connectors"]
    joint = saved["joint"]["count"]
    assert joint["parts"]["llm"] == saved["qformer"]["count"]["parts"]["llm"]  # same prompt length
    assert joint["total"] < saved["qformer"]["count"]["total"] < saved["tomeformer"]["count"]["total"]


# ------------------------------------------------------------------------------- inside SimVLG
@pytest.fixture(scope="module")
def simvlg(tmp_path_factory):
    """SimVLG with model.connector: joint on the demo's small ViT stand-in and word-level OPT."""
    from pipeline.config import LLMConfig, ModelConfig, VisionConfig
    from pipeline.demo import backbones, corpus
    from pipeline.models import build_model
    from pipeline.schema import JointConfig

    root = tmp_path_factory.mktemp("joint_simvlg")
    backbones.build_vit(root / "vit")
    words = ["Question:", "is", "there", "a", "Short", "answer:", "yes", "no"]
    sets = corpus.all_attribute_sets()
    backbones.build_llm(
        root / "opt", sets, lambda a: corpus.caption(a) + " " + " ".join(words), "a photo of", steps=2
    )
    cfg = ModelConfig(
        connector="joint",
        joint=JointConfig(width=32, heads=4, num_latents=5, iterations=2, dropout=0.0),
        vision=VisionConfig(name=str(root / "vit"), loader="hf", image_size=64, precision="fp32"),
        llm=LLMConfig(name=str(root / "opt"), precision="fp32", prompt="a photo of", max_text_tokens=12),
    )
    torch.manual_seed(0)
    return build_model(cfg)


QUESTION = "Question: is there a red circle ? Short answer:"


def test_simvlg_trains_the_joint_connector_on_task_rows(simvlg):
    m = simvlg.train()
    tok = m.tokenizer
    assert m.soft_prompt_length() == 5
    caps = ["two small red circles on the left", "one large blue square on the top"]
    assert {k: v.tolist() for k, v in tok.pairs(["a photo of"] * 2, caps).items()} == {
        k: v.tolist() for k, v in tok(caps).items()
    }  # captioning is the pair (prompt, caption)
    batch = tok.pairs(["a photo of", QUESTION], [caps[0], "yes"])
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    out = m(x, **batch)
    assert out["per_sample_loss"].shape == (2,) and out["num_tokens"].item() == 7 + 1 + 1 + 1
    out["loss"].backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith("connector.") for n in grads)
    assert "connector.text_resampler.latents" in grads  # the text input reaches the connector
    m.zero_grad()


def test_the_soft_prompt_reads_the_text_input_not_the_target_and_generation_agrees(simvlg):
    from pipeline.models.joint import text_input_mask

    m = simvlg.eval()
    tok = m.tokenizer
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    rows = tok.pairs([QUESTION, "a photo of"], ["yes", "two small red circles on the left"])
    other = tok.pairs([QUESTION, "a photo of"], ["no", "one large blue square on the top"])
    with torch.no_grad():
        soft = m.soft_prompt(x, rows["input_ids"], text_input_mask(rows["attention_mask"], rows["labels"]))
        same = m.soft_prompt(x, other["input_ids"], text_input_mask(other["attention_mask"], other["labels"]))
        enc = tok.prompts([QUESTION, "a photo of"])  # generation: left padded
        left = m.soft_prompt(x, enc["input_ids"], enc["attention_mask"])
        blind = m.soft_prompt(x)
    assert torch.equal(soft, same)
    torch.testing.assert_close(left, soft, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(soft[0], m.soft_prompt(x[:1], *_row(tok, "a photo of"))[0], atol=1e-4)
    assert not torch.allclose(soft, blind, atol=1e-4)
    texts = m.generate(x, prompt=[QUESTION, "a photo of"], num_beams=1, max_new_tokens=3, min_new_tokens=1)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_generation_gives_the_text_side_what_training_gave_it_when_bos_is_a_target(simvlg, monkeypatch):
    """The official layout (empty prompt, bos_target): BOS carries a loss in training, so it is not text
    input there; generation must not hand it to the connector either."""
    from pipeline.models.joint import text_input_mask

    m, tok = simvlg.eval(), simvlg.tokenizer
    monkeypatch.setattr(tok, "bos_target", True)
    rows = tok.pairs(["", QUESTION], ["two small red circles", "yes"])
    trained = text_input_mask(rows["attention_mask"], rows["labels"])
    assert not trained[0].any() and trained[1].sum() == len(tok.prompts([QUESTION])["input_ids"][0])
    seen = []
    real = m.soft_prompt
    monkeypatch.setattr(m, "soft_prompt", lambda px, ids, mask: seen.append(mask) or real(px, ids, mask))
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    m.generate(x, prompt=["", QUESTION], num_beams=1, max_new_tokens=2, min_new_tokens=1)
    enc = tok.prompts(["", QUESTION])
    assert seen[0].sum(1).tolist() == [0, trained[1].sum().item()]
    assert torch.equal(seen[0][1].bool(), enc["attention_mask"][1].bool())


def _row(tok, text):
    enc = tok.prompts([text])
    return enc["input_ids"], enc["attention_mask"]


def test_joint_connector_saves_and_loads(simvlg, tmp_path):
    from pipeline.models import build_model, connector_config

    m = simvlg.eval()
    batch = m.tokenizer.pairs([QUESTION], ["yes"])
    x = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        want = m(x, **batch)["loss"]
    fresh = build_model(connector_config(m.save_connector(tmp_path / "joint"))).eval()
    fresh.load_connector(tmp_path / "joint")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, **batch)["loss"], want, rtol=0, atol=0)
