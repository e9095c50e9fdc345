"""A tiny but real training setup shared by the trainer and SLURM tests: WebDataset shards of the
synthetic shapes corpus, a small frozen ViT and OPT and a small BERT saved with save_pretrained,
and a config inheriting the demo's (2 ranks, ZeRO-2, bf16)."""

import io
import json
from pathlib import Path

import torch
import webdataset as wds


def make_tiny_run(root: Path, steps: int) -> Path:
    from transformers import BertConfig, BertModel

    from pipeline.demo import backbones, corpus

    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    samples = list(corpus.generate(96, 0, seed=5))
    for s in range(3):
        with wds.TarWriter(str(shards / f"{s:05d}.tar")) as sink:
            for _split, i, attrs, caption, img in samples[s * 32 : (s + 1) * 32]:
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=95)
                sink.write(
                    {
                        "__key__": f"{s:05d}{i:04d}",
                        "jpg": buf.getvalue(),
                        "txt": caption,
                        "json": json.dumps(attrs).encode(),
                    }
                )
    bb = root / "backbones"
    backbones.build_vit(bb / "vit")
    backbones.build_llm(bb / "opt", corpus.all_attribute_sets(), corpus.caption, "a photo of", steps=30)
    torch.manual_seed(0)
    BertModel(
        BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
    ).save_pretrained(bb / "bert")
    cfg = root / "train.yaml"
    cfg.write_text(f"""inherit: demo.yaml
run: {{name: train-test, seed: 3}}
data:
  sources: [{{name: shapes, shards: "{shards}/{{00000..00002}}.tar", weight: 1}}]
  num_workers: 1
  shuffle_buffer: 16
model:
  vision: {{name: {bb}/vit, loader: hf, arch_config: null, checkpoint: null, precision: bf16}}
  tomeformer: {{init: {bb}/bert, num_layers: 3, r: 8}}
  llm: {{name: {bb}/opt, precision: bf16}}
train:
  steps: {steps}
  global_batch: 8
  micro_batch: 4
  grad_accum: 1
  lr: 2.0e-3
  warmup_steps: 1
  log_every: 1
  ckpt_every: 2
  keep_ckpts: 2
  precision: bf16
""")
    return cfg
