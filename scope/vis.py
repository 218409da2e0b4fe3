"""Pictures for the notebooks: kept tokens over an image, coverage and attention-skew curves, accuracy vs
budget (figures only the results notebooks draw, bars per column, the alpha ablation and latency, are in
:mod:`scope.vis_results`, built from the helpers here).

This module only draws; tables (reading runs, the paper's layout, Markdown, saving) are :mod:`scope.report`'s.
Every figure goes through :func:`save_figure` (PNG for the README, PDF for print), which stamps it with a
``source`` line (which model, which data, how many samples) so a picture lifted out of the repo still says
what made it, and writes it where :func:`scope.report.save_table` writes tables. Colours and markers come
from the method registry (:mod:`scope.methods`, seaborn's colour-blind-safe palette), so a method is the
same colour in every figure; labels are :func:`scope.report.method_label`.

Figures a reader can trust: every shaded band and error bar says in the legend what it is (e.g. "95%
bootstrap CI"); legends sit beside or below the axes, not on the data; curves that would hide each other
are shifted apart by a small x offset; and in-LLM methods (FastV, PDrop), which keep every visual token for
their first layers, are drawn at the visual tokens an LLM layer sees on average (``equivalent_tokens``),
not at their nominal budget (:func:`plotted_tokens`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import to_rgb
from matplotlib.patches import Patch, Rectangle

from scope import lock
from scope.methods import IN_LLM, METHODS, PALETTE, find_method
from scope.report import check_columns, check_name, method_label, output_dir


def set_style(context: str = "notebook") -> None:
    """Seaborn theme used by every figure: white grid, colour-blind palette, fonts readable in print."""
    sns.set_theme(context=context, style="whitegrid", palette="colorblind", font_scale=1.0)
    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 200,
            "savefig.bbox": "tight",
            "axes.titleweight": "bold",
            "legend.frameon": True,
            "pdf.fonttype": 42,  # embed TrueType so PDF text stays editable/searchable
        }
    )


def method_colors(methods: Iterable[str] | None = None) -> dict[str, tuple[float, float, float]]:
    """A colour per method, stable across figures (the registry's); unregistered names take spare colours."""
    methods = list(METHODS) if methods is None else list(methods)
    used = {METHODS[m].color for m in METHODS if METHODS[m].color}
    spare = iter([c for c in PALETTE if c not in used] + list(PALETTE))
    colors: dict[str, tuple[float, float, float]] = {}
    for m in methods:
        record = find_method(m)
        color = record.color if record is not None and record.color else next(spare)
        colors[m] = tuple(float(v) for v in to_rgb(color))
    return colors


def method_markers(methods: Iterable[str]) -> dict[str, str]:
    """A marker per method (shape as well as colour, so curves stay apart in grey-scale print)."""
    methods = list(methods)
    records = {m: find_method(m) for m in methods}
    used = {r.marker for r in records.values() if r is not None}
    spare = iter([m for m in "hpd8H*o" if m not in used])
    return {m: r.marker if r is not None else next(spare, "o") for m, r in records.items()}


def token_grid(n_tokens: int) -> tuple[int, int]:
    """(rows, cols) of a square token grid with ``n_tokens`` cells (576 -> (24, 24))."""
    side = math.isqrt(int(n_tokens))
    if side * side != n_tokens or n_tokens <= 0:
        raise ValueError(f"n_tokens={n_tokens} is not a square number; pass grid=(rows, cols)")
    return side, side


def _as_grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(grid, int):
        return token_grid(grid)
    rows, cols = grid
    if rows <= 0 or cols <= 0:
        raise ValueError(f"grid={grid} must have positive rows and cols")
    return int(rows), int(cols)


def _as_index_array(kept, n_cells: int) -> np.ndarray:
    kept = np.asarray(kept.cpu() if hasattr(kept, "cpu") else kept).reshape(-1).astype(np.int64)
    if kept.size and (kept.min() < 0 or kept.max() >= n_cells):
        raise ValueError(f"kept indices must lie in [0, {n_cells}); got min {kept.min()}, max {kept.max()}")
    return kept


def _image_under_values(ax: plt.Axes, image, values, grid) -> tuple[np.ndarray, tuple[int, int]]:
    """Draw ``image`` on ``ax`` and return ``values`` as a (rows, cols) grid to lay over it, with the
    image's (H, W); a value count that does not fill the grid is refused."""
    rows, cols = _as_grid(grid)
    values = np.asarray(values.cpu() if hasattr(values, "cpu") else values, dtype=np.float64).reshape(-1)
    if values.size != rows * cols:
        raise ValueError(f"values has {values.size} entries, grid {rows}x{cols} needs {rows * cols}")
    arr = _as_image_array(image)
    h, w = arr.shape[:2]
    ax.imshow(arr, extent=(0, w, h, 0))
    return values.reshape(rows, cols), (h, w)


def _as_image_array(image) -> np.ndarray:
    """PIL image / HxW(x3) array / CxHxW tensor -> float HxWx3 array in [0, 1]."""
    if hasattr(image, "convert"):  # PIL
        arr = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    else:
        arr = np.asarray(image.cpu() if hasattr(image, "cpu") else image, dtype=np.float64)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)  # CHW -> HWC
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3:
            raise ValueError(f"image must be HxW, HxWxC or CxHxW; got shape {arr.shape}")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        if arr.max() > 1.0:
            arr = arr / 255.0
    return np.clip(arr[..., :3], 0.0, 1.0)


def kept_mask(kept, grid: int | tuple[int, int]) -> np.ndarray:
    """Boolean (rows, cols) map of the kept tokens (raster order, as the vision tower lays them out)."""
    rows, cols = _as_grid(grid)
    mask = np.zeros(rows * cols, dtype=bool)
    mask[_as_index_array(kept, rows * cols)] = True
    return mask.reshape(rows, cols)


def _cell_map(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a (rows, cols) map to an (H, W) image (cells may be uneven)."""
    rows, cols = values.shape
    h, w = shape
    r = np.minimum(np.arange(h) * rows // h, rows - 1)
    c = np.minimum(np.arange(w) * cols // w, cols - 1)
    return values[r][:, c]


def dim_dropped(image, kept, grid: int | tuple[int, int], dim: float = 0.3) -> np.ndarray:
    """The image with the pixels of dropped tokens scaled by ``dim``; kept tokens' pixels are unchanged."""
    if not 0.0 <= dim <= 1.0:
        raise ValueError(f"dim={dim} must lie in [0, 1]")
    arr = _as_image_array(image)
    keep = _cell_map(kept_mask(kept, grid), arr.shape[:2])
    return np.where(keep[..., None], arr, arr * dim)


def _bare_axes(ax, title: str | None = None):
    """An image axis without ticks or grid, titled when ``title`` is given."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if title:
        ax.set_title(title)
    return ax


def draw_kept_tokens(
    image,
    kept,
    grid: int | tuple[int, int],
    ax: plt.Axes | None = None,
    title: str | None = None,
    color=None,
    dim: float = 0.3,
) -> plt.Axes:
    """Draw ``image`` with dropped tokens darkened and kept tokens outlined (Fig. 1a / 5 of the paper).

    ``kept`` are token indices in raster order of a ``grid`` (int N for a square grid, or (rows, cols)).
    """
    ax = ax or plt.gca()
    arr = dim_dropped(image, kept, grid, dim)
    h, w = arr.shape[:2]
    rows, cols = _as_grid(grid)
    ax.imshow(arr, extent=(0, w, h, 0), interpolation="nearest")
    edge = color if color is not None else "white"
    for idx in _as_index_array(kept, rows * cols):
        r, c = divmod(int(idx), cols)
        ax.add_patch(
            Rectangle(
                (c * w / cols, r * h / rows), w / cols, h / rows, fill=False, lw=0.6, ec=edge, alpha=0.9
            )
        )
    return _bare_axes(ax, title)


def draw_token_map(
    image,
    values,
    grid: int | tuple[int, int],
    ax: plt.Axes | None = None,
    title: str | None = None,
    cmap: str = "magma",
    alpha: float = 0.65,
    label: str | None = None,
    gamma: float = 1.0,
) -> plt.Axes:
    """Overlay a per-token value map (e.g. CLS attention) on ``image``, with a colour bar labelled ``label``.

    ``gamma`` < 1 stretches small values (a power-law colour scale), useful for very skewed maps.
    """
    from matplotlib.colors import PowerNorm

    ax = ax or plt.gca()
    values, (h, w) = _image_under_values(ax, image, values, grid)
    norm = PowerNorm(gamma, vmin=0.0, vmax=float(values.max())) if gamma != 1.0 else None
    im = ax.imshow(values, extent=(0, w, h, 0), cmap=cmap, alpha=alpha, norm=norm)
    cbar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    if label:
        cbar.set_label(label)
    return _bare_axes(ax, title)


def plot_kept_tokens(
    image,
    selections: Mapping[str, object],
    grid: int | tuple[int, int],
    ncols: int | None = None,
    panel_size: float = 2.8,
    show_original: bool = True,
    titles: Mapping[str, str] | None = None,
) -> plt.Figure:
    """One panel per method (plus the original image): the tokens each method keeps on the same image."""
    if not selections:
        raise ValueError("selections is empty; pass {method: kept_indices}")
    n = len(selections) + int(show_original)
    ncols = ncols or min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows + 0.3), squeeze=False
    )
    flat = list(axes.ravel())
    if show_original:
        ax = flat.pop(0)
        ax.imshow(_as_image_array(image))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        ax.set_title("Input image")
    colors = method_colors(selections)
    for ax, (method, kept) in zip(flat, selections.items()):
        n_kept = len(_as_index_array(kept, _as_grid(grid)[0] * _as_grid(grid)[1]))
        title = (titles or {}).get(method, f"{method_label(method)} ({n_kept} tokens)")
        draw_kept_tokens(image, kept, grid, ax=ax, title=title, color=colors[method])
    for ax in flat[len(selections) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def method_order(methods: Iterable[str]) -> list[str]:
    """``methods`` without repeats, registered ones first in registry order (the order of every legend)."""
    return _method_order(methods)


def _method_order(methods: Iterable[str]) -> list[str]:
    methods = list(dict.fromkeys(methods))
    known = [m for m in METHODS if m in methods]
    return known + [m for m in methods if m not in known]


def plot_theta_coverage(
    data: pd.DataFrame, ax: plt.Axes | None = None, title: str | None = None, jitter: float = 0.003
) -> plt.Axes:
    """theta-coverage vs theta, one curve per method (Fig. 2 of the paper).

    ``data`` has columns ``method``, ``theta`` and ``coverage`` (a fraction in [0, 1]); several rows per
    (method, theta) -- one per image -- are averaged, with a 95% bootstrap band. Curve i of n is shifted by
    ``jitter`` x (i - (n-1)/2) in theta, so that curves that coincide (several methods at 100%) stay visible.
    """
    check_columns(data, ["method", "theta", "coverage"])
    ax = ax or plt.gca()
    df = data.assign(coverage_pct=100.0 * data["coverage"], label=data["method"].map(method_label))
    order = _method_order(df["method"])
    shift = dict(zip(order, curve_offsets(len(order), jitter)))
    df["theta"] = df["theta"] + df["method"].map(shift)
    colors = method_colors(order)
    markers = method_markers(order)
    sns.lineplot(
        data=df,
        x="theta",
        y="coverage_pct",
        hue="label",
        hue_order=[method_label(m) for m in order],
        palette={method_label(m): colors[m] for m in order},
        style="label",
        markers={method_label(m): markers[m] for m in order},
        dashes=False,
        errorbar=("ci", 95),
        n_boot=200,
        seed=0,
        ax=ax,
    )
    ax.set_xlabel(r"$\theta$ (cosine-similarity threshold)")
    ax.set_ylabel(r"$\theta$-coverage (% of all tokens)")
    ax.set_ylim(-2, 102)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Patch(color="0.5", alpha=0.25, lw=0))
    labels.append("band: 95% bootstrap CI over images")
    ax.legend(handles, labels, title="Method", **LEGEND_RIGHT)
    if title:
        ax.set_title(title)
    return ax


def plot_attention_skew(
    sorted_attention,
    ax: plt.Axes | None = None,
    top: int = 128,
    title: str | None = None,
    color=None,
) -> plt.Axes:
    """Mean CLS attention of the top-``top`` tokens by rank, with a band of +-1 std over images (Fig. 1b).

    ``sorted_attention`` is [images, tokens], each row sorted in descending order. Values are plotted as a
    percentage of the image's total CLS attention, so images and models compare on one scale.
    """
    att = np.asarray(
        sorted_attention.cpu() if hasattr(sorted_attention, "cpu") else sorted_attention, dtype=np.float64
    )
    if att.ndim == 1:
        att = att[None]
    if att.ndim != 2 or att.shape[1] == 0:
        raise ValueError(f"sorted_attention must be [images, tokens]; got shape {att.shape}")
    if np.any(np.diff(att, axis=1) > 1e-9):
        raise ValueError("sorted_attention rows must be sorted in descending order")
    share = 100.0 * att / att.sum(axis=1, keepdims=True)
    share = share[:, : min(top, share.shape[1])]
    mean, std = share.mean(0), share.std(0)
    rank = np.arange(1, share.shape[1] + 1)
    ax = ax or plt.gca()
    color = color if color is not None else "0.25"
    ax.plot(rank, mean, color=color, lw=2, label=f"mean over {att.shape[0]} images")
    ax.fill_between(rank, np.maximum(mean - std, 0), mean + std, color=color, alpha=0.25, label="±1 std")
    ax.axhline(100.0 / att.shape[1], color="0.3", ls="--", lw=1, label=f"uniform (1/{att.shape[1]})")
    ax.set_xlabel("Token rank by CLS attention")
    ax.set_ylabel("CLS attention (% of image total)")
    ax.set_xlim(1, share.shape[1])
    ax.legend(loc="upper right")  # the curve falls from the top left: the upper right is empty
    if title:
        ax.set_title(title)
    return ax


LEGEND_RIGHT = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8, "borderaxespad": 0.0}
CI_LABEL = "95% bootstrap CI"


def plotted_tokens(data: pd.DataFrame) -> pd.Series:
    """Where each row of ``data`` goes on a tokens axis: ``equivalent_tokens`` (visual tokens per LLM layer,
    averaged over the layers) for in-LLM methods, which keep every token for their first layers and so
    cost far more than their nominal budget; the ``budget`` (tokens entering the LLM) otherwise, and
    wherever ``equivalent_tokens`` is missing."""
    check_columns(data, ["method", "budget"])
    x = pd.to_numeric(data["budget"], errors="coerce").astype(float)
    if "equivalent_tokens" not in data.columns:
        return x
    records = [find_method(m) for m in data["method"]]
    in_llm = np.array([r is not None and r.stage == IN_LLM for r in records])
    eq = pd.to_numeric(data["equivalent_tokens"], errors="coerce").astype(float)
    return x.where(~(in_llm & eq.notna().to_numpy()), eq)


def log2_ticks(ax: plt.Axes, ticks, extend_to: float | None = None) -> None:
    """A log2 x axis ticked at ``ticks``, plus 2^k and 1.5 x 2^k between the largest tick and ``extend_to``
    (where in-LLM methods' layer averages lie); a single tick gets half an octave on each side (else the
    axis would shrink to the tiny offsets between curves)."""
    ticks = sorted(float(t) for t in ticks)
    if extend_to is not None and ticks and extend_to > ticks[-1]:
        grid = [f * 2**k for k in range(1, 16) for f in (1.0, 1.5)]
        ticks += sorted(t for t in grid if ticks[-1] < t <= extend_to * 1.01)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 2**0.5, ticks[0] * 2**0.5)


def curve_offsets(n: int, step: float) -> np.ndarray:
    """``n`` offsets ``step`` apart, centred on 0 (curve i of n is shifted by offsets[i])."""
    return step * (np.arange(n) - (n - 1) / 2)


def plot_budget_curves(
    data: pd.DataFrame,
    y: str = "score",
    ax: plt.Axes | None = None,
    reference: float | None = None,
    reference_label: str = "All tokens",
    ylabel: str = "Accuracy (%)",
    title: str | None = None,
    logx: bool = True,
    band_label: str = CI_LABEL,
    jitter: float = 0.04,
    legend: str | None = "right",
) -> plt.Axes:
    """Score vs visual tokens, one curve per method (Fig. 4 / Fig. 6 style).

    ``data`` has columns ``method``, ``budget`` and ``y``; ``equivalent_tokens`` places in-LLM methods at
    their layer-averaged tokens (:func:`plotted_tokens`; the x label then says so). Optional ``lo``/``hi``
    columns draw a band, named ``band_label`` in the legend (say what it is). ``reference`` draws the
    unpruned model as a dashed line. Curve i of n is shifted by ``jitter`` x (i - (n-1)/2) octaves (log x)
    or that fraction of the x range (linear), so that equal curves stay visible side by side. ``legend``:
    "right" (beside the axes), "below", or None (e.g. one :func:`figure_legend` for several panels).
    """
    check_columns(data, ["method", "budget", y])
    if legend not in ("right", "below", None):
        raise ValueError(f"legend={legend!r} must be 'right', 'below' or None")
    ax = ax or plt.gca()
    data = data.assign(_x=plotted_tokens(data).to_numpy())
    order = _method_order(data["method"])
    colors, markers = method_colors(order), method_markers(order)
    span = float(data["_x"].max() - data["_x"].min()) or 1.0
    banded = False
    for m, offset in zip(order, curve_offsets(len(order), jitter)):
        d = data[data["method"] == m].sort_values("_x")
        x = d["_x"] * 2.0**offset if logx else d["_x"] + offset * span
        ax.plot(x, d[y], marker=markers[m], color=colors[m], lw=2, ms=6, label=method_label(m))
        if {"lo", "hi"} <= set(d.columns) and d[["lo", "hi"]].notna().all().all():
            ax.fill_between(x, d["lo"], d["hi"], color=colors[m], alpha=0.12, lw=0)
            banded = True
    if reference is not None:
        ax.axhline(reference, color="black", ls="--", lw=1.2, label=reference_label)
    if logx:
        log2_ticks(ax, pd.to_numeric(data["budget"], errors="coerce").dropna().unique(), data["_x"].max())
    moved = (plotted_tokens(data) != pd.to_numeric(data["budget"], errors="coerce")).any()
    ax.set_xlabel(
        "Visual tokens per LLM layer (FastV, PDrop: layer average)"
        if moved
        else "Visual tokens kept (entering the LLM)"
    )
    ax.set_ylabel(ylabel)
    if banded:
        ax.fill_between([], [], [], color="0.5", alpha=0.25, lw=0, label=f"band: {band_label}")
    if legend == "right":
        ax.legend(**LEGEND_RIGHT)
    elif legend == "below":
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=4, fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def figure_legend(fig: plt.Figure, axes: Iterable[plt.Axes], ncol: int = 5) -> None:
    """One legend below all ``axes`` of ``fig`` with every distinct label of their artists (first one wins),
    for panels that share methods; call before :func:`save_figure`."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol,
               fontsize=8, frameon=False)  # fmt: skip


# ---------------------------------------------------------------------------------------------- saving


def save_figure(fig: plt.Figure, name: str, source: str, figures_dir=None) -> list[Path]:
    """Stamp ``source`` under the figure and write ``<figures_dir>/<name>.png`` and ``.pdf``.

    ``source`` says what produced the figure, e.g. "MiniLLaVA (data/minillava), SynthBench test, 200 images";
    the environment lock it was made under (:func:`scope.lock.label`) is added to it.
    """
    check_name(name)
    if not source:
        raise ValueError("source must say which model and data produced the figure")
    out = output_dir(figures_dir)
    # Put the source line just under everything already drawn (tick labels, legends below the axes).
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    x, y = box.x0 / fig.get_figwidth(), box.y0 / fig.get_figheight()
    source = f"{source}; environment: {lock.label()}"
    fig.text(x, y - 0.01, f"Source: {source}", ha="left", va="top", fontsize=7, color="0.35")
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        # Fixed metadata so re-running does not change the PDF/PNG bytes for nothing.
        meta = {"CreationDate": None} if p.suffix == ".pdf" else {"Software": None}
        fig.savefig(p, metadata=meta)
    return paths


# ------------------------------------------------------------------------ how a greedy picks (00b)


def mark_tokens(ax: plt.Axes, tokens, grid, shape: tuple[int, int], **style) -> None:
    """A marker at the centre of each token in ``tokens`` (raster indices of ``grid``) on an image axis of
    pixel ``shape`` (H, W); ``style`` goes to :meth:`matplotlib.axes.Axes.scatter`."""
    rows, cols = _as_grid(grid)
    r, c = np.divmod(_as_index_array(tokens, rows * cols), cols)
    h, w = shape
    ax.scatter((c + 0.5) * w / cols, (r + 0.5) * h / rows, **{"linewidths": 0.6, **style})


def draw_value_overlay(ax: plt.Axes, image, values, grid, cmap: str = "magma", vmin=0.0, vmax=1.0, alpha=0.8):
    """One value per token over ``image`` on a fixed colour scale and without a colour bar (for small
    multiples that share one). Returns the value layer (for a shared colour bar) and the image's (H, W)."""
    values, (h, w) = _image_under_values(ax, image, values, grid)
    layer = ax.imshow(values, extent=(0, w, h, 0), cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha)
    _bare_axes(ax)
    return layer, (h, w)


def _freeze_layout(fig: plt.Figure) -> plt.Figure:
    """Run the figure's constrained layout once and keep it: :func:`save_figure` places its source line under
    what is drawn, which a layout engine run again at saving time would move the axes away from."""
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    return fig


def plot_greedy_steps(
    image,
    grid,
    steps: Mapping[str, Mapping],
    ncols: int = 8,
    panel_size: float = 1.5,
    title: str | None = None,
) -> plt.Figure:
    """Small multiples of the first T picks of greedy selections, one column per step.

    ``steps`` maps a method name to ``{"picks": tokens in pick order, "cover": [T, N]}`` (each token's best
    similarity to the first t picks, after pick t) and, for the method whose scores are shown, ``"score":
    [T, N]`` (every token's score at step t, before pick t). Each step's column holds, per method, a score
    panel (scaled by the step's best score, the pick marked) when ``score`` is given, and a coverage panel
    with the kept tokens marked. Colours, markers and labels come from the registry; steps wrap after
    ``ncols`` columns; ``title`` goes above all panels.
    """
    if not steps:
        raise ValueError("steps is empty; pass {method: {'picks': ..., 'cover': ...}}")
    panels = [(m, key) for m, s in steps.items() for key in ("score", "cover") if key in s]
    n_steps = min(len(np.asarray(s["cover"])) for s in steps.values())
    for m, s in steps.items():
        if len(s["picks"]) < n_steps or ("score" in s and len(s["score"]) < n_steps):
            raise ValueError(f"steps[{m!r}] needs picks and scores for {n_steps} steps")
    colors, markers = method_colors(steps), method_markers(steps)
    ncols = min(ncols, n_steps)
    bands, per = math.ceil(n_steps / ncols), len(panels)
    fig, axes = plt.subplots(
        per * bands, ncols, figsize=(panel_size * ncols + 1.4, panel_size * per * bands + 0.4),
        squeeze=False, layout="constrained",
    )  # fmt: skip
    layers = {}
    for t in range(n_steps):
        for p, (m, key) in enumerate(panels):
            ax, picks = axes[per * (t // ncols) + p, t % ncols], np.asarray(steps[m]["picks"])
            kept = {"c": [colors[m]], "marker": markers[m], "ec": "white"}
            if key == "score":
                score = np.asarray(steps[m]["score"][t], dtype=np.float64)
                layers[key], shape = draw_value_overlay(
                    ax, image, np.clip(score / max(score.max(), 1e-30), 0, 1), grid, cmap="viridis"
                )
                mark_tokens(ax, picks[:t], grid, shape, s=8, c="white", marker="o")
                mark_tokens(ax, picks[t : t + 1], grid, shape, s=80, **kept, linewidths=1.2)
            else:
                layers[key], shape = draw_value_overlay(ax, image, steps[m]["cover"][t], grid)
                mark_tokens(ax, picks[: t + 1], grid, shape, s=16, **kept)
            if p == 0:
                ax.set_title(f"pick {t + 1}", fontsize=9)
            if t % ncols == 0:
                what = "score / best" if key == "score" else "coverage"
                ax.set_ylabel(f"{method_label(m)}\n{what}", fontsize=8)
    for t in range(n_steps, bands * ncols):
        for p in range(per):
            axes[per * (bands - 1) + p, t % ncols].axis("off")
    labels = {"score": "score / the step's best score", "cover": "coverage (max cos. sim. to a kept token)"}
    halves = np.array_split(np.arange(ncols), len(layers))  # colour bars side by side under the last row
    for (key, layer), cols in zip(layers.items(), halves):
        fig.colorbar(
            layer, ax=list(axes[-1, cols]), location="bottom", shrink=0.8, aspect=30, label=labels[key]
        )
    if title:
        fig.suptitle(title)
    return _freeze_layout(fig)


def plot_selection_contrast(
    image, grid, kept: Mapping[str, object], covers: Mapping[str, object],
    notes: Mapping[str, str] | None = None, groups: Mapping[str, object] | None = None,
    panel_size: float = 2.6, title: str | None = None,
) -> plt.Figure:  # fmt: skip
    """Methods side by side on one image: the kept tokens (top row) and the coverage they give (bottom row).

    ``kept``: method -> kept token indices; ``covers``: method -> each token's best similarity to a kept
    token; ``notes``: method -> a line added under the coverage panel's title (e.g. its theta-coverage);
    ``groups``: method -> one group id per token (NaN for tokens not merged), drawn as tinted groups over the
    kept tokens: VisionZip's contextual tokens, each group merged into one output token; ``title`` goes
    above all panels.
    """
    if set(kept) != set(covers) or not kept:
        raise ValueError(f"kept ({sorted(kept)}) and covers ({sorted(covers)}) must name the same methods")
    colors, markers = method_colors(kept), method_markers(kept)
    fig, axes = plt.subplots(
        2, len(kept), figsize=(panel_size * len(kept) + 1.0, 2 * panel_size + 0.6), squeeze=False,
        layout="constrained",
    )  # fmt: skip
    rows, cols = _as_grid(grid)
    for (top, bottom), m in zip(axes.T, kept):
        draw_kept_tokens(image, kept[m], grid, ax=top, title=f"{method_label(m)}: kept", color=colors[m])
        if groups is not None and m in groups:
            ids = np.asarray(groups[m], dtype=np.float64).reshape(rows, cols)
            h, w = _as_image_array(image).shape[:2]
            top.imshow(np.ma.masked_invalid(ids % 20), extent=(0, w, h, 0), cmap="tab20", vmin=0, vmax=19,
                       alpha=0.55, interpolation="nearest")  # fmt: skip
            top.set_title(f"{method_label(m)}: kept + merged")
        layer, shape = draw_value_overlay(bottom, image, covers[m], grid)
        mark_tokens(bottom, kept[m], grid, shape, s=14, c=[colors[m]], marker=markers[m], ec="white")
        bottom.set_title("coverage" + (f"\n{notes[m]}" if notes and m in notes else ""), fontsize=9)
    fig.colorbar(layer, ax=axes[1, -1], shrink=0.9, label="max cos. sim. to a kept token")
    if title:
        fig.suptitle(title)
    return _freeze_layout(fig)


def plot_coverage_per_image(
    data: pd.DataFrame, ax: plt.Axes | None = None, title: str | None = None, seed: int = 0
) -> plt.Axes:
    """One dot per image and method: the distribution behind a mean theta-coverage (one theta).

    ``data`` has columns ``method`` and ``coverage`` (a fraction in [0, 1]), one row per image; each method's
    mean is drawn as a black bar across its dots. The dots' sideways jitter is drawn with ``seed``, so a rerun
    draws the same figure.
    """
    check_columns(data, ["method", "coverage"])
    ax = ax or plt.gca()
    order = _method_order(data["method"])
    colors = method_colors(order)
    df = data.assign(pct=100.0 * data["coverage"], label=data["method"].map(method_label))
    labels = [method_label(m) for m in order]
    outside = np.random.get_state()  # seaborn jitters with numpy's global generator: seed it, then restore
    np.random.seed(seed)
    try:
        sns.stripplot(
            data=df, x="label", y="pct", hue="label", order=labels, hue_order=labels, legend=False, jitter=0.3,
            palette={method_label(m): colors[m] for m in order}, size=4, alpha=0.7, ax=ax,
        )  # fmt: skip
    finally:
        np.random.set_state(outside)
    means = df.groupby("label")["pct"].mean().reindex(labels)
    ax.scatter(range(len(labels)), means, marker="_", s=900, color="black", lw=2, zorder=5, label="mean")
    ax.set_xlabel("")
    if len(labels) > 3:
        ax.tick_params(axis="x", labelrotation=30)
    ax.set_ylabel(r"$\theta$-coverage (% of the image's tokens)")
    ax.set_ylim(-3, 103)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    return ax
