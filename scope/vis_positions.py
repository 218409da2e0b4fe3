"""Which M-RoPE positions the tokens a pruned Qwen2-VL / Qwen2.5-VL model keeps carry (notebook 08).

:func:`kept_positions` runs one image through a patched model and tabulates every token of the prompt: its
3-D position (t, h, w) in the unpruned sequence (transformers' ``get_rope_index``), whether the patch kept it,
and the position the language model actually received for it (read by a hook on the language model's
input). :func:`plot_kept_positions` draws the table: the kept cells of the merged-token grid, and the three
position components along the sequence. Nothing here depends on trained weights; it shows mechanics.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from scope.report import check_columns

__all__ = ["kept_positions", "plot_kept_positions"]

AXES = ("t", "h", "w")


@torch.no_grad()
def kept_positions(model: Any, processor: Any, image: Any, question: str = "what is this ?") -> pd.DataFrame:
    """One row per token of a one-image prompt through ``model`` (a ``scope.patch``-ed Qwen-VL model).

    Columns: ``index`` (place in the unpruned sequence), ``kind`` ("text" / "visual"), ``row``, ``col``
    (the visual token's cell of the merged grid, -1 for text), ``t``, ``h``, ``w`` (its M-RoPE position in
    the unpruned sequence), ``kept`` (text is always kept) and ``llm_t``, ``llm_h``, ``llm_w`` (the position
    the language model received for it; NaN where pruned).
    """
    from scope.protocol import build_prompt

    state = model.__dict__.get("_scope")
    if state is None:
        raise ValueError("model is not patched; call scope.patch(model, method, budget) first")
    inputs = processor(images=[image], text=[build_prompt(processor, question, 1)], return_tensors="pt")
    ids = inputs["input_ids"]
    pos = model.model.get_rope_index(
        ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )[0][:, 0]  # [3, L]
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs):
        seen.setdefault("pos", kwargs["position_ids"][-3:, 0])  # [3, L'] (generate adds a text row in front)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    visual = (ids[0] == model.config.image_token_id).nonzero()[:, 0]
    kept_cells = state.last["indices"][0].cpu()
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[visual] = False
    keep[visual[kept_cells]] = True
    new_index = keep.long().cumsum(0) - 1  # where each kept token sits in the shortened sequence
    _, gh, gw = (int(x) for x in inputs["image_grid_thw"][0])
    cols = processor.image_processor.merge_size
    cell = torch.full((ids.shape[1],), -1)
    cell[visual] = torch.arange(len(visual))
    received = seen["pos"].cpu()[:, new_index].double()
    received[:, ~keep] = float("nan")
    df = pd.DataFrame(
        {
            "index": np.arange(ids.shape[1]),
            "kind": np.where(cell >= 0, "visual", "text"),
            "row": np.where(cell >= 0, cell // (gw // cols), -1),
            "col": np.where(cell >= 0, cell % (gw // cols), -1),
            **{a: pos[i].numpy() for i, a in enumerate(AXES)},
            "kept": keep.numpy(),
            **{f"llm_{a}": received[i].numpy() for i, a in enumerate(AXES)},
        }
    )
    df.attrs["grid"] = (gh // cols, gw // cols)
    return df


def plot_kept_positions(df: pd.DataFrame, axes=None, title: str | None = None):
    """Left: the merged-token grid, kept cells filled, each labelled with its (h, w) position offset from
    the image's start; right: the t, h and w position of every token along the unpruned sequence (lines),
    and the positions the language model received for the kept tokens (markers). Returns the two axes."""
    check_columns(df, ["index", "kind", "row", "col", *AXES, "kept", *(f"llm_{a}" for a in AXES)], "df")
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    vis = df[df.kind == "visual"]
    rows, cols = df.attrs.get("grid") or (int(vis.row.max()) + 1, int(vis.col.max()) + 1)
    grid = np.zeros((rows, cols))
    grid[vis.row[vis.kept], vis.col[vis.kept]] = 1
    ax = axes[0]
    ax.imshow(grid, cmap="Blues", vmin=0, vmax=1.6)
    start = int(vis.t.min())
    for r in vis.itertuples():
        if r.kept:
            ax.text(r.col, r.row, f"{r.h - start},{r.w - start}", ha="center", va="center", fontsize=6)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"kept {int(vis.kept.sum())} of {len(vis)} merged tokens (h, w offsets)")
    ax = axes[1]
    colors = dict(zip(AXES, ("#0072B2", "#D55E00", "#009E73")))
    for a in AXES:
        ax.plot(df["index"], df[a], color=colors[a], lw=1, alpha=0.45, label=f"{a}: unpruned")
        ax.plot(df["index"], df[f"llm_{a}"], ls="none", marker="o", ms=3, color=colors[a], label=f"{a}: kept")
    ax.axvspan(vis["index"].min() - 0.5, vis["index"].max() + 0.5, color="0.9", zorder=0)
    ax.set_xlabel("place in the unpruned sequence (shaded: the image)")
    ax.set_ylabel("M-RoPE position")
    ax.legend(ncol=3, fontsize=7, loc="upper left")
    ax.set_title(title or "positions: unpruned sequence vs what the language model receives")
    return axes
