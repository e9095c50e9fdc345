"""The frozen vision encoder: a timm or HF ViT run block by block up to `feature_layer`.

    vit = build_vision(cfg.vision, device="cpu")       # frozen, eval, cfg.vision.precision
    feats = vit(pixels)                                # [B, 3, H, W] -> [B, N, D]   (N = 257 for ViT-g/14)
                                                       # pixels: uint8 (normalised here) or normalised
    feats = vit(frames, temporal=modules)              # [B, T, 3, H, W] -> [B, T, N, D]

Features are the output of block `feature_layer` in hidden_states numbering (-2: the penultimate
block, as BLIP-2), without the ViT's final norm; the trainable LayerNorm after it (BLIP-2's
ln_vision) lives in the connector. Blocks past `feature_layer` and the final norm/head are dropped,
so they cost no memory and are not counted as frozen parameters.

Block-level running (needed to place temporal merging between a block's attention and its MLP) is
implemented for timm's Eva / VisionTransformer blocks and transformers' ViT layers. Other HF vision
towers run through `output_hidden_states` (images only).

Activation checkpointing (`grad_checkpointing`): when gradients flow through the frozen ViT (video:
the temporal modules inside it train), each block keeps only its input and is recomputed in
backward (torch.utils.checkpoint, non-reentrant): same outputs and gradients, ViT activation memory
from all blocks' intermediates down to one [B*T, N, D] tensor per block plus one block's worth. The
frozen ViT runs in eval mode and draws no random numbers, so no RNG state is kept for the recompute.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import VisionConfig
from pipeline.data.transforms import normalize_batch

from .llm import DTYPES, freeze, hf_config_from_json, load_arch_json


def n_blocks_run(depth: int, feature_layer: int) -> int:
    """Blocks to run for hidden_states[feature_layer] (index 0 = embeddings, -1 = last block)."""
    n = depth + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 1 <= n <= depth:
        raise ValueError(f"vision.feature_layer {feature_layer} is outside a {depth}-block ViT")
    return n


# ----------------------------------------------------------------------------- block adapters
# Each adapter knows one family's layout: embed(pixels) -> (tokens, extra), attn_half(block, x, extra)
# = x + attention part, mlp_half(block, x) = x + MLP part, and how to drop the unused tail.


class TimmAdapter:
    """timm Eva (EVA-01/02, EVA-CLIP) and VisionTransformer: norm1/attn/norm2/mlp blocks."""

    def __init__(self, model):
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer

        self.eva = isinstance(model, Eva)
        if not (self.eva or isinstance(model, VisionTransformer)) or getattr(model, "rope_mixed", False):
            raise TypeError(
                f"timm model {type(model).__name__} is not supported (Eva or "
                "VisionTransformer with norm1/attn/norm2/mlp blocks)"
            )
        self.num_prefix_tokens = model.num_prefix_tokens
        self.grid = tuple(model.patch_embed.grid_size)
        self.width = model.embed_dim

    @staticmethod
    def blocks(model):
        return model.blocks

    @staticmethod
    def truncate(model, n):
        model.blocks = model.blocks[:n]
        for name in ("norm", "fc_norm", "head", "head_drop"):
            if hasattr(model, name):
                setattr(model, name, nn.Identity())

    def embed(self, model, x):
        x = model.patch_embed(x)
        if self.eva:
            x, rope = model._pos_embed(x)
        else:
            x, rope = model.patch_drop(model._pos_embed(x)), None
        return model.norm_pre(x), rope

    def attn_half(self, blk, x, rope):
        if self.eva:
            a = blk.attn(blk.norm1(x), rope=rope)
            return x + blk.drop_path1(a if blk.gamma_1 is None else blk.gamma_1 * a)
        return x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))

    def mlp_half(self, blk, x):
        if self.eva:
            m = blk.mlp(blk.norm2(x))
            return x + blk.drop_path2(m if blk.gamma_2 is None else blk.gamma_2 * m)
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


class HFViTAdapter:
    """transformers ViTModel (5.x layout: model.layers[i].{layernorm_before, attention, mlp, ...})."""

    def __init__(self, model):
        c = model.config
        self.num_prefix_tokens = 1
        side = c.image_size // c.patch_size
        self.grid = (side, side)
        self.width = c.hidden_size

    @staticmethod
    def supports(model) -> bool:
        layers = getattr(model, "layers", None)
        return (
            type(model).__name__ == "ViTModel"
            and layers is not None
            and all(
                hasattr(layers[0], a)
                for a in ("layernorm_before", "attention", "mlp", "layernorm_after", "dropout")
            )
        )

    @staticmethod
    def blocks(model):
        return model.layers

    @staticmethod
    def truncate(model, n):
        model.layers = model.layers[:n]
        model.layernorm = nn.Identity()
        model.pooler = None

    def embed(self, model, x):
        return model.embeddings(x), None

    def attn_half(self, blk, x, _):
        h, _ = blk.attention(blk.layernorm_before(x), None)
        return x + blk.dropout(h)

    def mlp_half(self, blk, x):
        return x + blk.dropout(blk.mlp(blk.layernorm_after(x)))


class VisionTower(nn.Module):
    """A frozen ViT returning [B, N, D] tokens of block `feature_layer` (see the module docstring)."""

    def __init__(self, model: nn.Module, feature_layer: int, adapter=None, grad_checkpointing: bool = False):
        super().__init__()
        self.model, self.adapter = model, adapter
        self.grad_checkpointing = grad_checkpointing
        if adapter is not None:
            self.num_blocks = n_blocks_run(len(adapter.blocks(model)), feature_layer)
            adapter.truncate(model, self.num_blocks)
            self.num_prefix_tokens, self.grid, self.width = (
                adapter.num_prefix_tokens,
                adapter.grid,
                adapter.width,
            )
        else:  # generic HF tower: hidden_states[feature_layer]
            c = getattr(model.config, "vision_config", model.config)
            self.num_blocks = n_blocks_run(c.num_hidden_layers, feature_layer)
            self.feature_layer = feature_layer
            side = c.image_size // c.patch_size
            self.grid, self.width = (side, side), c.hidden_size
            self.num_prefix_tokens = 1  # CLS; corrected on the first forward
        freeze(self)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always eval (no dropout / drop-path)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] + self.num_prefix_tokens

    def forward(self, pixel_values: torch.Tensor, temporal: nn.ModuleList | None = None) -> torch.Tensor:
        video = pixel_values.dim() == 5
        B, T = pixel_values.shape[0], (pixel_values.shape[1] if video else 1)
        x = pixel_values.reshape(B * T, *pixel_values.shape[-3:])  # [B*T, 3, H, W]
        if x.dtype == torch.uint8:  # as the loader delivers them: normalise here, on the device
            x = normalize_batch(x)
        x = x.to(self.dtype)
        if temporal is not None and self.adapter is None:
            raise ValueError("temporal merging needs block-level running (timm Eva/ViT or HF ViTModel)")
        with torch.set_grad_enabled(torch.is_grad_enabled() and temporal is not None):
            if self.adapter is None:
                out = self.model(pixel_values=x, output_hidden_states=True)
                x = out.hidden_states[self.feature_layer]  # [B*T, N, D]
                self.num_prefix_tokens = x.shape[1] - self.grid[0] * self.grid[1]
            else:
                a = self.adapter
                x, extra = a.embed(self.model, x)  # [B*T, N, D]
                recompute = self.grad_checkpointing and temporal is not None and torch.is_grad_enabled()
                for i, blk in enumerate(a.blocks(self.model)):
                    tm = temporal[i] if temporal is not None else None
                    if recompute:  # keep only the block input; rerun the block in backward
                        x = checkpoint(
                            self._block, blk, tm, x, extra, T, use_reentrant=False, preserve_rng_state=False
                        )
                    else:
                        x = self._block(blk, tm, x, extra, T)
        return x.view(B, T, *x.shape[1:]) if video else x  # [B, (T,) N, D]

    def _block(self, blk, temporal_merge, x, extra, num_frames: int):
        """One ViT block: x + attention, temporal merging across frames (video), x + MLP."""
        x = self.adapter.attn_half(blk, x, extra)
        if temporal_merge is not None:
            x = temporal_merge(x, num_frames)
        return self.adapter.mlp_half(blk, x)


# ------------------------------------------------------------------------------------ loading
def _load_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def _build_timm(cfg: VisionConfig, meta: bool) -> nn.Module:
    import timm

    kwargs: dict = {"num_classes": 0}
    if cfg.arch_config:
        kwargs.update(load_arch_json(cfg.arch_config).get("kwargs", {}))
    kwargs["img_size"] = cfg.image_size
    if meta:
        with torch.device("meta"):
            return timm.create_model(cfg.name, pretrained=False, **kwargs)
    model = timm.create_model(cfg.name, pretrained=False, **kwargs)
    if cfg.checkpoint:
        sd = _load_state_dict(cfg.checkpoint)
        module = __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"])
        if hasattr(module, "checkpoint_filter_fn"):  # timm's converter for original checkpoints
            sd = module.checkpoint_filter_fn(sd, model)
        missing, _ = model.load_state_dict(sd, strict=False)
        # BLIP-2's eva_vit_g.pth has 39 blocks and no final norm/head: only unused parts may be missing
        n = n_blocks_run(len(model.blocks), cfg.feature_layer)
        used_missing = [
            k
            for k in missing
            if not k.startswith(("norm.", "fc_norm.", "head."))
            and not (k.startswith("blocks.") and int(k.split(".")[1]) >= n)
        ]
        if used_missing:
            raise ValueError(
                f"{cfg.checkpoint}: missing weights for {used_missing[:5]}"
                f"{' ...' if len(used_missing) > 5 else ''}"
            )
    return model


def _build_hf(cfg: VisionConfig, meta: bool) -> nn.Module:
    from transformers import AutoModel

    dtype = DTYPES[cfg.precision]
    if meta:
        if cfg.arch_config is None:
            raise ValueError("model.vision.arch_config is needed to build the ViT on the meta device")
        with torch.device("meta"):
            model = AutoModel.from_config(hf_config_from_json(cfg.arch_config), dtype=dtype)
    else:
        src = cfg.checkpoint or cfg.name
        if not Path(src).exists() and "/" not in src:
            raise ValueError(f"vision.name {src!r}: not a folder or HF id")
        model = AutoModel.from_pretrained(src, dtype=dtype, attn_implementation="sdpa")
    return getattr(model, "vision_model", model)  # CLIPModel / Blip2Model -> their vision tower


def build_vision(cfg: VisionConfig, *, device="cpu", meta: bool = False) -> VisionTower:
    if cfg.loader == "timm":
        model = _build_timm(cfg, meta)
        adapter = TimmAdapter(model)
    else:
        model = _build_hf(cfg, meta)
        adapter = HFViTAdapter(model) if HFViTAdapter.supports(model) else None
    tower = VisionTower(model, cfg.feature_layer, adapter, cfg.grad_checkpointing)
    if not meta:
        tower.to(device=device, dtype=DTYPES[cfg.precision])
    elif cfg.loader == "timm":
        tower.to(dtype=DTYPES[cfg.precision])
    return tower
