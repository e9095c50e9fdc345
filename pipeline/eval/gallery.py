"""Pictures for people: an HTML gallery of predictions, and the merged-token visualisation (paper Fig. 4).

    write_gallery(items, run_dir / "gallery.html", title="coco_karpathy_test")
    save_merge_figure(image, {3: a3, 7: a7, 11: a11}, "merge/391895.png")

`items` are dicts {id, image (PIL / path / uint8 HWC array / uint8 CHW tensor), prediction,
references, question?, figures: [(label, PIL or path)]?}; images are embedded as base64 JPEG/PNG, so
the HTML is one self-contained file (one MLflow artifact).

A merge assignment says, for one image at one TomeFormer layer, which output token each ViT patch
ended up in: a LongTensor [gh, gw] (as `SimVLG.merge_info(pixels)[layer][b]` returns) or [num_patches]
on a square grid. Each patch is painted with the mean colour of its token's patches (ToMe's style;
style="palette" uses one distinct colour per token, blended over the image), and the borders
between different tokens are drawn.
"""

from __future__ import annotations

import base64
import colorsys
import html
import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_pil(image) -> Image.Image:
    """PIL image from PIL, a file path, uint8 HWC numpy, or uint8 CHW / HWC tensor (video: one frame)."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if torch.is_tensor(image):
        t = image.detach().cpu()
        if t.dim() == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    return Image.fromarray(arr[..., :3] if arr.shape[-1] >= 3 else np.repeat(arr, 3, -1))


def _grid(assignment) -> np.ndarray:
    a = assignment.detach().cpu().numpy() if torch.is_tensor(assignment) else np.asarray(assignment)
    if a.ndim == 1:
        side = math.isqrt(a.shape[0])
        if side * side != a.shape[0]:
            raise ValueError(f"a flat assignment of {a.shape[0]} patches is not a square grid; pass [gh, gw]")
        a = a.reshape(side, side)
    if a.ndim != 2:
        raise ValueError(f"assignment must be [gh, gw] or [num_patches], got shape {tuple(a.shape)}")
    return a.astype(np.int64)


def palette_color(token: int) -> tuple[int, int, int]:
    """A distinct, deterministic colour per token id (golden-ratio hue steps)."""
    h = (token * 0.618033988749895) % 1.0
    s = 0.55 + 0.35 * ((token * 7) % 3) / 2
    r, g, b = colorsys.hsv_to_rgb(h, s, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def merge_overlay(
    image, assignment, *, style: str = "mean", alpha: float = 0.6, min_size: int = 224, border: bool = True
) -> Image.Image:
    """The image with every patch coloured by the token it was merged into."""
    img = to_pil(image)
    a = _grid(assignment)
    gh, gw = a.shape
    scale = max(1, math.ceil(min_size / max(img.width, img.height)))
    W, H = img.width * scale, img.height * scale
    img = img.resize((W, H), Image.Resampling.BICUBIC)
    # patch map at pixel resolution (nearest): [H, W]
    ys = np.minimum((np.arange(H) * gh) // H, gh - 1)
    xs = np.minimum((np.arange(W) * gw) // W, gw - 1)
    pix = a[ys][:, xs]
    arr = np.asarray(img, dtype=np.float32)
    if style == "mean":
        out = np.empty_like(arr)
        for t in np.unique(pix):
            m = pix == t
            out[m] = arr[m].mean(0)
    elif style == "palette":
        colors = np.zeros_like(arr)
        for t in np.unique(pix):
            colors[pix == t] = palette_color(int(t))
        out = (1 - alpha) * arr + alpha * colors
    else:
        raise ValueError(f"style must be 'mean' or 'palette', got {style!r}")
    if border:
        edge = np.zeros(pix.shape, dtype=bool)
        edge[:-1] |= pix[:-1] != pix[1:]
        edge[:, :-1] |= pix[:, :-1] != pix[:, 1:]
        out[edge] = 255.0
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _label(img: Image.Image, text: str) -> Image.Image:
    band = 16
    out = Image.new("RGB", (img.width, img.height + band), "white")
    out.paste(img, (0, band))
    ImageDraw.Draw(out).text((3, 2), text, fill="black")
    return out


def merge_figure(
    image,
    assignments: dict[int, object],
    *,
    style: str = "mean",
    min_size: int = 224,
    title: str | None = None,
) -> Image.Image:
    """One row: the input, then one panel per layer ("layer L: n tokens"; layers 0-based)."""
    base = to_pil(image)
    scale = max(1, math.ceil(min_size / max(base.width, base.height)))
    panels = [
        _label(
            base.resize((base.width * scale, base.height * scale), Image.Resampling.BICUBIC), title or "input"
        )
    ]
    for layer in sorted(assignments):
        a = _grid(assignments[layer])
        n = len(np.unique(a))
        panels.append(
            _label(merge_overlay(base, a, style=style, min_size=min_size), f"layer {layer}: {n} tokens")
        )
    gap = 4
    W = sum(p.width for p in panels) + gap * (len(panels) - 1)
    H = max(p.height for p in panels)
    fig = Image.new("RGB", (W, H), "white")
    x = 0
    for p in panels:
        fig.paste(p, (x, 0))
        x += p.width + gap
    return fig


def save_merge_figure(image, assignments: dict[int, object], path: str | Path, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    merge_figure(image, assignments, **kw).save(path, format="PNG")
    return path


def _data_uri(img: Image.Image, fmt: str = "JPEG", max_side: int = 256) -> str:
    img = to_pil(img)
    if max(img.size) > max_side and fmt == "JPEG":
        img = img.copy()
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """body{font-family:sans-serif;margin:16px;background:#fafafa}
.item{display:inline-block;vertical-align:top;width:300px;margin:6px;padding:8px;background:#fff;
border:1px solid #ddd;border-radius:6px}.item img{max-width:100%}.pred{font-weight:bold;margin:6px 0}
.refs{color:#555;font-size:13px;margin:0;padding-left:18px}.q{color:#036;margin-top:4px}
.fig{margin-top:6px}.fig img{max-width:100%;border:1px solid #eee}.id{color:#999;font-size:11px}"""


def write_gallery(
    items: list[dict], path: str | Path, *, title: str = "predictions", notes: list[str] | None = None
) -> Path:
    """A self-contained HTML page: image, prediction, references (and question, figures) per item."""
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{_CSS}</style></head><body><h2>{e(title)}</h2>"
    ]
    for n in notes or []:
        parts.append(f"<p><i>{e(n)}</i></p>")
    for it in items:
        parts.append("<div class='item'>")
        parts.append(f"<img src='{_data_uri(it['image'])}' alt='{e(str(it['id']))}'>")
        parts.append(f"<div class='id'>id {e(str(it['id']))}</div>")
        if it.get("question"):
            parts.append(f"<div class='q'>Q: {e(it['question'])}</div>")
        parts.append(f"<div class='pred'>{e(it.get('prediction', ''))}</div>")
        refs = it.get("references") or []
        parts.append("<ul class='refs'>" + "".join(f"<li>{e(r)}</li>" for r in refs[:10]) + "</ul>")
        for label, fig in it.get("figures", []):
            parts.append(
                f"<div class='fig'><div class='id'>{e(label)}</div><img src='{_data_uri(fig, 'PNG')}'></div>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
