"""Training scenes as the tower sees them: CLIP-normalised pixels, per-patch labels and CLS targets.

Stage 1 trains on these labels (``scope.mini.tower``); stage 2 reads the patch owners from them to place its
attention targets on the image tokens (``scope.mini.targets``).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from scope.mini.model import IMAGE_SIZE, N_PATCHES, PATCH_SIZE
from scope.mini.scenes import COLORS, DIGITS, RENDER_SIZE, SHAPES, Scene, glyph_box, make_scene, render

VAL_SEED_BASE = 900_000_000  # validation scenes for the training curve; the test split is never trained on
GRID = IMAGE_SIZE // PATCH_SIZE
C_LIST, S_LIST = list(COLORS), list(SHAPES)
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def pixels(images) -> torch.Tensor:
    """CLIP normalisation of 192 px PIL images (what CLIPImageProcessorPil does at this size)."""
    arr = np.stack([np.asarray(im, np.float32) / 255.0 for im in images])
    return torch.from_numpy(((arr - MEAN) / STD).transpose(0, 3, 1, 2).copy())


def patch_labels(scene: Scene, ids: np.ndarray, box: tuple[int, int, int] | None = None) -> np.ndarray:
    """[9, 576] per-patch targets: colour, shape, size, glyph, centre class (0 = background / none), the
    owner (1 + index of the object under the patch, 0 = background; used by stage 2, not a tower target),
    the grid row and column of the owner's centre (1 + row / col, 0 = background, clamped to the grid), so
    that every patch of an object knows where the object is (what spatial questions ask), and the ink
    (1 + digit on patches the digit's bounding box covers by >= 25%, else 0: the patches that see it).

    ``ids`` is the render-resolution object-id map; ``box=(x0, y0, size)`` labels the crop of that map the
    model sees instead of the whole scene (a LLaVA-NeXT-style full-resolution crop).
    """
    x0, y0, size = box or (0, 0, RENDER_SIZE)
    cell = size // GRID
    ids = ids[y0 : y0 + size, x0 : x0 + size]
    n_obj = len(scene.objects)
    blocks = ids.reshape(GRID, cell, GRID, cell).transpose(0, 2, 1, 3).reshape(N_PATCHES, -1)
    hist = np.stack([(blocks == k).mean(1) for k in range(n_obj + 1)], 1)  # [576, n_obj+1]
    owner = hist[:, 1:].argmax(1) + 1
    owner[hist[:, 1:].max(1) < 0.2] = 0  # a patch belongs to an object covering >= 20% of it
    out = np.zeros((9, N_PATCHES), np.int64)
    out[5] = owner
    for k, o in enumerate(scene.objects, start=1):
        row, col = int((o.y - y0) // cell), int((o.x - x0) // cell)
        inside = 0 <= row < GRID and 0 <= col < GRID
        if inside:
            owner[row * GRID + col] = k
        m = owner == k
        out[0, m] = 1 + C_LIST.index(o.color)
        out[1, m] = 1 + S_LIST.index(o.shape)
        out[2, m] = 2 if o.large else 1
        out[3, m] = 1 + DIGITS.index(o.glyph) if o.glyph else 0
        if inside:
            out[4, row * GRID + col] = 1 + S_LIST.index(o.shape) * len(C_LIST) + C_LIST.index(o.color)
        out[6, m], out[7, m] = 1 + min(max(row, 0), GRID - 1), 1 + min(max(col, 0), GRID - 1)
        if o.glyph:
            out[8, _ink_cover(o, x0, y0, cell) >= 0.25] = 1 + DIGITS.index(o.glyph)
    return out


def _ink_cover(o, x0: int, y0: int, cell: int) -> np.ndarray:
    """[576] share of each patch (of the view whose corner is at ``x0, y0``) covered by the digit's box."""
    gx0, gy0, gx1, gy1 = glyph_box(o)
    edges = np.arange(GRID) * cell
    cover_x = np.clip(np.minimum(edges + cell, gx1 - x0) - np.maximum(edges, gx0 - x0), 0, None)
    cover_y = np.clip(np.minimum(edges + cell, gy1 - y0) - np.maximum(edges, gy0 - y0), 0, None)
    return (cover_y[:, None] * cover_x[None, :]).reshape(-1) / cell**2


def cls_targets(scene: Scene) -> np.ndarray:
    """[24 presence + 4 shape counts + 6 colour counts] for the CLS objective."""
    pres = np.zeros(len(C_LIST) * len(S_LIST), np.float32)
    for o in scene.objects:
        pres[S_LIST.index(o.shape) * len(C_LIST) + C_LIST.index(o.color)] = 1
    sc = [sum(o.shape == s for o in scene.objects) for s in S_LIST]
    cc = [sum(o.color == c for o in scene.objects) for c in C_LIST]
    return np.concatenate([pres, np.array(sc + cc, np.float32)])


def window_targets(dense: torch.Tensor, window: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense labels inside a window and the CLS targets recomputed for what the window shows."""
    r, c, w = window
    k = dense.shape[1]
    d = dense.view(len(dense), k, GRID, GRID)[:, :, r : r + w, c : c + w].reshape(len(dense), k, -1)
    nc, ns = len(C_LIST), len(S_LIST)
    combo = torch.where(d[:, 0] > 0, (d[:, 1] - 1) * nc + (d[:, 0] - 1), -1)  # shape-major like cls_targets
    pres = torch.zeros(len(d), nc * ns)
    for b in range(len(d)):
        pres[b, combo[b][combo[b] >= 0].unique()] = 1
    centre = d[:, 4]  # 1 + shape * nc + colour at an object's centre patch
    shape_of, color_of = (centre - 1) // nc, (centre - 1) % nc
    valid = centre > 0
    sc = torch.stack([((shape_of == k) & valid).sum(1) for k in range(ns)], 1)
    cc = torch.stack([((color_of == k) & valid).sum(1) for k in range(nc)], 1)
    return d, torch.cat([pres, sc.float(), cc.float()], 1)


def scene_batch(seeds, zoom: float = 0.0, rng: np.random.Generator | None = None):
    """Scenes, CLIP-normalised 192 px pixels, dense labels [B, 8, 576] and CLS targets [B, 34].

    With ``zoom`` > 0 each image is, with that probability, a random full-resolution 192 px crop of the
    384 px render instead of the whole downsampled scene (what LLaVA-NeXT's grid crops look like), so the
    tower also learns objects at twice the scale; the CLS targets then describe what the crop shows.
    """
    scenes = [make_scene(int(s)) for s in seeds]
    rendered = [render(sc, RENDER_SIZE, with_ids=True) for sc in scenes]
    images, dense, cls = [], [], []
    for sc, (im, ids) in zip(scenes, rendered):
        if zoom and rng is not None and rng.random() < zoom:
            x0, y0 = (int(v) for v in rng.integers(0, RENDER_SIZE - IMAGE_SIZE + 1, size=2))
            images.append(im.crop((x0, y0, x0 + IMAGE_SIZE, y0 + IMAGE_SIZE)))
            d = patch_labels(sc, ids, (x0, y0, IMAGE_SIZE))
            cls.append(window_targets(torch.from_numpy(d)[None], (0, 0, GRID))[1][0].numpy())
        else:
            images.append(im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS))
            d = patch_labels(sc, ids)
            cls.append(cls_targets(sc))
        dense.append(d)
    return scenes, pixels(images), torch.from_numpy(np.stack(dense)), torch.from_numpy(np.stack(cls))
