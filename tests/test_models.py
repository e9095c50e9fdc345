"""pipeline.models: tiny real-architecture backbones (HF ViT, timm EVA, BERT, OPT) built from small
configs, saved with save_pretrained / safetensors into temp folders and loaded through the same
from_pretrained / timm code path users take with EVA-ViT-g, bert-base-uncased and facebook/opt-2.7b;
plus the paper-scale configs on the meta device."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from tiny_models import opt_tokenizer, save_opt

from pipeline.config import (
    LLMConfig,
    MergeSchedule,
    ModelConfig,
    QFormerConfig,
    TomeFormerConfig,
    VideoConfig,
    VisionConfig,
    load_config,
)
from pipeline.models import CaptionTokenizer, build_model, connector_config
from pipeline.models.tomeformer import TomeFormer, layer_r, token_counts

IMG = 32  # tiny ViTs: 32 px, patch 4 -> 64 patches + CLS = 65 tokens (as the demo's 64 px / 8)
CORPUS = [
    "a photo of a red circle on a blue square",
    "a green triangle next to a yellow star",
    "two small dogs play in the grass",
    "Question: what colour is it? Short answer: red",
    "a cat sits on a mat\n",
    "three blue squares and one red circle",
] * 4


# ------------------------------------------------------------------------------------ fixtures
def _tokenizer():
    return opt_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Folders: hf ViT, BERT, OPT (+ tokenizer), timm EVA weights + arch JSON."""
    import timm
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    ViTModel(
        ViTConfig(
            image_size=IMG,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        add_pooling_layer=False,
    ).save_pretrained(root / "vit")
    BertModel(
        BertConfig(
            vocab_size=120,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=160,
        )
    ).save_pretrained(root / "bert")
    tok = _tokenizer()
    save_opt(root / "opt", tok)
    eva_kwargs = {
        "img_size": IMG,
        "patch_size": 4,
        "embed_dim": 32,
        "depth": 3,
        "num_heads": 4,
        "mlp_ratio": 2.0,
        "num_classes": 0,
    }
    eva = timm.create_model("eva_giant_patch14_224", pretrained=False, **eva_kwargs)
    save_file({k: v.contiguous() for k, v in eva.state_dict().items()}, str(root / "eva.safetensors"))
    (root / "eva.json").write_text(json.dumps({"timm_name": "eva_giant_patch14_224", "kwargs": eva_kwargs}))
    return root


def make_cfg(bb, **over) -> ModelConfig:
    parts = {
        "vision": VisionConfig(name=str(bb / "vit"), loader="hf", image_size=IMG, precision="fp32"),
        "tomeformer": TomeFormerConfig(init=str(bb / "bert"), num_layers=3, r=12),
        "qformer": QFormerConfig(init=str(bb / "bert"), num_queries=4, num_layers=2),
        "llm": LLMConfig(name=str(bb / "opt"), precision="fp32", prompt="a photo of", max_text_tokens=8),
    }
    for key, value in over.items():
        if key in parts and isinstance(value, dict):
            parts[key] = parts[key].model_copy(update=value)
        else:
            parts[key] = value
    return ModelConfig(**parts)


@pytest.fixture(scope="module")
def model(backbones):
    torch.manual_seed(0)
    return build_model(make_cfg(backbones))


def pixels(b=2, seed=0, t=None):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 3, IMG, IMG) if t is None else (b, t, 3, IMG, IMG)
    return torch.randn(shape, generator=g)


CAPS = ["a red circle", "two small dogs play in the grass next to a yellow star and a cat"]


# ------------------------------------------------------------------------------ the tokenizer
def test_caption_tokenizer_layout_and_labels(model):
    tok = model.tokenizer
    out = tok(CAPS)
    ids, mask, labels = out["input_ids"], out["attention_mask"], out["labels"]
    assert ids.dtype == mask.dtype == labels.dtype == torch.long and ids.shape == labels.shape
    n_prompt = len(tok.prompt_ids)
    assert tok.prompt_ids[0] == 2  # BOS, added by the tokenizer
    nl = tok.tokenizer("\n", add_special_tokens=False).input_ids
    assert len(nl) == 1 and tok.end_id == nl[0]  # OPT-style: captions end with "\n"
    for i in range(len(CAPS)):
        n = int(mask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any()  # right padding
        assert (ids[i, n:] == tok.pad_id).all()
        assert (labels[i, :n_prompt] == -100).all() and (labels[i, n:] == -100).all()
        assert torch.equal(labels[i, n_prompt:n], ids[i, n_prompt:n])
        assert ids[i, n - 1] == tok.end_id
        assert n - n_prompt <= tok.max_text_tokens
        text = tok.tokenizer.decode(ids[i, :n], skip_special_tokens=True)
        assert text.startswith("a photo of")
    # the long caption is truncated to max_text_tokens (caption + end), the short one is whole
    assert int(mask[1].sum()) - n_prompt == tok.max_text_tokens
    assert tok.tokenizer.decode(ids[0, n_prompt : int(mask[0].sum())]) == " a red circle\n"
    # picklable for DataLoader workers, same output after the round trip
    tok2 = pickle.loads(pickle.dumps(tok))
    assert all(torch.equal(a, b) for a, b in zip(tok2(CAPS).values(), out.values()))


def test_caption_tokenizer_official_layouts(model):
    """truncation: sequence and bos_target reproduce the official OPT tokenizer call; bos_token the
    official Vicuna BOS replacement."""
    base = model.tokenizer.tokenizer
    long = "two small dogs play in the grass next to a yellow star and a cat " * 3
    official = CaptionTokenizer(base, "", 8, truncation="sequence", bos_target=True)
    ids, no_loss = official.encode(long)
    assert len(ids) == 8 and ids[0] == 2 and ids[-1] != official.end_id  # the end token fell off
    assert no_loss == 0  # BOS is a target after an empty prompt
    out = official(["a red circle", long])
    assert out["labels"][0, 0] == 2 and out["labels"][1, 0] == 2
    ours = CaptionTokenizer(base, "", 8)
    ids, no_loss = ours.encode(long)
    assert len(ids) == 9 and ids[-1] == ours.end_id and no_loss == 1  # BOS + 7 caption tokens + end
    # with a prompt, bos_target changes nothing: BOS and prompt never carry loss
    assert CaptionTokenizer(base, "a photo of", 8, bos_target=True).encode("x")[1] == len(
        CaptionTokenizer(base, "a photo of", 8).prompt_ids
    )
    short = official.encode("a red circle")[0]
    assert short[-1] == official.end_id and short == ours.encode("a red circle")[0]
    swapped = CaptionTokenizer(base, "", 8, bos_token="<s>")
    assert swapped.prompt_ids == [0] and swapped.encode("a red circle")[0][1:] == short[1:]
    assert swapped.prompts(["Question: what?"])["input_ids"][0, 0] == 0
    with pytest.raises(ValueError, match="bos_token"):
        CaptionTokenizer(base, "", 8, bos_token="two words")


def test_caption_tokenizer_from_config_and_eos_end(backbones):
    cfg = LLMConfig(name=str(backbones / "opt"), prompt="", max_text_tokens=4, caption_end="eos")
    tok = CaptionTokenizer.from_config(cfg)
    out = tok(["a cat"])
    assert out["input_ids"][0, -1] == tok.tokenizer.eos_token_id
    assert out["labels"][0, 0] == -100 and (out["labels"][0, 1:] != -100).all()  # only BOS masked


# --------------------------------------------------------------------------- vision encoders
def test_hf_vit_features_are_penultimate_block(backbones, model):
    from transformers import ViTModel

    ref = ViTModel.from_pretrained(backbones / "vit").eval()
    x = pixels()
    with torch.no_grad():
        want = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    got = model.vision(x)
    assert got.shape == (2, 65, 32) and model.vision.num_tokens == 65
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(model.vision.model.layers) == 2  # the unused last block is dropped


def test_timm_eva_loads_checkpoint_and_matches_block_forward(backbones):
    import timm

    cfg = VisionConfig(
        name="eva_giant_patch14_224",
        loader="timm",
        image_size=IMG,
        precision="fp32",
        checkpoint=str(backbones / "eva.safetensors"),
        arch_config=str(backbones / "eva.json"),
    )
    from pipeline.models.vision import build_vision

    tower = build_vision(cfg)
    kwargs = json.loads((backbones / "eva.json").read_text())["kwargs"]
    ref = timm.create_model("eva_giant_patch14_224", pretrained=False, **kwargs).eval()
    from safetensors.torch import load_file

    ref.load_state_dict(load_file(str(backbones / "eva.safetensors")))
    x = pixels()
    with torch.no_grad():
        h, rope = ref._pos_embed(ref.patch_embed(x))
        for blk in ref.blocks[:-1]:  # timm's own block forward, penultimate block output
            h = blk(h, rope=rope)
    got = tower(x)
    assert got.shape == (2, 65, 32) and tower.grid == (8, 8) and tower.num_prefix_tokens == 1
    torch.testing.assert_close(got, h, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in tower.parameters())


def test_timm_vit_and_generic_hf_towers(tmp_path):
    import timm
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from pipeline.models.vision import TimmAdapter, VisionTower, build_vision

    torch.manual_seed(0)
    x = pixels()
    vit = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=IMG,
        patch_size=4,
        embed_dim=32,
        depth=3,
        num_heads=4,
        num_classes=0,
    ).eval()
    with torch.no_grad():
        want = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for blk in vit.blocks[:2]:
            want = blk(want)
    tower = VisionTower(vit, -2, TimmAdapter(vit))
    torch.testing.assert_close(tower(x), want, rtol=1e-5, atol=1e-5)
    # an HF tower without a block adapter (CLIP): hidden_states[feature_layer], images only
    CLIPVisionModel(
        CLIPVisionConfig(
            image_size=IMG,
            patch_size=4,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
        )
    ).save_pretrained(tmp_path / "clip")
    clip = build_vision(
        VisionConfig(name=str(tmp_path / "clip"), loader="hf", image_size=IMG, precision="fp32")
    )
    assert clip.adapter is None and clip.num_tokens == 65
    with torch.no_grad():
        ref = CLIPVisionModel.from_pretrained(tmp_path / "clip")(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(clip(x), ref.hidden_states[-2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="temporal"):
        clip(x[:, None].expand(2, 2, 3, IMG, IMG), temporal=torch.nn.ModuleList())


# ------------------------------------------------------------------------------- TomeFormer
def test_r_forms_and_token_counts():
    assert layer_r(19, 12) == [19] * 12
    assert token_counts(257, layer_r(19, 12))[-1] == 29
    assert layer_r(MergeSchedule(start=30, end=10), 3) == [30, 20, 10]
    assert layer_r([1, 2, 3], 3) == [1, 2, 3]
    assert token_counts(9, [10, 10]) == [5, 3]  # clamped to (N - 1) // 2 with CLS protected


def test_shapes_and_token_counts_per_layer(model):
    x = pixels()
    info = model.merge_info(x)
    counts = model.connector.tomeformer.token_counts(65)
    assert counts == [53, 41, 29]
    soft = model.soft_prompt(x)
    assert soft.shape == (2, 29, 48) and model.soft_prompt_length() == 29
    for layer, grid in info.items():
        assert grid.shape == (2, 8, 8) and grid.dtype == torch.long
        assert grid.min() >= 1 and grid.max() < counts[layer]  # token 0 (CLS) holds no patch
    # every patch of a group merged at layer 0 stays together afterwards
    g0, g2 = info[0].flatten(1), info[2].flatten(1)
    for b in range(2):
        for t in g0[b].unique():
            assert g2[b][g0[b] == t].unique().numel() == 1
    # sources, sizes and shapes per layer straight from the TomeFormer
    feats = model.connector.proj1(model.connector.ln_vision(model.vision(x)))
    y, sources = model.connector.tomeformer.forward_with_sources(feats)
    assert [s.shape[1] for s in sources] == counts and y.shape == (2, 29, 32)
    assert torch.equal(sources[-1].sum(1), torch.ones(2, 65))  # each input token in exactly one output


def _reference_official_layer(layer, x, r):
    """The official EVLGen BertLayer + ToMe (bipartite_soft_matching, scatter_reduce mean, output
    [unmerged A, B]), written out from the algorithm, eval mode."""
    sa = layer.attention.self
    B, N, C = x.shape
    h = layer.num_heads
    q, k, v = (m(x).view(B, N, h, C // h).transpose(1, 2) for m in (sa.query, sa.key, sa.value))
    att = ((q @ k.transpose(-1, -2)) / math.sqrt(C // h)).softmax(-1)
    a = layer.attention.output((att @ v).transpose(1, 2).reshape(B, N, C), x)
    metric = k.mean(1)
    r = min(r, (N - 1) // 2)
    m = metric / metric.norm(dim=-1, keepdim=True)
    scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)
    scores[:, 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = node_idx[..., None].gather(1, src_idx)
    unm_idx = unm_idx.sort(dim=1)[0]
    src, dst = a[:, ::2], a[:, 1::2]
    unm = src.gather(1, unm_idx.expand(B, -1, C))
    src = src.gather(1, src_idx.expand(B, r, C))
    dst = dst.scatter_reduce(1, dst_idx.expand(B, r, C), src, reduce="mean")
    a = torch.cat([unm, dst], dim=1)
    return layer.output(layer.intermediate(a), a)


def test_official_fields_match_plain_mean_tome(backbones):
    from transformers import BertConfig

    torch.manual_seed(1)
    c = BertConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    tf_cfg = TomeFormerConfig(official=True)  # resolved by the config, read by the model as fields
    assert (tf_cfg.merge_mode, tf_cfg.prop_attn, tf_cfg.token_order) == ("mean", False, "tome")
    official = TomeFormer(
        c,
        [12, 12, 12],
        merge_mode=tf_cfg.merge_mode,
        prop_attn=tf_cfg.prop_attn,
        token_order=tf_cfg.token_order,
        backend="eager",
    ).eval()
    default = TomeFormer(c, [12, 12, 12], backend="eager").eval()
    default.load_state_dict(official.state_dict())
    x = torch.randn(2, 65, 32)
    with torch.no_grad():
        want = official.embeddings(x)
        for layer in official.encoder.layer:
            want = _reference_official_layer(layer, want, 12)
        got = official(x)
        other = default(x)
    assert got.shape == want.shape == (2, 29, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the default (size-weighted merge + proportional attention) is a different function
    assert not torch.allclose(other.sort(1).values, got.sort(1).values, atol=1e-3)
    # official = plain-mean merge without proportional attention: same numbers after layer 1 up to
    # token order (layer 1 sees all sizes = 1, so only the order differs)
    one_off = TomeFormer(
        c, [12], merge_mode="mean", prop_attn=False, token_order="tome", backend="eager"
    ).eval()
    one_mean = TomeFormer(c, [12], merge_mode="mean", prop_attn=False, backend="eager").eval()
    sd = {
        k: v
        for k, v in official.state_dict().items()
        if not k.startswith("encoder.layer.") or k.startswith("encoder.layer.0.")
    }
    one_off.load_state_dict(sd)
    one_mean.load_state_dict(sd)
    with torch.no_grad():
        a, b = one_off(x), one_mean(x)
    torch.testing.assert_close(a.sort(1).values, b.sort(1).values, rtol=1e-5, atol=1e-5)
    # over three layers the order decides the next layer's A/B split: a different function
    three_mean = TomeFormer(c, [12, 12, 12], merge_mode="mean", prop_attn=False, backend="eager").eval()
    three_mean.load_state_dict(official.state_dict())
    with torch.no_grad():
        assert not torch.allclose(three_mean(x).sort(1).values, got.sort(1).values, atol=1e-3)


def test_proportional_attention_uses_sizes():
    from transformers import BertConfig

    torch.manual_seed(2)
    c = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    on = TomeFormer(c, [10, 10], prop_attn=True, backend="eager").eval()
    off = TomeFormer(c, [10, 10], prop_attn=False, backend="eager").eval()
    off.load_state_dict(on.state_dict())
    x = torch.randn(1, 41, 32)
    with torch.no_grad():
        # identical through layer 0's attention (all sizes 1), different once sizes are > 1
        assert torch.allclose(
            on.encoder.layer[0](on.embeddings(x), None)[0], off.encoder.layer[0](off.embeddings(x), None)[0]
        )
        assert not torch.allclose(on(x), off(x), atol=1e-4)


def test_tomeformer_loads_bert_weights(backbones, model):
    from transformers import BertModel

    bert = BertModel.from_pretrained(backbones / "bert")
    tf = model.connector.tomeformer
    assert len(tf.encoder.layer) == 3  # first 3 of 4 BERT layers
    sd = bert.state_dict()
    for k, v in tf.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert not any("word_embeddings" in k or "pooler" in k for k in tf.state_dict())


# ------------------------------------------------------------------------------ the LM loss
def test_loss_only_on_caption_tokens(model):
    model.eval()
    x, batch = pixels(), model.tokenizer(CAPS)
    out = model(x, **batch)
    # reference: full LLM logits, shifted labels over [soft prompt | text]
    soft = model.soft_prompt(x)
    P = soft.shape[1]
    emb = torch.cat([soft, model.llm.get_input_embeddings()(batch["input_ids"])], 1)
    mask = torch.cat([torch.ones(2, P, dtype=torch.long), batch["attention_mask"]], 1)
    logits = model.llm(inputs_embeds=emb, attention_mask=mask).logits.float()
    labels = torch.cat([torch.full((2, P), -100), batch["labels"]], 1)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out["loss"], want, rtol=1e-4, atol=1e-5)
    n_caption = int((batch["labels"] != -100).sum())
    assert out["num_tokens"] == n_caption
    assert out["per_sample_loss"].shape == (2,)
    # per-sample losses do not depend on the batch (padding) and weight the batch loss by tokens
    alone = model(x[1:], **model.tokenizer(CAPS[1:]))
    torch.testing.assert_close(out["per_sample_loss"][1], alone["loss"], rtol=1e-4, atol=1e-5)
    n = (batch["labels"] != -100).sum(1).float()
    torch.testing.assert_close(out["loss"], (out["per_sample_loss"] * n).sum() / n.sum())
    # changing prompt or padding tokens' labels cannot change the loss: only caption tokens count
    b2 = {k: v.clone() for k, v in batch.items()}
    pad = b2["attention_mask"] == 0
    b2["input_ids"][pad] = 5
    assert torch.allclose(model(x, **b2)["loss"], out["loss"], atol=1e-5)
    model.train()


def test_frozen_parts_untouched_by_an_optimizer_step(backbones):
    torch.manual_seed(0)
    m = build_model(make_cfg(backbones))
    m.train()
    assert not m.vision.training and not m.llm.training and m.connector.training
    trainable = m.trainable_parameters()
    conn_ids = {id(p) for p in m.connector.parameters()}
    assert {id(p) for p in trainable} == conn_ids
    assert not any(p.requires_grad for p in m.vision.parameters())
    assert not any(p.requires_grad for p in m.llm.parameters())
    frozen = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("connector.")}
    before = {k: v.clone() for k, v in m.connector.state_dict().items()}
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.05)
    out = m(pixels(), **m.tokenizer(CAPS))
    out["loss"].backward()
    assert all(p.grad is None for p in m.vision.parameters())
    assert all(p.grad is None for p in m.llm.parameters())
    opt.step()
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    changed = [k for k, v in m.connector.state_dict().items() if not torch.equal(v, before[k])]
    for name in (
        "ln_vision.weight",
        "proj1.weight",
        "tomeformer.encoder.layer.0.attention.self.query.weight",
        "tomeformer.embeddings.position_embeddings.weight",
        "proj2.weight",
    ):
        assert name in changed
    assert len(opt.state) == len(trainable)  # no optimizer state for frozen parameters


def test_precisions_and_a_bf16_connector(backbones):
    cfg = make_cfg(backbones, vision={"precision": "fp16"}, llm={"precision": "bf16"})
    m = build_model(cfg)
    assert m.vision.dtype == torch.float16 and m.llm_dtype == torch.bfloat16
    assert m.connector_dtype == torch.float32
    batch = m.tokenizer(CAPS)
    out = m(pixels(), **batch)
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    m.connector.to(torch.bfloat16)  # what a DeepSpeed bf16 engine does to the trainable part
    assert m.vision.dtype == torch.float16 and m.connector_dtype == torch.bfloat16
    out = m(pixels(), **batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.connector.proj1.weight.grad is not None


# ------------------------------------------------------------------------------- generation
def test_generate_returns_strings(model):
    x = pixels()
    beams = model.generate(x, num_beams=2, max_new_tokens=6, min_new_tokens=2)
    greedy = model.generate(x, num_beams=1, max_new_tokens=6, min_new_tokens=2)
    assert len(beams) == len(greedy) == 2 and all(isinstance(s, str) for s in beams + greedy)
    qs = [f"Question: {q} Short answer:" for q in ("what colour is it?", "how many?")]
    answers = model.generate(x, prompt=qs, num_beams=1, max_new_tokens=3, min_new_tokens=1)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert model.training  # generate restores the mode


def test_greedy_generation_follows_the_soft_prompt(model):
    """Greedy generate == argmax decoding by hand through forward-style inputs."""
    x = pixels(1)
    got = model.generate(x, num_beams=1, max_new_tokens=4, min_new_tokens=4)
    model.eval()
    with torch.no_grad():
        enc = model.tokenizer.prompts([model.cfg.llm.prompt])
        ids = enc["input_ids"]
        soft = model.soft_prompt(x)
        for _ in range(4):
            emb = torch.cat([soft, model.llm.get_input_embeddings()(ids)], 1)
            logits = model.llm(inputs_embeds=emb).logits[:, -1].clone()
            logits[:, model.tokenizer.stop_ids] = -float("inf")  # min_new_tokens
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    model.train()
    want = model.tokenizer.decode(ids[:, enc["input_ids"].shape[1] :])
    assert got == want


# ------------------------------------------------------------------------- connector files
def test_connector_save_load_gives_same_outputs(backbones, model, tmp_path):
    model.eval()
    x, batch = pixels(), model.tokenizer(CAPS)
    with torch.no_grad():
        model.connector.proj2.bias.add_(0.5)  # make it differ from a fresh build
        want = model(x, **batch)["loss"]
    path = model.save_connector(tmp_path / "conn")
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    from safetensors.torch import load_file

    keys = load_file(str(path / "model.safetensors")).keys()
    assert keys == model.connector_state_dict().keys()
    assert not any(k.startswith(("vision", "llm")) for k in keys)
    fresh = build_model(connector_config(path)).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x, **batch)["loss"], want)
    fresh.load_connector(path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, **batch)["loss"], want, rtol=0, atol=0)
    model.train()


# ------------------------------------------------------------------------------------ video
@pytest.fixture(scope="module")
def video_model(backbones):
    torch.manual_seed(0)
    return build_model(
        make_cfg(backbones, video=VideoConfig(enabled=True, temporal_dim=16, temporal_heads=4))
    ).eval()


def test_static_video_equals_image(video_model, model):
    m = video_model
    assert len(m.connector.temporal) == 2 and all(t.gate.item() == 0 for t in m.connector.temporal)
    img, batch = pixels(2), m.tokenizer(CAPS)
    with torch.no_grad():
        for T in (2, 3):  # exactly, not approximately
            vid = img[:, None].expand(2, T, 3, IMG, IMG)
            assert torch.equal(m.soft_prompt(vid), m.soft_prompt(img))
            assert torch.equal(m(vid, **batch)["loss"], m(img, **batch)["loss"])
    # with a gate, frames talk to each other: a moving video differs from its frame mean
    with torch.no_grad():
        for t in m.connector.temporal:
            t.gate.fill_(0.5)
        vid = pixels(2, t=3)
        feats_gate = m.visual_features(vid)
        for t in m.connector.temporal:
            t.gate.zero_()
        feats_plain = m.visual_features(vid)
    assert not torch.allclose(feats_gate, feats_plain, atol=1e-4)


def test_image_connector_loads_into_the_video_model(model, video_model, tmp_path):
    """Fine-tuning on video starts from an image-pretrained connector; temporal modules start at 0."""
    path = model.save_connector(tmp_path / "img")
    left = video_model.load_connector(path)
    assert left and all(k.startswith("temporal.") for k in left)
    img, batch = pixels(2), model.tokenizer(CAPS)
    vid = img[:, None].expand(2, 3, 3, IMG, IMG)
    model.eval()
    with torch.no_grad():
        assert torch.equal(video_model(vid, **batch)["loss"], model(img, **batch)["loss"])
    model.train()
    with pytest.raises(ValueError, match="do not match"):  # the other way round lacks weights
        model.load_connector(video_model.save_connector(tmp_path / "vid"))
    # model.init_connector: build_model starts from it (the paper's video run starts this way)
    cfg = video_model.cfg.model_copy(update={"init_connector": str(path)})
    started = build_model(cfg)
    for k, v in model.connector.state_dict().items():
        assert torch.equal(started.connector.state_dict()[k], v), k


@pytest.mark.parametrize("loader", ["hf", "timm"])
def test_vit_activation_checkpointing_same_outputs_and_grads_less_memory(backbones, loader):
    """Video: gradients flow through the frozen ViT into the temporal modules. Recomputing each block
    in backward gives the same loss and gradients and saves far fewer activations."""
    from pipeline.models.flops import saved_activation_bytes

    vision = (
        {}
        if loader == "hf"
        else {
            "name": "eva_giant_patch14_224",
            "loader": "timm",
            "arch_config": str(backbones / "eva.json"),
            "checkpoint": str(backbones / "eva.safetensors"),
            "feature_layer": -1,
        }
    )
    runs = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = build_model(
            make_cfg(
                backbones,
                vision={**vision, "grad_checkpointing": ckpt},
                video=VideoConfig(enabled=True, temporal_dim=16, temporal_heads=4),
            )
        ).train()
        assert m.vision.grad_checkpointing is ckpt
        for t in m.connector.temporal:  # a trained gate, so the temporal path matters
            t.gate.data.fill_(0.5)
        saved = [0]
        with saved_activation_bytes(list(m.parameters()), saved):
            out = m(pixels(2, t=3), **m.tokenizer(CAPS))
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in m.connector.named_parameters() if p.grad is not None}
        runs[ckpt] = (out["loss"].detach(), grads, saved[0])
    (l0, g0, s0), (l1, g1, s1) = runs[False], runs[True]
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    assert g0.keys() == g1.keys() and any(k.startswith("temporal.") for k in g0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-7, msg=k)
    assert s1 < s0  # the ViT blocks' intermediates are not kept


def test_video_trains_temporal_modules_and_concat_pool(backbones, video_model):
    m = video_model.train()
    vid = pixels(2, t=2)
    out = m(vid, **m.tokenizer(CAPS))
    out["loss"].backward()
    gates = [t.gate.grad for t in m.connector.temporal]
    assert all(g is not None and g != 0 for g in gates)  # gradient reaches the gates through the ViT
    assert all(p.grad is None for p in m.vision.parameters())
    m.zero_grad()
    m.eval()
    cat = build_model(
        make_cfg(
            backbones,
            video=VideoConfig(enabled=True, temporal_pool="concat", temporal_dim=16, temporal_heads=4),
        )
    )
    assert cat.soft_prompt(vid).shape == (2, 2 * 29, 48) and cat.soft_prompt_length(2) == 58


# --------------------------------------------------------------------------- Q-Former baseline
def test_qformer_connector_same_contract(backbones, tmp_path):
    from transformers import BertModel

    torch.manual_seed(0)
    m = build_model(make_cfg(backbones, connector="qformer"))
    x, batch = pixels(), m.tokenizer(CAPS)
    assert m.soft_prompt(x).shape == (2, 4, 48) and m.soft_prompt_length() == 4
    out = m(x, **batch)
    assert out["per_sample_loss"].shape == (2,) and out["num_tokens"] > 0
    out["loss"].backward()
    assert m.connector.query_tokens.grad is not None
    assert {id(p) for p in m.trainable_parameters()} == {id(p) for p in m.connector.parameters()}
    bert = BertModel.from_pretrained(backbones / "bert").state_dict()
    q = m.connector.qformer.state_dict()
    assert torch.equal(
        q["encoder.layer.1.attention.attention.key.weight"], bert["encoder.layer.1.attention.self.key.weight"]
    )
    assert torch.equal(
        q["encoder.layer.0.output_query.dense.weight"], bert["encoder.layer.0.output.dense.weight"]
    )
    assert isinstance(m.generate(x, num_beams=1, max_new_tokens=3, min_new_tokens=1)[0], str)
    with torch.no_grad():
        want = m.eval()(x, **batch)["loss"]
    fresh = build_model(connector_config(m.save_connector(tmp_path / "q"))).eval()
    fresh.load_connector(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, **batch)["loss"], want, rtol=0, atol=0)


# ------------------------------------------------------------------------ paper scale (meta)
@pytest.mark.parametrize(
    "name, trainable, tokens",
    [
        ("simvlg_opt2.7b", 88_504_320, 29),
        # 6 layers with a per-layer r: 257 -> 219 -> 181 -> 143 -> 100 -> 57 -> 29
        ("simvlg_opt2.7b_55m_90k", 45_977_088, 29),
    ],
)
def test_paper_configs_on_meta(name, trainable, tokens):
    cfg = load_config(name)
    m = build_model(cfg.model, meta=True)
    assert m.vision.num_tokens == 257 and m.vision.width == 1408 and m.vision.num_blocks == 39
    assert m.soft_prompt_length() == tokens
    counts = m.parameter_counts()
    assert counts["trainable"] == trainable  # ln_vision + proj1 + BERT w/o word emb & pooler + proj2
    assert 980e6 < counts["vision"] < 990e6  # EVA-ViT-g, 39 of 40 blocks
    assert 2.6e9 < counts["llm"] < 2.7e9  # OPT-2.7b
    assert counts["frozen"] == counts["vision"] + counts["llm"]
    assert all(p.is_meta for p in m.parameters())
    assert m.llm_dtype == torch.float16 and m.vision.dtype == torch.float16  # the official run
    if name == "simvlg_opt2.7b":
        px = torch.empty(1, 3, 224, 224, device="meta")
        feats = m.connector.proj1(m.connector.ln_vision(m.vision(px).float()))
        assert feats.shape == (1, 257, 768)
        assert m.connector.tomeformer(feats).shape == (1, 29, 768)
