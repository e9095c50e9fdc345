"""The joint adaptive representation connector (model.connector: joint), after "Building compact
representations for image-language learning" (§3.1): reduce each modality to N learned tokens once,
then fuse text into image iteratively with tanh-gated cross-attention.

    feats [B, Nv, Dv] -> ln_vision -> proj_vision (P, W1) ------------> [B, Nv, D]
        f_N = W2 · MHA(X_N, P(X_im))                       Eq. 1       [B, N, D]   N image latents
    text_embeds [B, L, D_llm] -> ln_text -> proj_text + position ----> [B, L, D]
        t_N = W2' · MHA(X'_N, P'(X_text))                  (the same)  [B, N, D]   N text latents
    for i in 1..K:  x = t_N (i = 1) or F + t_N (i > 1)     Eq. 2 / 3
        P = Ln(x) + tanh(α_i) · MHA(Ln(x), Ln(f_N))                    text (or joint) queries the image
        F = P + tanh(β_i) · MLP(P)
        F = T_i(F)                                                     a pre-LN Transformer layer on N tokens
    soft prompt = proj_out(ln_out(F))                                  [B, N, D_llm]

The soft prompt is N tokens long whatever Nv and L are. Choices the paper leaves open, and ours:
- Text side: the frozen LLM's input embeddings of the task's text input (prompt, caption prefix,
  question), projected to D, plus learned positions counted over the unpadded tokens (left or right
  padding give the same positions). The paper feeds T5-encoder features; our LLM is decoder-only and
  frozen, and running it over the text first would cost a second LLM pass. The LLM reads the same
  text in context right after the soft prompt anyway, so the connector's text side only has to steer
  what is read from the image; no second tokenizer, nothing but the ids the batch already has.
- Separate latents X_N, X'_N and attention weights per modality; separate weights and gates per
  fusion iteration (the paper's Table 2(c) counts FLOPs per iteration; weight sharing is not stated).
- Gates α, β start at `gate_init` = 1 (tanh 0.76; the paper gives no value). Not 0 as in Flamingo:
  Flamingo protects a pretrained LM inside its residual stream, whereas here everything after the gate
  is new, and with tanh(α) = 0 the soft prompt starts image-blind and the cross-attention gets no
  gradient until α has moved. On the seeded toy mapping of tests/test_joint.py (toy_fit), the first
  step below half the image-blind loss, for gate_init 0 / 0.5 / 1 / 2 (seeds 0, 1, 2): at lr 1e-3
  112,109,112 / 98,96,92 / 94,92,85 / 91,91,82; at lr 3e-4 242,230,243 / 207,201,197 / 197,192,183 /
  190,187,174. At 1, tanh' is still 0.42: the gate can close again where 2 nearly saturates.
- T is pre-LN (stable from scratch), so the output gets a final LayerNorm before the LLM projection.

No checkpoint to start from: every weight is random, so it builds on the meta device directly
(`with torch.device("meta"): JointConnector(...)`) for the FLOP counter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def text_input_mask(attention_mask: torch.Tensor, labels: torch.Tensor, ignore: int = -100) -> torch.Tensor:
    """[B, L] bool: the tokens of a training row (CaptionTokenizer's layout: BOS, text input | target |
    padding) that are the task's text input: attended and without loss. The connector must never see
    the target it is trained to make the LLM produce."""
    return attention_mask.bool() & (labels == ignore)


class Attention(nn.Module):
    """Multi-head attention of queries x [B, Nq, D] over context [B, Nk, D]; mask [B, Nk] bool (True:
    attend)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"joint connector width {dim} is not a multiple of heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, context, mask=None):
        B, Nq, D = x.shape
        Nk, h = context.shape[1], self.heads
        q = self.q(x).view(B, Nq, h, D // h).transpose(1, 2)  # [B, h, Nq, d]
        k = self.k(context).view(B, Nk, h, D // h).transpose(1, 2)  # [B, h, Nk, d]
        v = self.v(context).view(B, Nk, h, D // h).transpose(1, 2)
        bias = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, Nk]
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o(a.transpose(1, 2).reshape(B, Nq, D))  # [B, Nq, D]


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: float, dropout: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))


class Resampler(nn.Module):
    """Eq. 1: N learned latents (DETR-style) attend once to a token set: [B, M, D] -> [B, N, D]."""

    def __init__(self, dim: int, heads: int, num_latents: int, dropout: float):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(num_latents, dim))  # X_N
        self.attn = Attention(dim, heads, dropout)  # Φ
        self.out = nn.Linear(dim, dim)  # W2

    def forward(self, tokens, mask=None):
        q = self.latents.expand(tokens.shape[0], -1, -1)  # [B, N, D]
        return self.out(self.attn(q, tokens, mask))


class TransformerLayer(nn.Module):
    """T: pre-LN self-attention + MLP on the N fused tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.mlp = MLP(dim, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h))
        return x + self.mlp(self.ln2(x))


class FusionLayer(nn.Module):
    """One iteration of Eq. 2 / 3: gated cross-attention of x into the image tokens, gated MLP, then T."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, gate_init: float):
        super().__init__()
        self.ln_query, self.ln_image = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, dropout)
        self.mlp = MLP(dim, mlp_ratio, dropout)
        # scalar gates, kept as [1] (not 0-dim) for the optimizers and ZeRO that flatten parameters
        self.alpha = nn.Parameter(torch.full((1,), float(gate_init)))
        self.beta = nn.Parameter(torch.full((1,), float(gate_init)))
        self.block = TransformerLayer(dim, heads, mlp_ratio, dropout)

    def forward(self, x, f_n):  # x: t_N or F_i + t_N [B, N, D]; f_n [B, N, D]
        q = self.ln_query(x)
        p = q + torch.tanh(self.alpha) * self.cross_attn(q, self.ln_image(f_n))  # P_cross
        fused = p + torch.tanh(self.beta) * self.mlp(p)
        return self.block(fused)  # [B, N, D]


class JointConnector(nn.Module):
    """[B, Nv, Dv] visual tokens + [B, L, D_llm] text-input embeddings -> [B, N, D_llm] soft prompt."""

    def __init__(
        self,
        vision_width: int,
        llm_width: int,
        *,
        width: int = 768,
        heads: int = 12,
        num_latents: int = 32,
        iterations: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        gate_init: float = 1.0,
        max_text_len: int = 128,
        temporal=None,
    ):
        super().__init__()
        if iterations < 1 or num_latents < 1:
            raise ValueError(
                f"joint connector: iterations ({iterations}) and num_latents ({num_latents}) must be >= 1"
            )
        self.width, self.num_latents, self.max_text_len = width, num_latents, max_text_len
        self.ln_vision = nn.LayerNorm(vision_width)  # as the other connectors
        self.proj_vision = nn.Linear(vision_width, width)  # P = W1
        self.ln_text = nn.LayerNorm(llm_width)
        self.proj_text = nn.Linear(llm_width, width)
        self.text_pos = nn.Parameter(torch.empty(max_text_len, width))
        self.image_resampler = Resampler(width, heads, num_latents, dropout)
        self.text_resampler = Resampler(width, heads, num_latents, dropout)
        self.layers = nn.ModuleList(
            FusionLayer(width, heads, mlp_ratio, dropout, gate_init) for _ in range(iterations)
        )
        self.ln_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, llm_width)
        self.temporal = temporal  # nn.ModuleList (video) or None, as the other connectors
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linears and LayerNorms: PyTorch's defaults (fan-in scaled: BERT's fixed std 0.02 suits width
        768 but shrinks a chain of four projections at demo widths toward LayerNorm's eps); latents
        N(0, 1) like DETR's query embeddings (distinct queries, so the resampler's attention is not
        uniform at step 0); positions N(0, 0.02). Gates keep their value; temporal modules their own."""
        for name, m in self.named_modules():
            if not name.startswith("temporal") and isinstance(m, (nn.Linear, nn.LayerNorm)):
                m.reset_parameters()
        for p in (self.image_resampler.latents, self.text_resampler.latents):
            nn.init.normal_(p, std=1.0)
        nn.init.normal_(self.text_pos, std=0.02)

    # ------------------------------------------------------------------------------------- text
    def text_tokens(self, text_embeds, text_mask=None):
        """[B, L, D_llm] (+ [B, L] 0/1 or bool) -> ([B, L, D] projected + positioned, [B, L] bool).
        A row reads its first max_text_len text tokens (its later ones are masked: a long caption in
        a matching question must not end a run)."""
        B, L = text_embeds.shape[:2]
        if text_mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=text_embeds.device)
        else:
            mask = text_mask.bool()
        rank = mask.long().cumsum(1) - 1  # [B, L] rank among the row's text tokens
        mask = mask & (rank < self.max_text_len)
        pos = rank.clamp(0, self.max_text_len - 1)
        x = self.proj_text(self.ln_text(text_embeds.to(self.proj_text.weight.dtype)))
        return x + self.text_pos[pos], mask

    # ---------------------------------------------------------------------------------- forward
    def forward_with_sources(self, feats):
        raise ValueError("the joint connector does not merge tokens: no merge sources")

    def forward(self, feats, *, text_embeds=None, text_mask=None):
        """feats [B, Nv, Dv]; text_embeds [B, L, D_llm] and text_mask [B, L] (None: no text, t_N = 0)
        -> soft prompt [B, N, D_llm]."""
        dtype = self.proj_vision.weight.dtype
        f_n = self.image_resampler(self.proj_vision(self.ln_vision(feats.to(dtype))))  # [B, N, D]
        if text_embeds is None:
            t_n = f_n.new_zeros(f_n.shape)
        else:
            x, mask = self.text_tokens(text_embeds, text_mask)  # [B, L, D], [B, L]
            empty = ~mask.any(1)  # [B] rows without text: attend to position 0, then zero
            mask = mask | (empty[:, None] & (torch.arange(mask.shape[1], device=mask.device) == 0))
            t_n = self.text_resampler(x, mask) * (~empty)[:, None, None].to(dtype)  # [B, N, D]
        fused = None
        for layer in self.layers:
            fused = layer(t_n if fused is None else fused + t_n, f_n)  # [B, N, D]
        return self.proj_out(self.ln_out(fused))  # [B, N, D_llm]

    # ------------------------------------------------------------------------------------ FLOPs
    def forward_flops(self, num_visual: int, text_len: int) -> int:
        """Matmul FLOPs of one sample's forward (2 per multiply-add; what torch.utils.flop_counter
        counts: linears and attention, not norms or activations)."""
        D, N = self.width, self.num_latents
        Dv, Dl = self.proj_vision.in_features, self.proj_text.in_features
        H = self.layers[0].mlp[0].out_features  # MLP hidden width

        def resample(m):  # q, o, W2 on N latents; k, v on M tokens; scores + weighted sum
            return 6 * N * D * D + 4 * m * D * D + 4 * N * m * D

        fusion = 2 * (8 * N * D * D + 4 * N * D * H + 4 * N * N * D)  # cross-attn + MLP, then T
        return (
            2 * num_visual * Dv * D
            + resample(num_visual)
            + (2 * text_len * Dl * D + resample(text_len) if text_len else 0)
            + len(self.layers) * fusion
            + 2 * N * D * Dl
        )
