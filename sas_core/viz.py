"""Small visualisation helpers: the ScanNet-20 label palette, top-down images, PNG writing.

No matplotlib needed for the images themselves (pure NumPy); PNGs are written with Pillow
(or matplotlib as a fallback), atomically.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from sas_core.types import IGNORE_LABEL

# OpenScene's SCANNET_COLOR_MAP_20 (keyed by ScanNet/NYU40 ids 1..39), in SCANNET_20 order.
SCANNET_20_COLORS = np.array([
    (174, 199, 232), (152, 223, 138), (31, 119, 180), (255, 187, 120), (188, 189, 34), (140, 86, 75),
    (255, 152, 150), (214, 39, 40), (197, 176, 213), (148, 103, 189), (196, 156, 148), (23, 190, 207),
    (247, 182, 210), (219, 219, 141), (255, 127, 14), (158, 218, 229), (44, 160, 44), (112, 128, 144),
    (227, 119, 194), (82, 84, 163),
], dtype=np.uint8)
"""(20, 3) uint8 colour of each SCANNET_20 class."""
IGNORE_COLOR = np.array((128, 128, 128), dtype=np.uint8)
"""Colour of label 255 (ignored / unlabelled)."""


def label_palette(n_classes: int = 20, seed: int = 0) -> np.ndarray:
    """(256, 3) uint8 lookup table: ScanNet-20 colours first, then deterministic random colours;
    entry 255 is grey."""
    table = np.random.default_rng(seed).integers(40, 236, size=(256, 3)).astype(np.uint8)
    table[: len(SCANNET_20_COLORS)] = SCANNET_20_COLORS
    table[IGNORE_LABEL] = IGNORE_COLOR
    return table


def label_colors(labels) -> np.ndarray:
    """(N,) integer labels -> (N, 3) uint8 colours (255 and out-of-range labels grey).

    THE label palette of every PLY, image and marker we write: :func:`label_palette`."""
    labels = np.asarray(labels).astype(np.int64)
    table = label_palette()
    out = np.empty(labels.shape + (3,), np.uint8)
    ok = (labels >= 0) & (labels < 256)
    out[ok] = table[labels[ok]]
    out[~ok] = IGNORE_COLOR
    return out


def relevance_colors(relevance, cmap: str = "turbo") -> np.ndarray:
    """(N,) relevance scores -> (N, 3) uint8 colours of a matplotlib colormap, stretched between
    the 1st and 99th percentiles (so a few outliers do not wash out the map)."""
    from matplotlib import colormaps

    if cmap not in colormaps:
        raise ValueError(f"unknown colormap {cmap!r}")
    rel = np.asarray(relevance, dtype=np.float64).reshape(-1)
    lo, hi = np.percentile(rel, [1, 99]) if len(rel) else (0.0, 1.0)
    x = np.clip((rel - lo) / max(hi - lo, 1e-9), 0, 1)
    return (colormaps[cmap](x)[:, :3] * 255).astype(np.uint8)


def topdown_image(positions, colors=None, labels=None, resolution: float = 0.02, *,
                  max_height: Optional[float] = None, background=(255, 255, 255),
                  bounds: Optional[np.ndarray] = None, point_size: int = 1) -> np.ndarray:
    """Orthographic top-down view of a point cloud, the highest point per pixel wins.

    Args:
        positions: (N, 3) metres, z up.
        colors: (N, 3) float in [0, 1] or uint8; used when ``labels`` is None.
        labels: (N,) class ids, drawn with :func:`label_colors`.
        resolution: metres per pixel.
        max_height: drop points above this z (e.g. the ceiling), None keeps all.
        bounds: optional (2, 2) [[xmin, ymin], [xmax, ymax]] of the image.
        point_size: each point paints a square of this many pixels (fills gaps of sparse clouds).

    Returns:
        (H, W, 3) uint8 image, row 0 at the largest y (north up), column 0 at the smallest x.
    """
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if labels is not None:
        rgb = label_colors(labels)
    elif colors is not None:
        colors = np.asarray(colors)
        rgb = colors if colors.dtype == np.uint8 else np.clip(np.round(colors * 255), 0, 255).astype(np.uint8)
    else:
        rgb = np.full((len(positions), 3), 60, np.uint8)
    if len(rgb) != len(positions):
        raise ValueError(f"{len(rgb)} colours/labels for {len(positions)} points")
    keep = np.all(np.isfinite(positions), axis=1)
    if max_height is not None:
        keep &= positions[:, 2] <= max_height
    positions, rgb = positions[keep], rgb[keep]
    if bounds is None:
        if len(positions) == 0:
            raise ValueError("topdown_image: no points to draw")
        lo, hi = positions[:, :2].min(axis=0), positions[:, :2].max(axis=0)
    else:
        lo, hi = np.asarray(bounds, dtype=np.float64)
    W = int(np.floor((hi[0] - lo[0]) / resolution)) + 1
    H = int(np.floor((hi[1] - lo[1]) / resolution)) + 1
    image = np.empty((H, W, 3), np.uint8)
    image[:] = np.asarray(background, np.uint8)
    col = np.floor((positions[:, 0] - lo[0]) / resolution).astype(np.int64)
    row = H - 1 - np.floor((positions[:, 1] - lo[1]) / resolution).astype(np.int64)
    inside = (col >= 0) & (col < W) & (row >= 0) & (row < H)
    col, row, z, rgb = col[inside], row[inside], positions[inside, 2], rgb[inside]
    if point_size > 1:
        offsets = np.arange(point_size) - (point_size - 1) // 2
        dr, dc = (a.reshape(-1) for a in np.meshgrid(offsets, offsets, indexing="ij"))
        row = (row[None, :] + dr[:, None]).reshape(-1)
        col = (col[None, :] + dc[:, None]).reshape(-1)
        z, rgb = np.tile(z, len(dr)), np.tile(rgb, (len(dr), 1))
        inside = (col >= 0) & (col < W) & (row >= 0) & (row < H)
        col, row, z, rgb = col[inside], row[inside], z[inside], rgb[inside]
    # z-buffer: sort by height, the last write per pixel (the highest point) wins
    order = np.argsort(z, kind="stable")
    image[row[order], col[order]] = rgb[order]
    return image


def with_legend(image: np.ndarray, labels, class_names, title: Optional[str] = None) -> np.ndarray:
    """``image`` with a legend strip on its right: a swatch of :func:`label_colors` and the name of
    each label in ``labels`` that occurs (sorted; 255 = "ignored"). Drawn with Pillow's default
    font, so no matplotlib is needed. Returns a new (H', W + legend, 3) uint8 image."""
    from PIL import Image, ImageDraw, ImageFont

    present = sorted({int(v) for v in np.unique(np.asarray(labels)) if 0 <= int(v) < 256})
    names = [("ignored" if v == IGNORE_LABEL else (class_names[v] if v < len(class_names) else str(v)))
             for v in present]
    font = ImageFont.load_default()
    row = 14
    top = row + 6 if title else 4
    width = 28 + max((int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font)) for n in
                      names + ([title] if title else [])), default=0) + 8
    height = max(image.shape[0], top + row * len(present) + 4)
    canvas = Image.new("RGB", (image.shape[1] + width, height), (255, 255, 255))
    canvas.paste(Image.fromarray(np.asarray(image, np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = image.shape[1] + 6
    if title:
        draw.text((x0, 3), title, fill=(0, 0, 0), font=font)
    colors = label_colors(np.array(present, dtype=np.int64)) if present else np.zeros((0, 3), np.uint8)
    for i, (name, color) in enumerate(zip(names, colors)):
        y = top + i * row
        draw.rectangle([x0, y + 1, x0 + 14, y + 11], fill=tuple(int(c) for c in color), outline=(0, 0, 0))
        draw.text((x0 + 20, y), name, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def save_png(path, image: np.ndarray) -> None:
    """Write an (H, W, 3) or (H, W) uint8 image as PNG, atomically."""
    from sas_core.io import atomic_path

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"save_png expects an (H,W[,3]) uint8 image, got {image.dtype} {image.shape}")
    with atomic_path(path, suffix=".png") as tmp:
        try:
            from PIL import Image

            Image.fromarray(image).save(tmp, format="PNG")
        except ImportError:  # pragma: no cover - Pillow comes with torchvision/matplotlib
            import matplotlib.image

            matplotlib.image.imsave(tmp, image)
