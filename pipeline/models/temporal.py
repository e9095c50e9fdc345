"""Temporal attentive soft token merging (paper 3.3), one module per ViT block.

Inside each frozen ViT block, after spatial attention of every frame, every spatial position attends
over time and takes a gated, attention-weighted average of itself across frames:

    v' [B*T, L, D] -> [B*L, T, D];  q = W_q v', k = W_k v'  ([B*L, heads, T, dim/heads])
    v'' = v' + gate * softmax(q k^T / sqrt(dim)) v'          (v' split into heads, no value projection)

as in the official EVLGen code (TemporalTokenMerge: q/k width 256, 8 heads, scale 256^-0.5). The gate
starts at 0, so an image-pretrained model is unchanged; with gate 0 a video of identical frames gives
the image model's output exactly. (With a trained gate it gives (1 + gate) v' per block - the paper's
formula, kept as written.) The module's parameters live in the trainable connector; it computes in
its own dtype (fp32) and hands back the ViT's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TemporalMerge(nn.Module):
    def __init__(self, dim: int, hidden_dim: int = 256, num_heads: int = 8):
        super().__init__()
        if hidden_dim % num_heads or dim % num_heads:
            raise ValueError(
                f"temporal_heads ({num_heads}) must divide temporal_dim ({hidden_dim}) "
                f"and the ViT width ({dim})"
            )
        self.num_heads, self.scale = num_heads, hidden_dim**-0.5
        self.query = nn.Linear(dim, hidden_dim)
        self.key = nn.Linear(dim, hidden_dim)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        BT, L, D = x.shape  # [B*T, L, D], frames of one video adjacent
        T, h = num_frames, self.num_heads
        B = BT // T
        v = x.to(self.gate.dtype).view(B, T, L, D).transpose(1, 2).reshape(B * L, T, D)  # [B*L, T, D]
        q = self.query(v).view(B * L, T, h, -1).transpose(1, 2)  # [B*L, h, T, hd]
        k = self.key(v).view(B * L, T, h, -1).transpose(1, 2)  # [B*L, h, T, hd]
        vh = v.view(B * L, T, h, -1).transpose(1, 2)  # [B*L, h, T, D/h]
        att = F.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)  # [B*L, h, T, T]
        out = (att @ vh).transpose(1, 2).reshape(B, L, T, D).transpose(1, 2).reshape(BT, L, D)
        return x + (self.gate * out).to(x.dtype)


def build_temporal(num_blocks: int, dim: int, hidden_dim: int, num_heads: int) -> nn.ModuleList:
    """One TemporalMerge per ViT block that runs (blocks after feature_layer are dropped)."""
    return nn.ModuleList(TemporalMerge(dim, hidden_dim, num_heads) for _ in range(num_blocks))
