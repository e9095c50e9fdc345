"""simvlg: one-stage SimVLG pretraining (frozen ViT -> TomeFormer -> frozen LLM)."""

__version__ = "0.1.0"
