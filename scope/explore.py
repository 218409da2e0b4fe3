"""The tour's explorer: pick an image, a method, a budget, alpha and theta; see the tokens kept, how much of the
image they cover, and what the model answers with them.

    from scope import explore
    ex = explore.Explorer(model, processor, load_synthbench("test"))
    v = ex.view(index=3, method="scope", budget=64, alpha=1.0, theta=0.9)
    v.kept, v.coverage, v.answer, v.correct        # the kept tokens, their theta-coverage, the model's answer
    ex.widget()                                     # sliders in Jupyter (needs ipywidgets)
    explore.static_grid(ex, [3, 7], ["none", "saliency", "scope"], [64, 16])   # the same, as one figure

The kept tokens are :func:`scope.select`'s on the vision tower's outputs for the image
(:func:`scope.notebook.vision_inputs`, computed once per image and kept, so moving a slider only reruns the
selection); the answer is the model's greedy answer with :func:`scope.patch` installed at the same method,
budget and options (:func:`scope.eval.generate.generate_answers`), so the picture shows the tokens the
model answered from. Answers are kept per (image, method, budget, alpha) too.

:func:`coverage_gap_table` and :func:`pick_example` hold the rule by which the tour chooses its example.
"""

from __future__ import annotations

import math
import numbers
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch

from scope import notebook
from scope.coverage import theta_coverage
from scope.methods import NONE, PRE_LLM, UNPRUNED, get_method, names
from scope.patch import patch
from scope.report import method_label
from scope.select import select

__all__ = ["View", "Explorer", "explorer_methods", "static_grid", "coverage_gap_table", "pick_example"]

REQUIRED_KEYS = ("image", "question", "answer", "family")


def explorer_methods() -> list[str]:
    """The methods the explorer offers: the unpruned model and every pre-LLM method of the registry (in-LLM
    methods drop tokens between decoder layers, so there is no single kept set to draw)."""
    return [UNPRUNED, *names(PRE_LLM)]


@dataclass(frozen=True)
class View:
    """What the explorer shows for one setting of its controls."""

    index: int
    method: str
    budget: int  # tokens entering the LLM (all N for the unpruned model)
    alpha: float
    theta: float
    kept: torch.Tensor  # indices of the kept tokens, ascending
    coverage: float  # theta-coverage of the kept set, a fraction in [0, 1]
    answer: str
    correct: bool


class Explorer:
    """Kept tokens, theta-coverage and answers of one model on a list of questions, cached per image.

    ``samples``: a sequence of mappings (e.g. a SynthBench ``datasets.Dataset``) with ``image`` (PIL),
    ``question``, ``answer`` and ``family`` (``question_id`` optional). ``seed`` goes to methods that draw
    at random; ``max_new_tokens`` bounds the answers (SynthBench answers are one word).
    """

    def __init__(self, model, processor, samples: Sequence[Mapping], seed: int = 0, max_new_tokens: int = 8):
        if len(samples) == 0:
            raise ValueError("samples is empty; pass at least one question with an image")
        self.model, self.processor, self.seed, self.max_new_tokens = model, processor, seed, max_new_tokens
        self.samples = [dict(s) for s in samples]
        for i, s in enumerate(self.samples):
            missing = [k for k in REQUIRED_KEYS if k not in s]
            if missing:
                raise ValueError(f"sample {i} lacks {missing}; each needs {list(REQUIRED_KEYS)}")
            s["image"] = s["image"].convert("RGB")
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._answers: dict[tuple, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    # ------------------------------------------------------------------------------------------ inputs

    def prepare(self, indices: Sequence[int] | None = None, chunk: int = 16) -> None:
        """Run the vision tower on the images of ``indices`` (all by default) not seen yet, ``chunk`` at a time."""
        wanted = [self._index(i) for i in (range(len(self)) if indices is None else indices)]
        todo = [i for i in dict.fromkeys(wanted) if i not in self._inputs]
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            feats, sal, keys = notebook.vision_inputs(
                self.model, self.processor, [self.samples[i]["image"] for i in part], chunk=chunk
            )
            for j, i in enumerate(part):
                self._inputs[i] = (feats[j], sal[j], keys[j])

    def inputs(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(features [N, d], saliency [N], keys [N, d_head])`` of image ``index``, as the patch selects on."""
        index = self._index(index)
        if index not in self._inputs:
            self.prepare([index])
        return self._inputs[index]

    @property
    def n_tokens(self) -> int:
        """Visual tokens per image (N)."""
        return int(self.inputs(0)[0].shape[0])

    # ------------------------------------------------------------------------------------------ controls

    def _index(self, index) -> int:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < len(self):
            raise ValueError(f"index={index!r} must be an int in [0, {len(self)})")
        return int(index)  # numpy and pandas integers too, as plain ints (cache keys)

    def check(self, index, method, budget, alpha=1.0, theta=0.9) -> tuple[int, str, int, float, float]:
        """The controls, checked: ``(index, method name, budget, alpha, theta)``; a ValueError naming the bad
        value otherwise. The unpruned model's budget is N whatever was asked."""
        index = self._index(index)
        offered = explorer_methods()
        if not isinstance(method, str) or get_method(method).name not in offered:
            raise ValueError(f"method={method!r} is not offered by the explorer; choose one of {offered}")
        method = get_method(method).name
        n = self.n_tokens
        if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or not 1 <= budget <= n:
            raise ValueError(f"budget={budget!r} must be an int in [1, {n}] (tokens kept of the image's {n})")
        budget = int(budget)
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, numbers.Real)
            or not math.isfinite(alpha)
            or alpha < 0
        ):
            raise ValueError(f"alpha={alpha!r} must be a finite number >= 0")
        if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not 0 <= theta <= 1:
            raise ValueError(f"theta={theta!r} must be a number in [0, 1] (a cosine-similarity threshold)")
        if get_method(method).stage == NONE:
            budget = n
        return index, method, budget, float(alpha), float(theta)

    def options(self, method: str, alpha: float = 1.0) -> dict[str, Any]:
        """The method options the explorer sets, for :func:`scope.patch` and :func:`scope.select` alike:
        ``alpha`` for a method that takes it (SCOPE), ``seed`` for one that draws at random."""
        record = get_method(method)
        opts: dict[str, Any] = {}
        if "alpha" in record.options:
            opts["alpha"] = float(alpha)
        if "seed" in record.options:
            opts["seed"] = self.seed
        return opts

    # ------------------------------------------------------------------------------------------ results

    def kept(self, index: int, method: str, budget: int, alpha: float = 1.0) -> torch.Tensor:
        """Indices (ascending) of the tokens ``method`` keeps of image ``index``: what the patched model feeds
        its LLM (all N for the unpruned model or ``budget == N``)."""
        index, method, budget, alpha, _ = self.check(index, method, budget, alpha)
        feats, sal, keys = self.inputs(index)
        if budget >= feats.shape[0]:
            return torch.arange(feats.shape[0])
        record = get_method(method)
        opts = {**notebook.method_options(method, keys, self.seed), **self.options(method, alpha)}
        if record.sample_ids_option is not None:  # the patch seeds a random draw by the image's pixels
            opts[record.sample_ids_option] = self._pixel_ids(index)
        return select(feats, sal, budget=budget, method=method, **opts)

    def _pixel_ids(self, index: int) -> list[int]:
        from scope.patch.llava import pixel_ids

        pv = self.processor.image_processor([self.samples[index]["image"]], return_tensors="pt")[
            "pixel_values"
        ]
        return pixel_ids(pv.to(self.model.device, self.model.dtype))

    def coverage(self, index: int, method: str, budget: int, alpha: float = 1.0, theta: float = 0.9) -> float:
        """theta-coverage of the kept set (:func:`scope.coverage.theta_coverage`): the share of the image's
        tokens whose feature has cosine similarity >= ``theta`` with some kept token."""
        index, method, budget, alpha, theta = self.check(index, method, budget, alpha, theta)
        feats = self.inputs(index)[0]
        return float(theta_coverage(feats, self.kept(index, method, budget, alpha), theta))

    def answers(
        self, indices: Sequence[int], method: str, budget: int, alpha: float = 1.0, batch_size: int = 16
    ) -> list[str]:
        """The model's greedy answers to the questions ``indices`` with ``method`` at ``budget`` installed by
        :func:`scope.patch` (nothing for the unpruned model), ``batch_size`` questions per generate call."""
        from scope.eval.generate import build_prompt, generate_answers

        if len(indices) == 0:
            raise ValueError("indices is empty; pass the questions to answer")
        checked = [self.check(i, method, budget, alpha) for i in indices]
        _, method, budget, alpha, _ = checked[0]
        options = self.options(method, alpha)
        key = (method, budget, tuple(sorted(options.items())))  # alpha counts only for a method taking it
        todo = list(dict.fromkeys(i for i, *_ in checked if (i, *key) not in self._answers))
        for start in range(0, len(todo), batch_size):
            part = todo[start : start + batch_size]
            prompts = [build_prompt(self.processor, self.samples[i]["question"]) for i in part]
            images = [[self.samples[i]["image"]] for i in part]
            if get_method(method).stage == NONE:
                texts, _ = generate_answers(self.model, self.processor, prompts, images, self.max_new_tokens)
            else:
                with patch(self.model, method=method, budget=budget, **options):
                    texts, _ = generate_answers(
                        self.model, self.processor, prompts, images, self.max_new_tokens
                    )
            self._answers.update({(i, *key): t for i, t in zip(part, texts)})
        return [self._answers[(i, *key)] for i, *_ in checked]

    def answer(self, index: int, method: str, budget: int, alpha: float = 1.0) -> str:
        """The model's answer to question ``index`` with ``method`` at ``budget`` (see :meth:`answers`)."""
        return self.answers([index], method, budget, alpha)[0]

    def is_correct(self, index: int, answer: str) -> bool:
        """Whether ``answer`` is right for question ``index`` (SynthBench's normalised exact match)."""
        from scope.mini.synthbench import score

        s = self.samples[self._index(index)]
        return bool(score(answer, s["answer"], s["family"]))

    def view(self, index: int, method: str, budget: int, alpha: float = 1.0, theta: float = 0.9) -> View:
        """Everything the explorer shows for one setting of its controls."""
        index, method, budget, alpha, theta = self.check(index, method, budget, alpha, theta)
        answer = self.answer(index, method, budget, alpha)
        return View(
            index=index,
            method=method,
            budget=budget,
            alpha=alpha,
            theta=theta,
            kept=self.kept(index, method, budget, alpha),
            coverage=self.coverage(index, method, budget, alpha, theta),
            answer=answer,
            correct=self.is_correct(index, answer),
        )

    # ------------------------------------------------------------------------------------------ drawing

    def draw(self, view: View, ax: plt.Axes | None = None, title: str | None = None) -> plt.Axes:
        """``view``'s image with its dropped tokens dimmed and kept ones outlined, framed in the method's
        colour (the registry's), titled with the method, the budget, the theta-coverage and the answer
        (✓ right, ✗ wrong)."""
        from scope import vis

        ax = ax or plt.gca()
        image = self.samples[view.index]["image"]
        color = vis.method_colors([view.method])[view.method]
        everything = view.budget >= self.n_tokens  # all tokens: the plain image, no outline on every cell
        vis.draw_kept_tokens(
            image,
            view.kept,
            self.n_tokens,
            ax=ax,
            title=panel_title(view, self.n_tokens) if title is None else title,
            color="none" if everything else color,
        )
        for spine in ax.spines.values():
            spine.set(edgecolor=color, linewidth=2.5, visible=True)
        return ax

    def widget(
        self, indices: Sequence[int] | None = None, budget: int = 64, alpha: float = 1.0, theta: float = 0.9
    ):
        """Sliders and menus over image, method, budget, alpha and theta, redrawing :meth:`draw` (Jupyter).

        ``indices``: the questions offered (all by default). Needs ipywidgets (the ``notebooks`` extra).
        """
        try:
            import ipywidgets as w
        except ImportError as err:
            raise ImportError(
                "the interactive explorer needs ipywidgets: pip install -c constraints.txt -e '.[notebooks]'"
            ) from err
        from IPython.display import display

        indices = list(range(len(self))) if indices is None else [self._index(i) for i in indices]
        n = self.n_tokens
        index, _, budget, alpha, theta = self.check(indices[0], "scope", budget, alpha, theta)
        controls = {
            "index": w.Dropdown(
                options=[(f"{i}: {self.samples[i]['question']}", i) for i in indices],
                value=index,
                description="image",
            ),
            "method": w.Dropdown(
                options=[(method_label(m), m) for m in explorer_methods()],
                value="scope",
                description="method",
            ),
            "budget": w.IntSlider(value=budget, min=1, max=n, description="budget", continuous_update=False),
            "alpha": w.FloatSlider(
                value=alpha, min=0, max=4, step=0.25, description="α", continuous_update=False
            ),
            "theta": w.FloatSlider(
                value=theta, min=0, max=1, step=0.01, description="θ", continuous_update=False
            ),
        }

        def show(index, method, budget, alpha, theta):
            controls["alpha"].disabled = "alpha" not in get_method(method).options
            fig, ax = plt.subplots(figsize=(4.5, 4.8))
            self.draw(self.view(index, method, budget, alpha, theta), ax=ax)
            plt.show()
            s = self.samples[index]
            display(w.HTML(f"<b>Q:</b> {s['question']} &nbsp; <b>truth:</b> {s['answer']}"))

        out = w.interactive_output(show, controls)
        rows = [
            w.HBox([controls["index"], controls["method"]]),
            w.HBox([controls[k] for k in ("budget", "alpha", "theta")]),
        ]
        return w.VBox([*rows, out])


def panel_title(view: View, n_tokens: int) -> str:
    """The title of one explorer panel: method and tokens kept, theta-coverage, the answer and ✓ / ✗."""
    tokens = f"{n_tokens} of {n_tokens}" if view.budget >= n_tokens else f"{view.budget} tokens"
    mark = "✓" if view.correct else "✗"
    return (
        f"{method_label(view.method)}, {tokens}\n"
        f"θ={view.theta:g}-coverage {100 * view.coverage:.0f}%\nanswer “{view.answer}” {mark}"
    )


def static_grid(
    explorer: Explorer,
    indices: Sequence[int],
    methods: Sequence[str],
    budgets: Sequence[int],
    alpha: float = 1.0,
    theta: float = 0.9,
    panel_size: float = 2.4,
    title: str | None = None,
) -> plt.Figure:
    """The explorer as small multiples, for headless runs: one row per question, one panel for the unpruned
    model (when in ``methods``) and one per pruned method × budget, each titled as :meth:`Explorer.draw` does.
    The question and its true answer label each row."""
    if not indices or not methods or not budgets:
        raise ValueError(
            f"need questions, methods and budgets; got {list(indices)}, {list(methods)}, {list(budgets)}"
        )
    pruned = [get_method(m).name for m in methods if get_method(m).stage != NONE]
    columns = [(UNPRUNED, explorer.n_tokens)] if len(pruned) < len(methods) else []
    columns += [(m, b) for b in budgets for m in pruned]
    fig, axes = plt.subplots(
        len(indices),
        len(columns),
        figsize=(panel_size * len(columns), (panel_size + 0.6) * len(indices) + 0.4),
        squeeze=False,
        layout="constrained",  # room for the three-line panel titles between rows
    )
    for row, index in zip(axes, indices):
        for ax, (method, budget) in zip(row, columns):
            explorer.draw(explorer.view(index, method, budget, alpha, theta), ax=ax)
            ax.title.set_fontsize(8)
            ax.title.set_fontweight("normal")
        s = explorer.samples[index]
        row[0].set_ylabel(_wrap(f"Q{index}: {s['question']} (truth: {s['answer']})"), fontsize=8)
    if title:
        fig.suptitle(title)
    # lay the panels out now and freeze them, so that a source line added under the figure afterwards
    # (scope.vis.save_figure) lands below the panels and does not move them
    fig.get_layout_engine().execute(fig)
    fig.set_layout_engine("none")
    return fig


def _wrap(text: str, width: int = 28) -> str:
    return "\n".join(textwrap.wrap(text, width))


# ---------------------------------------------------------------------------------------------- the rule


def coverage_gap_table(
    explorer: Explorer,
    budget: int,
    theta: float = 0.9,
    worse: str = "saliency",
    better: str = "scope",
    indices: Sequence[int] | None = None,
    alpha: float = 1.0,
    batch_size: int = 16,
) -> pd.DataFrame:
    """One row per question (all, or ``indices``): the theta-coverage, answer and correctness of ``worse``
    and ``better`` at ``budget``, and ``gap`` = coverage(better) - coverage(worse).

    Columns: ``index``, ``question_id``, ``family``, ``question``, ``truth``, then ``coverage_<m>``,
    ``answer_<m>``, ``correct_<m>`` for both methods, and ``gap``.
    """
    indices = list(range(len(explorer))) if indices is None else list(indices)
    explorer.prepare(indices)
    rows = [
        {
            "index": i,
            "question_id": explorer.samples[i].get("question_id", str(i)),
            "family": explorer.samples[i]["family"],
            "question": explorer.samples[i]["question"],
            "truth": explorer.samples[i]["answer"],
        }
        for i in indices
    ]
    for m in (worse, better):
        answers = explorer.answers(indices, m, budget, alpha, batch_size=batch_size)
        for row, i, a in zip(rows, indices, answers):
            row[f"coverage_{m}"] = explorer.coverage(i, m, budget, alpha, theta)
            row[f"answer_{m}"] = a
            row[f"correct_{m}"] = explorer.is_correct(i, a)
    table = pd.DataFrame(rows)
    table["gap"] = table[f"coverage_{better}"] - table[f"coverage_{worse}"]
    return table


def pick_example(table: pd.DataFrame, worse: str = "saliency", better: str = "scope") -> int:
    """The tour's rule: of the questions ``better`` answers right and ``worse`` wrong, the one where
    ``better``'s theta-coverage exceeds ``worse``'s the most (the lowest ``index`` among equal gaps); when
    there is none, the largest gap of all. ``table`` is :func:`coverage_gap_table`'s. Returns the ``index``."""
    needed = ["index", *(f"{k}_{m}" for m in (worse, better) for k in ("coverage", "correct"))]
    missing = [c for c in needed if c not in table.columns]
    if missing or table.empty:
        raise ValueError(f"table needs rows and the columns {needed}; missing {missing}")
    gap = table[f"coverage_{better}"] - table[f"coverage_{worse}"]
    ranked = table.assign(_gap=gap).sort_values(["_gap", "index"], ascending=[False, True], kind="stable")
    contrast = ranked[ranked[f"correct_{better}"].astype(bool) & ~ranked[f"correct_{worse}"].astype(bool)]
    return int((contrast if len(contrast) else ranked)["index"].iloc[0])
