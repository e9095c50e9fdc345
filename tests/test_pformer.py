"""pipeline.models.pformer / align: the P-Former on a tiny real BERT (with a WordPiece tokenizer) and a tiny
real OPT (with a word-level tokenizer), both saved with save_pretrained and loaded the normal way."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import LLMConfig
from pipeline.models.align import alignment_loss, optimal_assignment
from pipeline.models.llm import CaptionTokenizer, build_llm, prefix_lm_loss
from pipeline.models.pformer import (
    PFormer,
    PFormerStage0,
    SentenceBatcher,
    build_pformer,
    build_stage0,
    contrastive_loss,
    mask_tokens,
    nearest_rows,
    vq_loss,
)
from pipeline.models.pformer_files import load_pformer, load_pformer_tokenizer, save_pformer
from pipeline.schema import PFormerConfig

SENTENCES = [
    "a red circle",
    "two small blue squares on the left of a green triangle",
    "a big yellow star",
    "three green circles at the top",
    "a small red triangle on the right",
    "one blue square",
    "two big yellow circles at the bottom of the picture",
    "a green star",
]
N = 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: 2 intra-op threads spin against the other processes
    (measured: 1.9 s per stage-0 step under load, 0.02 s with one thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast, OPTConfig, OPTForCausalLM

    from pipeline.demo.backbones import build_tokenizer

    root = tmp_path_factory.mktemp("pformer")
    words = sorted({w for s in SENTENCES for w in s.split()})
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    bert_tok = BertTokenizerFast(str(root / "vocab.txt"))  # transformers 5 ignores vocab_file=: all [UNK]
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(bert_tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(root / "bert")
    bert_tok.save_pretrained(root / "bert")
    opt_tok = build_tokenizer(words + ["\n"])
    # init_std 0.2: at OPT's 0.02 a tiny random OPT answers every input with near-uniform logits, so no
    # prompt could steer it (measured: LM loss 3.42 -> 3.34 = ln 30 in 40 steps; 3.80 -> 1.74 at 0.2)
    OPTForCausalLM(
        OPTConfig(
            vocab_size=len(opt_tok),
            hidden_size=48,
            num_hidden_layers=2,
            ffn_dim=96,
            init_std=0.2,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=48,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
            dropout=0.0,
        )
    ).save_pretrained(root / "opt")
    opt_tok.save_pretrained(root / "opt")
    return root


def make(folders, **over):
    from transformers import AutoTokenizer

    cfg = PFormerConfig(init=str(folders / "bert"), num_prompts=N, max_text_tokens=16, **over)
    llm_cfg = LLMConfig(name=str(folders / "opt"), precision="fp32", prompt="", max_text_tokens=16)
    torch.manual_seed(1)
    stage0 = build_stage0(cfg, llm_cfg)
    batcher = SentenceBatcher(
        AutoTokenizer.from_pretrained(folders / "bert"), CaptionTokenizer.from_config(llm_cfg), cfg, seed=0
    )
    return stage0, batcher


# ----------------------------------------------------------------------------------------- shapes
def test_prompt_shapes_and_n_independent_of_text_length(folders):
    stage0, batcher = make(folders)
    pf = stage0.pformer
    short, long_ = batcher.bert_inputs(SENTENCES[:2]), batcher.bert_inputs(["a star", "a red star " * 6])
    assert short["bert_input_ids"].shape[1] != long_["bert_input_ids"].shape[1]
    assert long_["bert_input_ids"].shape[1] == 16  # truncated to max_text_tokens
    for b in (short, long_):
        p = pf(b["bert_input_ids"], b["bert_attention_mask"])
        assert p.shape == (2, N, 48)
    assert pf.cls_proj.out_features == N * 32 and pf.llm_proj.out_features == 48
    # the LLM side follows CaptionTokenizer's layout with prompt "": BOS (no loss), words, end token
    batch = batcher(SENTENCES[:2])
    ids, labels = batch["input_ids"], batch["labels"]
    assert labels[0, 0] == -100 and ids[0, 0] == 2
    n = int(batch["attention_mask"][0].sum())
    assert labels[0, n - 1] == batcher.caption_tokenizer.end_id


def test_padding_does_not_change_the_prompts(folders):
    stage0, batcher = make(folders)
    stage0.eval()
    alone = batcher.bert_inputs(SENTENCES[:1])
    padded = batcher.bert_inputs(SENTENCES[:2])  # sentence 0 is shorter than sentence 1
    assert padded["bert_input_ids"].shape[1] > alone["bert_input_ids"].shape[1]
    with torch.no_grad():
        a = stage0.pformer(alone["bert_input_ids"], alone["bert_attention_mask"])[0]
        b = stage0.pformer(padded["bert_input_ids"], padded["bert_attention_mask"])[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- losses
def test_all_losses_finite_and_weighted_sum(folders):
    stage0, batcher = make(folders, lm_weight=1.0, contrastive_weight=2.0, vq_weight=0.5)
    stage0.eval()  # no dropout, so that the parts can be recomputed exactly
    out = stage0(**batcher(SENTENCES, seed=3))
    parts = out["losses"]  # what the trainer logs as lm_loss, contrastive_loss, vq_loss
    assert sorted(parts) == ["contrastive", "lm", "vq"] and torch.isfinite(out["loss"])
    assert all(torch.isfinite(v) and v.dim() == 0 for v in parts.values())
    weighted = parts["lm"] + 2 * parts["contrastive"] + 0.5 * parts["vq"]
    torch.testing.assert_close(out["loss"], weighted)
    assert out["per_sample_loss"].shape == (len(SENTENCES),)
    assert torch.is_tensor(out["num_tokens"]) and out["num_tokens"].dim() == 0
    assert out["num_tokens"] > len(SENTENCES)
    stage0, batcher = make(folders, vq_weight=0.0)  # a zero weight skips the term
    assert "vq" not in stage0(**batcher(SENTENCES))["losses"]


@pytest.mark.parametrize("term,views", [("lm", 1), ("contrastive", 1), ("contrastive", 2), ("vq", 1)])
def test_each_loss_falls_when_optimised(folders, term, views):
    weights = {f"{t}_weight": float(t == term) for t in ("lm", "contrastive", "vq")}
    stage0, batcher = make(folders, views=views, **weights)
    stage0.eval()  # no dropout: with it, the one-view contrastive term can be lowered by dropout noise alone
    batch = batcher(SENTENCES, seed=0)
    opt = torch.optim.AdamW(stage0.trainable_parameters(), lr=3e-3)
    before = {n: p.detach().clone() for n, p in stage0.llm.named_parameters()}
    losses = []
    for _ in range(40):
        loss = stage0(**batch)["losses"][term]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda x: x == x, losses))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, (term, losses[:5], losses[-5:])
    for n, p in stage0.llm.named_parameters():  # the LLM is frozen
        assert torch.equal(p, before[n]) and p.grad is None


def test_prefix_lm_loss_equals_the_llms_own_loss_with_ignored_prefix(folders):
    stage0, batcher = make(folders)
    batch = batcher(SENTENCES[:4])
    soft = torch.randn(4, N, 48)
    ours = prefix_lm_loss(stage0.llm, soft, batch["input_ids"], batch["attention_mask"], batch["labels"])
    embeds = torch.cat([soft, stage0.llm.get_input_embeddings()(batch["input_ids"])], 1)
    mask = torch.cat([torch.ones(4, N, dtype=torch.long), batch["attention_mask"]], 1)
    labels = torch.cat([torch.full((4, N), -100), batch["labels"]], 1)
    ref = stage0.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours["loss"], ref)
    assert ours["num_tokens"] == int((batch["labels"] != -100).sum())


def test_views_must_match_the_batch(folders):
    stage0, batcher = make(folders)
    batch = batcher(SENTENCES[:2])
    with pytest.raises(ValueError, match="views is 1"):
        stage0(**batch, bert_input_ids_2=batch["bert_input_ids"])


def test_contrastive_on_one_process_is_self_positive_cross_entropy():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(6, 8), dim=-1)
    temp = torch.tensor(0.07)
    ref = F.cross_entropy(f @ f.T / temp, torch.arange(6), label_smoothing=0.1)
    torch.testing.assert_close(contrastive_loss(f, f, temp, 0.1), ref)
    # the official single view: the positive logit is 1/temp, the largest possible
    assert torch.allclose((f @ f.T).diagonal(), torch.ones(6))


def _gather_worker(rank: int, world: int, store: str, out: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    full = F.normalize(torch.randn(world * 3, 8), dim=-1)
    q = full[rank * 3 : (rank + 1) * 3].clone().requires_grad_(True)
    k = F.normalize(torch.randn(world * 3, 8), dim=-1)[rank * 3 : (rank + 1) * 3].clone().requires_grad_(True)
    loss = contrastive_loss(q, k, torch.tensor(0.1), 0.1)
    loss.backward()
    torch.save({"loss": loss.detach(), "q_grad": q.grad, "k_grad": k.grad}, f"{out}.{rank}")
    mismatch = None
    try:  # unequal per-rank batches: one clear error on every rank, no hang
        contrastive_loss(q[: rank + 1].detach(), k[: rank + 1].detach(), torch.tensor(0.1))
    except ValueError as e:
        mismatch = str(e)
    torch.save(mismatch, f"{out}.mismatch.{rank}")
    dist.destroy_process_group()


def test_contrastive_gathers_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_gather_worker, args=(world, str(tmp_path / "store"), str(tmp_path / "res")), nprocs=world)
    torch.manual_seed(0)
    full_q = F.normalize(torch.randn(world * 3, 8), dim=-1)
    full_k = F.normalize(torch.randn(world * 3, 8), dim=-1)
    for rank in range(world):
        res = torch.load(tmp_path / f"res.{rank}")
        q = full_q[rank * 3 : (rank + 1) * 3].clone().requires_grad_(True)
        k_local = full_k[rank * 3 : (rank + 1) * 3].clone().requires_grad_(True)
        keys = torch.cat([full_k[: rank * 3], k_local, full_k[(rank + 1) * 3 :]])  # others: no grad
        ref = F.cross_entropy(q @ keys.T / 0.1, torch.arange(3) + rank * 3, label_smoothing=0.1)
        ref.backward()
        torch.testing.assert_close(res["loss"], ref.detach())
        torch.testing.assert_close(res["q_grad"], q.grad)
        torch.testing.assert_close(res["k_grad"], k_local.grad)  # this rank's keys keep their gradient
        assert "batch sizes differ [1, 2]" in torch.load(tmp_path / f"res.mismatch.{rank}")


def test_temperature_is_clamped_with_a_straight_through_gradient(folders):
    stage0, _ = make(folders)
    pf = stage0.pformer
    with torch.no_grad():
        pf.temp.fill_(-0.3)
    t = pf.temperature(1e-3, 0.5)
    assert t.item() == pytest.approx(1e-3, rel=1e-4)
    t.backward()
    assert pf.temp.grad.item() == 1.0  # it can come back inside


def test_vq_picks_the_true_nearest_codebook_row():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(1000, 16, generator=g)
    x = torch.randn(37, 16, generator=g) * 1.5
    brute = torch.cdist(x, codebook).argmin(1)
    for chunk in (64, 333, 5000):  # several chunks, an uneven last one, a single one
        assert torch.equal(nearest_rows(x, codebook, chunk), brute)
    idx = torch.randint(0, 1000, (2, 3), generator=g)
    prompts = (codebook[idx] + 0.01 * torch.randn(2, 3, 16, generator=g)).requires_grad_(True)
    cb = codebook.clone().requires_grad_(True)
    loss = vq_loss(prompts, cb, chunk=100)
    torch.testing.assert_close(loss, F.mse_loss(prompts, codebook[idx]))
    loss.backward()
    assert cb.grad is None and prompts.grad.abs().sum() > 0  # the codebook side is detached


def test_masking_spares_special_tokens_and_is_reproducible(folders):
    _, batcher = make(folders)
    tok = batcher.bert_tokenizer
    enc = batcher.bert_inputs(SENTENCES * 8)
    ids, att = enc["bert_input_ids"], enc["bert_attention_mask"]
    kw = dict(mask_id=tok.mask_token_id, keep_ids=batcher.keep_ids, ratio=0.25)
    masked, hit = mask_tokens(ids, att, generator=torch.Generator().manual_seed(7), **kw)
    special_ids = torch.tensor([tok.cls_token_id, tok.sep_token_id, tok.pad_token_id])
    special = torch.isin(ids, special_ids) | (att == 0)
    assert special.any() and not (hit & special).any()
    assert torch.equal(masked[special], ids[special])
    assert (masked[hit] == tok.mask_token_id).all() and torch.equal(masked[~hit], ids[~hit])
    share = hit.sum() / (~special).sum()
    assert 0.15 < share < 0.35, share
    again, _ = mask_tokens(ids, att, generator=torch.Generator().manual_seed(7), **kw)
    other, _ = mask_tokens(ids, att, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(masked, again) and not torch.equal(masked, other)
    # the collate: an explicit seed gives the same batch; a DataLoader worker's copy builds the same one
    first, again = (batcher(SENTENCES, seed=5)["bert_input_ids"] for _ in range(2))
    assert torch.equal(first, again)
    copy = pickle.loads(pickle.dumps(batcher))
    assert torch.equal(copy(SENTENCES, seed=5)["bert_input_ids"], first)
    # without one, the masks are a function of the run seed and the sentences (exact resume), and
    # another batch, order or run seed masks otherwise
    a = batcher(SENTENCES * 4)["bert_input_ids"]
    assert torch.equal(copy(SENTENCES * 4)["bert_input_ids"], a)
    assert torch.equal(make(folders)[1](SENTENCES * 4)["bert_input_ids"], a)
    assert not torch.equal(batcher(SENTENCES[::-1] * 4)["bert_input_ids"], a.flip(0))
    other_seed = SentenceBatcher(batcher.bert_tokenizer, batcher.caption_tokenizer, batcher.cfg, seed=1)
    assert not torch.equal(other_seed(SENTENCES * 4)["bert_input_ids"], a)
    two = make(folders, views=2)[1](SENTENCES * 4)
    assert not torch.equal(two["bert_input_ids"], two["bert_input_ids_2"])


# ------------------------------------------------------------------------------------------ files
def test_save_load_round_trip_and_strictness(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    stage0, batcher = make(folders)
    pf = stage0.pformer
    with torch.no_grad():
        pf.temp.fill_(0.05)
    out = save_pformer(pf, tmp_path / "pf", stage0.cfg, tokenizer=batcher.bert_tokenizer, llm_name="tiny-opt")
    meta = json.loads((out / "config.json").read_text())
    assert meta["num_prompts"] == N and meta["llm_width"] == 48 and meta["pformer"]["num_prompts"] == N
    loaded = load_pformer(out, llm_width=48)
    assert loaded.frozen and not loaded.training and loaded.temp.item() == pytest.approx(0.05)
    tok = load_pformer_tokenizer(out)
    enc = tok(SENTENCES[:3], padding="longest", return_tensors="pt")
    pf.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(enc["input_ids"], enc["attention_mask"]), pf(enc["input_ids"], enc["attention_mask"])
        )

    with pytest.raises(FileNotFoundError, match="nowhere: not a P-Former folder"):
        load_pformer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="format is 'simvlg-connector'"):
        (tmp_path / "conn").mkdir()
        (tmp_path / "conn" / "config.json").write_text('{"format": "simvlg-connector"}')
        load_pformer(tmp_path / "conn")
    with pytest.raises(ValueError, match="prompts are 48 wide"):
        load_pformer(out, llm_width=2560)
    sd = load_file(str(out / "model.safetensors"))
    gone = sd.pop("llm_proj.weight")
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"safetensors: does not match .*missing \['llm_proj.weight'\]"):
        load_pformer(out)
    sd["llm_proj.weight"], sd["extra.bias"] = gone, torch.zeros(2)
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected \['extra.bias'\]"):
        load_pformer(out)
    sd.pop("extra.bias")
    sd["llm_proj.weight"] = torch.zeros(49, 32)
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"llm_proj.weight has shape \(49, 32\)"):
        load_pformer(out)


# ------------------------------------------------------------------------------------- frozen use
class _Student(nn.Module):
    """A stand-in VLM: a trainable connector output and a frozen P-Former inside one module."""

    def __init__(self, pformer: PFormer):
        super().__init__()
        self.pformer = pformer
        self.soft = nn.Parameter(torch.randn(2, N, 48))


def test_frozen_pformer_keeps_eval_through_parent_train_and_gets_no_gradient(folders, tmp_path):
    from transformers import AutoModel, BertConfig

    # a dropout of 0.5 makes train-mode outputs differ run to run, so this test can fail
    torch.manual_seed(0)
    bert = AutoModel.from_config(
        BertConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            hidden_dropout_prob=0.5,
            attention_probs_dropout_prob=0.5,
        )
    )
    ids = torch.randint(5, 40, (2, 7))
    live = PFormer(bert, N, 48)
    live.train()
    assert not torch.equal(live(ids), live(ids))

    student = _Student(live.freeze())
    student.train()
    assert student.training and not any(m.training for m in student.pformer.modules())
    a, b = student.pformer(ids), student.pformer(ids)
    assert torch.equal(a, b) and not a.requires_grad
    loss = alignment_loss(student.soft, a)
    loss.backward()
    assert student.soft.grad is not None and student.soft.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in student.pformer.parameters())


# -------------------------------------------------------------------------------------- alignment
def test_position_alignment_is_plain_mse():
    s, t = torch.randn(3, N, 8), torch.randn(3, N, 8)
    torch.testing.assert_close(alignment_loss(s, t), ((s - t) ** 2).mean())


def test_assignment_alignment_is_order_free():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, N, 8, generator=g)
    s = torch.randn(4, N, 8, generator=g)
    base = alignment_loss(s, t, "assignment")
    for _ in range(3):  # invariant to a permutation of the soft-prompt positions (per sample)
        perm = torch.stack([torch.randperm(N, generator=g) for _ in range(4)])
        shuffled = s.gather(1, perm[..., None].expand_as(s))
        torch.testing.assert_close(alignment_loss(shuffled, t, "assignment"), base)
    assert base <= alignment_loss(s, t, "position")
    near = t + 0.01 * torch.randn(4, N, 8, generator=g)  # orders agree: the identity is optimal
    assert torch.equal(optimal_assignment(near, t), torch.arange(N).expand(4, N))
    torch.testing.assert_close(alignment_loss(near, t, "assignment"), alignment_loss(near, t, "position"))
    perm = torch.randperm(N, generator=g)
    assert torch.equal(optimal_assignment(near[:, perm], t), perm.expand(4, N))


@pytest.mark.parametrize("match", ["position", "assignment"])
def test_alignment_gradients_reach_only_the_student(match):
    s = torch.randn(2, N, 8, requires_grad=True)
    t = torch.randn(2, N, 8, requires_grad=True)
    alignment_loss(s, t, match).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_alignment_refuses_other_lengths():
    with pytest.raises(ValueError, match="P must equal N"):
        alignment_loss(torch.randn(2, 29, 8), torch.randn(2, 32, 8))
    with pytest.raises(ValueError, match="align_match"):
        alignment_loss(torch.randn(2, N, 8), torch.randn(2, N, 8), "greedy")


# ------------------------------------------------------------------------------------------- meta
def test_paper_size_stage0_on_meta():
    from importlib import resources

    arch = resources.files("pipeline") / "configs" / "arch"
    cfg = PFormerConfig(arch_config=str(arch / "bert-base-uncased.json"), num_prompts=29)
    llm_cfg = LLMConfig(arch_config=str(arch / "opt-2.7b.json"))
    stage0 = build_stage0(cfg, llm_cfg, meta=True)
    pf = stage0.pformer
    assert isinstance(stage0, PFormerStage0) and pf.llm_width == 2560
    trainable = sum(p.numel() for p in stage0.trainable_parameters())
    # BERT-base without pooler 108.9 M + 768 x 29*768 + 768^2 + 768 x 2560 + 768 x 256 + temp
    assert trainable == pytest.approx(108.89e6 + 17.13e6 + 0.59e6 + 1.97e6 + 0.20e6, rel=2e-3)
    ids = torch.zeros(1, 32, dtype=torch.long, device="meta")
    out = stage0(ids, None, ids[:, :33], None, ids[:, :33])
    assert out["loss"].is_meta and pf(ids).shape == (1, 29, 2560)


def test_config_refuses_a_temperature_outside_its_range():
    with pytest.raises(ValueError, match="temp_init 0.9 is outside"):
        PFormerConfig(temp_init=0.9)


def test_build_llm_and_pformer_widths_must_agree(folders):
    cfg = PFormerConfig(init=str(folders / "bert"), num_prompts=N)
    llm = build_llm(LLMConfig(name=str(folders / "opt"), precision="fp32"))
    with pytest.raises(ValueError, match="width 64, the LLM is 48"):
        PFormerStage0(cfg, build_pformer(cfg, 64), llm)


def test_all_zero_loss_weights_are_refused_when_the_config_loads():
    from pipeline.config import ConfigError, load_config

    zero = [f"model.pformer.{k}_weight=0" for k in ("lm", "contrastive", "vq")]
    all_zero = "model.pformer: lm_weight, contrastive_weight and vq_weight are all 0"
    with pytest.raises(ConfigError, match=all_zero):
        load_config("pformer_opt2.7b", zero)
    assert load_config("pformer_opt2.7b", zero[1:]).model.pformer.lm_weight == 1.0
