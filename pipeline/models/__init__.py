"""The SimVLG models: frozen ViT -> TomeFormer (or Q-Former) connector -> frozen LLM.

    from pipeline.models import build_model, CaptionTokenizer
    model = build_model(cfg.model, device="cuda")            # real weights (HF ids / folders, timm)
    model = build_model(cfg.model, meta=True)                # full size on the meta device, offline
    tok = CaptionTokenizer.from_config(cfg.model.llm)        # collate: captions -> ids, mask, labels
    out = model(pixel_values, **tok(captions))               # loss, per_sample_loss [B], num_tokens
    model.generate(pixel_values)                             # list[str]
    model = build_training_model(cfg, device=d)              # what `simvlg train` trains (model.kind)
    tokenize = training_tokenizer(cfg)                       # and the collate its batches need

Rooms: vision.py (frozen ViT), tomeformer.py (BERT + ToMe), temporal.py (video), qformer.py (BLIP-2
baseline), llm.py (frozen LLM, tokenizer), simvlg.py (the whole), pformer.py + align.py (P-Former
pre-training, the alignment loss), training.py (what `simvlg train` builds), flops.py (`simvlg bench
flops`).
"""

from .llm import CaptionTokenizer
from .simvlg import QFormerConnector, SimVLG, TomeConnector, build_model, connector_config
from .training import build_training_model, training_tokenizer

__all__ = [
    "CaptionTokenizer",
    "QFormerConnector",
    "SimVLG",
    "TomeConnector",
    "build_model",
    "build_training_model",
    "connector_config",
    "training_tokenizer",
]
