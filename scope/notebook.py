"""What the numbered notebooks share besides tables (:mod:`scope.report`) and figures (:mod:`scope.vis`).

    from scope import notebook
    figures_dir = notebook.repo_path(figures_dir, FIGURES_DIR)          # a folder parameter as a Path
    run_root = results_dir / notebook.run_group(model, tasks, limit, seed)  # runs shared between notebooks
    feats, sal, keys = notebook.vision_inputs(lm, processor, images)   # what the patch's selection sees
    kept = scope.select(feats, sal, 64, method=m, **notebook.method_options(m, keys, seed))

Parameters, paths and names; the vision-tower inputs of the selection; the fine-detail sweep of notebook 04.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from scope import report
from scope.methods import UNPRUNED, get_method
from scope.paths import MINILLAVA_DIR, REPO_ROOT


def repo_path(path, default: Path) -> Path:
    """A notebook's folder parameter as a Path: None -> ``default``; relative paths are taken from the repository
    root (so ``-p results_dir results/x`` means the same from any working directory)."""
    if path is None or str(path) == "":
        return Path(default)
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def shown_path(path) -> str:
    """``path`` relative to the repository root when inside it (what executed notebooks print)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def model_name(model: str | None) -> str:
    """How sources of figures and tables name the model: ``None`` is the embedded MiniLLaVA, anything else its
    hub id / path."""
    if model is None:
        return "MiniLLaVA (embedded, data/minillava)"
    if str(model).rstrip("/").endswith("minillava-next"):
        return "MiniLLaVA-NeXT (embedded, data/minillava-next)"
    if str(model).rstrip("/").endswith("minillava"):
        return "MiniLLaVA (embedded, data/minillava)"
    return str(model)


def run_group(
    model: str | None, tasks: str, limit: int | None, seed: int, protocol: str | None = None
) -> str:
    """Folder name for the runs of one (model, tasks, limit, seed): notebooks share finished runs through it.

    A ``protocol`` other than the model's default (:func:`scope.protocol.resolve_protocol`) is part of the
    name, so runs under both protocols sit side by side instead of refusing to resume into each other."""
    from scope.eval.rundir import checkpoint_fingerprint
    from scope.protocol import resolve_protocol

    name = "minillava" if model is None else Path(str(model)).name or str(model)
    tasks = str(tasks).replace(",", "+")
    group = f"{name}_{tasks}_limit{limit if limit is not None else 'all'}_seed{seed}"
    chosen = resolve_protocol(model, protocol)
    if chosen != resolve_protocol(model):
        group += f"_{chosen.name}"
    # a local checkpoint (the embedded default included) is named by its weights, so retraining starts fresh
    fingerprint = checkpoint_fingerprint(MINILLAVA_DIR if model is None else str(model))
    return f"{group}_{fingerprint[7:]}" if fingerprint else group


@torch.no_grad()
def vision_inputs(model, processor, images: Sequence, chunk: int = 16) -> tuple[torch.Tensor, ...]:
    """``(features, saliency, keys)`` of every image as the patched model's selection sees them, in float32:
    layer -2 features without CLS ``[n, N, d]``, CLS saliency ``[n, N]`` and attention keys ``[n, N, d_head]``
    (:func:`scope.patch.llava.vision_features`), run ``chunk`` images at a time. One crop per image
    (LLaVA-1.5 processors)."""
    from scope.patch.llava import vision_features

    if len(images) == 0:
        raise ValueError("images is empty")
    if chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be >= 1")
    out = []
    for i in range(0, len(images), chunk):
        pv = processor.image_processor(images[i : i + chunk], return_tensors="pt")["pixel_values"]
        out.append(vision_features(model, pv.to(model.device, model.dtype)))
    return tuple(torch.cat([o[j] for o in out]).float() for j in range(3))


def method_options(method: str, keys: torch.Tensor | None = None, seed: int = 0) -> dict[str, Any]:
    """The options a notebook passes to ``scope.select(..., method=method)``: the attention ``keys`` under the
    option the method's registry record names for them (``keys_option``: VisionZip's merge metric, as the
    patch passes it), and ``seed`` to a method that takes one (random)."""
    record = get_method(method)
    options: dict[str, Any] = {}
    if record.keys_option is not None and keys is not None:
        options[record.keys_option] = keys
    if "seed" in record.options:
        options["seed"] = seed
    return options


def fine_detail(
    groups: Mapping[str, tuple[str, int, Sequence[str]]],
    budget: int,
    root: str | Path,
    *,
    limit: int | None,
    batch_size: int = 16,
    seed: int = 0,
    n_boot: int = 200,
    load: Callable[[str], tuple[Any, Any]] | None = None,
    device: str | None = "auto",
    dtype: str | None = None,
) -> pd.DataFrame:
    """SynthBench's ``detail`` split (half-size digits and shapes) answered by several checkpoints, with all
    tokens and pruned to ``budget`` (notebook 04: what LLaVA-NeXT's grid crops buy, and what pruning keeps).

    ``groups``: label -> (checkpoint, image side, methods pruned at ``budget``). A checkpoint's runs live in
    ``root/<checkpoint folder name>/`` (``none``, ``<method>-<budget>``); finished runs are read, missing ones
    evaluated with ``scope.eval.sweep`` on the model ``load(checkpoint)`` returns (default :func:`scope.load`
    on ``device`` in ``dtype``).
    Returns the :func:`scope.report.results_long` rows of every group (with bootstrap ``lo``/``hi``) and a
    ``group`` column holding its label; rows without a value (a family the split lacks) are left out.
    """
    from scope.eval import sweep
    from scope.mini.synthbench import load_synthbench

    if load is None:
        from scope.load import load as scope_load

        def load(checkpoint):
            return scope_load(checkpoint, device=device, dtype=dtype)

    frames = []
    for label, (checkpoint, side, pruned) in groups.items():
        run_root = Path(root) / (Path(str(checkpoint)).name or str(checkpoint))
        names = [UNPRUNED] + [f"{m}-{budget}" for m in pruned]
        if any(not (run_root / r / "results.json").exists() for r in names):
            torch.manual_seed(seed)
            model, processor = load(checkpoint)
            detail = {"synthbench": load_synthbench("detail", limit=limit, image_size=side)}
            sweep(
                model,
                processor,
                "synthbench",
                out_root=run_root,
                methods=list(pruned),
                budgets=[budget],
                limit=limit,
                batch_size=batch_size,
                seed=seed,
                datasets=detail,
                progress=False,
            )
        long = report.results_long([run_root / r for r in names], ci=True, n_boot=n_boot, seed=seed)
        frames.append(long.assign(group=label))
    fine = pd.concat(frames, ignore_index=True)
    return fine[fine["value"].notna()].reset_index(drop=True)


def question_limit(limit, model, embedded: int | None):
    """A notebook's ``limit`` parameter: ``"auto"`` is ``embedded`` questions per task on the embedded model
    and every question of a real checkpoint's benchmarks; a positive int or None (all) is taken as given."""
    if limit == "auto":
        return embedded if model is None else None
    if limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit > 0):
        return limit
    raise ValueError(f"limit={limit!r} must be 'auto', a positive int or None (every question)")
