"""The SimVLG models: frozen ViT -> TomeFormer (or Q-Former) connector -> frozen LLM.

    from pipeline.models import build_model, CaptionTokenizer
    model = build_model(cfg.model, device="cuda")            # real weights (HF ids / folders, timm)
    model = build_model(cfg.model, meta=True)                # full size on the meta device, offline
    tok = CaptionTokenizer.from_config(cfg.model.llm)        # collate: captions -> ids, mask, labels
    out = model(pixel_values, **tok(captions))               # loss, per_sample_loss [B], num_tokens
    model.generate(pixel_values)                             # list[str]

Rooms: vision.py (frozen ViT), tomeformer.py (BERT + ToMe), temporal.py (video), qformer.py (BLIP-2
baseline), llm.py (frozen LLM, tokenizer), simvlg.py (the whole), flops.py (`simvlg bench flops`).
"""

from .llm import CaptionTokenizer
from .simvlg import QFormerConnector, SimVLG, TomeConnector, build_model, connector_config

__all__ = ["CaptionTokenizer", "QFormerConnector", "SimVLG", "TomeConnector", "build_model",
           "connector_config"]
