"""The P-Former alignment loss: the connector's soft prompt regressed onto the frozen P-Former's prompts
for the paired caption (Jian et al. 2023, eq. 8-9; training loss L_LM + align_weight * L_align).

    target = pformer(bert_input_ids, bert_attention_mask)      # [B, N, D], frozen: no_grad
    loss = alignment_loss(soft, target, match="position")      # soft [B, P, D] after the projection to
                                                               # the LLM's width; P must equal N

match="position" is the official loss: MSE slot by slot, mean over all B*P*D elements, no normalisation.
A Q-Former's query slots have a fixed order, so slot i can learn to be prompt i. The TomeFormer's output
order follows the image (ToMe keeps tokens where the merges leave them), so asking slot i to be prompt i
asks the connector to learn an order. match="assignment" (ours) pairs each soft token with one prompt
vector by an optimal one-to-one assignment per sample (minimum total squared distance; scipy's
linear_sum_assignment on the [P, N] cost, computed without gradient), then takes the same MSE. The
assignment is piecewise constant in the inputs, so the gradient is the MSE's for the chosen pairing.
It costs one device-to-host copy of [B, P, N] per step and B small assignments (29 x 29: ~10 us each).

The targets come from the paired caption: the collate (CaptionsWithTargets, in the loader's workers)
adds the caption's P-Former tokens (unmasked, the P-Former's own tokenizer and length cap) to the LLM's
caption tokens, and the model runs its frozen P-Former on them (SimVLG.align_to).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Match = Literal["position", "assignment"]


@torch.no_grad()
def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [B, P, D], b [B, N, D] -> ||a_i - b_j||^2 [B, P, N] in fp32 (never a [B, P, N, D] tensor)."""
    a, b = a.float(), b.float()
    d = (a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :] - 2 * a @ b.transpose(1, 2)
    return d.clamp(min=0)


@torch.no_grad()
def optimal_assignment(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-> [B, P] long: the target row paired with each student row, minimising the summed squared
    distance per sample (a permutation of 0..N-1 when P == N)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    cost = squared_distances(student, target).cpu().numpy()  # [B, P, N]
    cols = np.stack([linear_sum_assignment(c)[1] for c in cost])  # rows come back as 0..P-1
    return torch.from_numpy(cols).to(device=student.device, dtype=torch.long)


def alignment_loss(student: torch.Tensor, target: torch.Tensor, match: Match = "position") -> torch.Tensor:
    """MSE between the connector's soft prompt [B, P, D] and the P-Former's prompts [B, N, D] (detached),
    mean over all elements, computed in fp32. Only `student` receives gradient."""
    if student.shape != target.shape:
        raise ValueError(
            f"alignment loss: the connector gives soft prompts {tuple(student.shape)} "
            f"[B, P, D], the P-Former {tuple(target.shape)} [B, N, D]: P must equal N "
            "(set model.pformer.num_prompts to the connector's soft-prompt length) and D the "
            "LLM's width"
        )
    target = target.detach()
    if match == "assignment":
        cols = optimal_assignment(student.detach(), target)  # [B, P]
        target = target.gather(1, cols[..., None].expand_as(target))
    elif match != "position":
        raise ValueError(f"align_match must be 'position' or 'assignment', got {match!r}")
    return F.mse_loss(student.float(), target.float())


class CaptionsWithTargets:
    """Captions -> the LLM's caption tokens (a CaptionTokenizer) + the same captions as the P-Former's
    input, unmasked: bert_input_ids, bert_attention_mask [B, Lb], padded to the longest, at most
    max_text_tokens. Picklable (the loader's workers run it)."""

    def __init__(self, caption_tokenizer, bert_tokenizer, max_text_tokens: int):
        self.caption_tokenizer, self.bert_tokenizer = caption_tokenizer, bert_tokenizer
        self.max_text_tokens = max_text_tokens

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        from .pformer import pformer_inputs

        return self.caption_tokenizer(captions) | pformer_inputs(
            self.bert_tokenizer, captions, self.max_text_tokens
        )
