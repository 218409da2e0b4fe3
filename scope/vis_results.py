"""Figures that only the results notebooks draw: accuracy per benchmark column as grouped bars (04), the alpha
ablation (07), and measured latency with its spread (06).

Kept apart from :mod:`scope.vis` so that each file stays readable; they use its colours, markers, legend
placement and band labels, so a method looks the same here as in every other figure, and are saved with
:func:`scope.vis.save_figure`.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from scope.report import check_columns, method_label
from scope.vis import (
    CI_LABEL,
    LEGEND_RIGHT,
    curve_offsets,
    log2_ticks,
    method_colors,
    method_markers,
    method_order,
)

__all__ = ["plot_family_bars", "plot_alpha_and_combine", "plot_latency"]


def plot_family_bars(
    data: pd.DataFrame,
    hue: str = "label",
    ax: plt.Axes | None = None,
    title: str | None = None,
    colors: Mapping[str, object] | None = None,
    error_label: str = CI_LABEL,
    legend: str | None = "right",
) -> plt.Axes:
    """Accuracy per benchmark column as grouped bars, one bar per ``hue`` value (e.g. model or method).

    ``data`` has columns ``column``, ``value`` and ``hue`` (``results_long`` rows plus a label); optional
    ``lo``/``hi`` columns draw error bars, named ``error_label`` in the legend. Bars are in the row order of
    ``data``; ``colors`` maps hue values to colours (e.g. each method's registry colour), the colour-blind
    palette otherwise. ``legend``: "right" (beside the axes), "below" or None.
    """
    check_columns(data, ["column", "value", hue])
    ax = ax or plt.gca()
    columns, groups = list(dict.fromkeys(data["column"])), list(dict.fromkeys(data[hue]))
    width = 0.8 / len(groups)
    palette = dict(zip(groups, sns.color_palette("colorblind", len(groups))))
    palette.update(colors or {})
    with_errors = False
    for g, name in enumerate(groups):
        d = data[data[hue] == name].set_index("column").reindex(columns)
        x = np.arange(len(columns)) - 0.4 + width * (g + 0.5)
        err = None
        if {"lo", "hi"} <= set(d.columns) and d[["lo", "hi"]].notna().all().all():
            err = np.stack([d["value"] - d["lo"], d["hi"] - d["value"]])
            with_errors = True
        ax.bar(
            x,
            d["value"],
            width,
            yerr=err,
            color=palette[name],
            label=str(name),
            capsize=2,
            error_kw={"lw": 1},
        )
    ax.set_xticks(np.arange(len(columns)))
    ax.set_xticklabels(columns)
    ax.set_ylabel("Accuracy (%)")
    ax.set_ylim(0, 105)
    handles, labels = ax.get_legend_handles_labels()
    if with_errors:
        handles.append(plt.Line2D([], [], color="0.2", lw=1, marker="_", ms=8))
        labels.append(f"error bars: {error_label}")
    if legend == "right":
        ax.legend(handles, labels, **LEGEND_RIGHT)
    elif legend == "below":
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def plot_alpha_and_combine(
    alpha: pd.DataFrame,
    combine: pd.DataFrame,
    full: float,
    method: str,
    reference: tuple[str, float] | None = None,
    budget: int | None = None,
    band_label: str = CI_LABEL,
) -> plt.Figure:
    """The alpha ablation (Fig. 6): accuracy vs alpha with its interval band (left), and the two ways of
    combining coverage gain and saliency as bars with error bars (right), the unpruned model dashed on both.

    ``alpha``: columns ``alpha``, ``value``, ``lo``, ``hi`` (one row per alpha, in plotting order);
    ``combine``: ``label``, ``value``, ``lo``, ``hi``; ``full``: the unpruned accuracy; ``method``: the method
    swept (its colour and label); ``reference``: (method, accuracy) drawn dotted as the alpha -> infinity limit
    (saliency-only at the same budget); ``budget``: the tokens kept, for the titles; ``band_label``: what the
    band and the error bars are, for the legend.
    """
    check_columns(alpha, ["alpha", "value", "lo", "hi"], "alpha")
    check_columns(combine, ["label", "value", "lo", "hi"], "combine")
    tokens = f"{budget} tokens" if budget is not None else ""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    color = method_colors([method])[method]
    x = range(len(alpha))
    label = f"{method_label(method)} (gain × saliency^α)"
    axes[0].plot(x, alpha["value"], marker=method_markers([method])[method], color=color, lw=2, label=label)
    axes[0].fill_between(
        x, alpha["lo"], alpha["hi"], color=color, alpha=0.15, lw=0, label=f"band: {band_label}"
    )
    axes[0].set_xticks(list(x), [f"{a:g}" for a in alpha["alpha"]])
    axes[0].axhline(full, color="black", ls="--", lw=1.2, label="All tokens")
    if reference is not None:
        ref, value = reference
        ref_color = method_colors([ref])[ref]
        axes[0].axhline(value, color=ref_color, ls=":", lw=1.5, label=f"{method_label(ref)} (α → ∞)")
    axes[0].set_xlabel("α (exponent on saliency; 0 = coverage-only)")
    axes[0].set_ylabel("Accuracy (%)")
    axes[0].set_title("Sensitivity to α" + (f" at {tokens}" if tokens else ""))
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)
    err = [combine["value"] - combine["lo"], combine["hi"] - combine["value"]]
    axes[1].bar(combine["label"], combine["value"], yerr=err, color=color, alpha=0.8, capsize=4)
    axes[1].axhline(full, color="black", ls="--", lw=1.2)
    axes[1].set_ylabel("Accuracy (%)")
    axes[1].set_title(f"Combining the two scores (α = 1{', ' + tokens if tokens else ''})")
    axes[1].set_xlabel(f"error bars: {band_label}")
    fig.tight_layout()
    return fig


def plot_latency(lat: pd.DataFrame, spread_label: str = "fastest–slowest of the repeats") -> plt.Figure:
    """Measured prefill latency (left) and the selection's share of it (right), from
    :func:`scope.latency.latency_table`.

    Left: median prefill per method against the visual tokens an LLM layer sees on average (``visual_avg``;
    FastV and PDrop keep every token for their first layers), error bars from ``prefill_ms_lo`` /
    ``prefill_ms_hi``, the unpruned model as a dashed line with its spread shaded. Right: median selection
    time as % of the median pruned prefill per budget (pre-LLM methods), error bars from the selection's
    spread. ``spread_label`` says in the legends what the error bars are.
    """
    check_columns(
        lat, ["method", "budget", "visual_avg", "prefill_ms", "prefill_ms_lo", "prefill_ms_hi", "select_ms"]
    )
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    base = lat[lat["method"] == "none"]
    pruned = lat[lat["method"] != "none"]
    order = method_order(pruned["method"])
    colors, markers = method_colors(order), method_markers(order)
    ax = axes[0]
    for m, offset in zip(order, curve_offsets(len(order), 0.03)):
        d = pruned[pruned["method"] == m].sort_values("visual_avg")
        err = np.stack([d["prefill_ms"] - d["prefill_ms_lo"], d["prefill_ms_hi"] - d["prefill_ms"]])
        ax.errorbar(d["visual_avg"] * 2.0**offset, d["prefill_ms"], yerr=err, color=colors[m], marker=markers[m],
                    lw=1.8, ms=6, capsize=3, label=method_label(m))  # fmt: skip
    if len(base):
        b = base.iloc[0]
        ax.axhline(b["prefill_ms"], color="black", ls="--", lw=1.2, label=f"All tokens ({b['visual_avg']:g})")
        ax.axhspan(b["prefill_ms_lo"], b["prefill_ms_hi"], color="0.5", alpha=0.2, lw=0)
    log2_ticks(ax, pruned["budget"].unique(), pruned["visual_avg"].max())
    ax.set_xlabel("Visual tokens per LLM layer (FastV, PDrop: layer average)")
    ax.set_ylabel("Prefill latency (ms, median)")
    ax.set_ylim(bottom=0)
    ax.set_title("Prefill latency vs tokens")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="0.2", lw=1, marker="_", ms=8))
    labels.append(f"error bars, shading: {spread_label}")
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=3, fontsize=8)
    ax = axes[1]
    pre = pruned[pruned["select_ms"].notna()]
    budgets = sorted(pre["budget"].unique(), reverse=True)
    pre_order = [m for m in order if m in set(pre["method"])]
    width = 0.8 / max(len(pre_order), 1)
    for g, m in enumerate(pre_order):
        d = pre[pre["method"] == m].set_index("budget").reindex(budgets)
        share = 100 * d["select_ms"] / d["prefill_ms"]
        err = None
        if {"select_ms_lo", "select_ms_hi"} <= set(d.columns):
            err = np.stack(
                [
                    share - 100 * d["select_ms_lo"] / d["prefill_ms"],
                    100 * d["select_ms_hi"] / d["prefill_ms"] - share,
                ]
            )
        x = np.arange(len(budgets)) - 0.4 + width * (g + 0.5)
        ax.bar(
            x, share, width, yerr=err, color=colors[m], label=method_label(m), capsize=2, error_kw={"lw": 1}
        )
    ax.set_xticks(np.arange(len(budgets)), [f"{b:g}" for b in budgets])
    ax.set_xlabel("Visual tokens kept")
    ax.set_ylabel("Selection time (% of pruned prefill)")
    ax.set_title("Selection overhead (measured)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, fontsize=8)
    fig.tight_layout()
    return fig
