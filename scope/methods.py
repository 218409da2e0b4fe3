"""The method registry: one record per pruning method, read by every other part of the package.

A :class:`Method` says where the method acts (its ``stage``), what runs it, what it needs, which options it
takes (with defaults and validation), how figures and the paper name and draw it, and how many visual
tokens each LLM layer sees under it. :mod:`scope.select` runs pre-LLM records, :mod:`scope.patch` installs
them, :mod:`scope.efficiency` counts their cost, :mod:`scope.eval` and :mod:`scope.report` record and
tabulate them, :mod:`scope.vis` draws them. Adding a method is one :func:`register` call (or one entry in
:data:`BUILTIN` for a method that ships with the package), its function and its tests::

    from scope.methods import Method, Option, register
    register(Method("topnorm", "pre_llm", "Top-norm", fn=my_select, options={"p": Option(2.0, _positive)}))

Stages: ``"pre_llm"`` methods pick the K visual tokens that enter the LLM (``fn(features [B, N, d],
saliency [B, N] or None, budget, **options)`` returns indices ``[B, K]`` or a :class:`scope.select.Pruned`);
``"in_llm"`` methods drop visual tokens between decoder layers (``plan(budget, num_layers, **options)``
returns the drop points, see :mod:`scope.patch.in_llm`); ``"none"`` is the unpruned model.

``fn`` and ``plan`` may be given as ``"module:attribute"`` strings, resolved on first use, so that this
module imports no other part of the package (everything imports it, it imports nothing back).
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PRE_LLM",
    "IN_LLM",
    "NONE",
    "UNPRUNED",
    "COMPARED",
    "Option",
    "Method",
    "METHODS",
    "register",
    "unregister",
    "get_method",
    "find_method",
    "names",
    "is_unpruned",
    "from_paper_label",
    "PDROP_PRESETS",
    "SPARSEVLM_PRESETS",
    "VISIONZIP_CONTEXTUAL",
    "paper_options",
]

PRE_LLM, IN_LLM, NONE = "pre_llm", "in_llm", "none"
_STAGES = (PRE_LLM, IN_LLM, NONE)
UNPRUNED = "none"  # the name of the unpruned method (stage NONE)

# seaborn's colour-blind palette (10 colours): each method owns a fixed colour, so a method is drawn the
# same in every figure whatever else shares it
PALETTE = (
    "#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc",
    "#ca9161", "#fbafe4", "#949494", "#ece133", "#56b4e9",
)  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """A method option: its default, a check of a value, and the words that describe valid values."""

    default: Any
    check: Callable[[Any], bool] | None = None
    expect: str = ""

    def validate(self, method: str, name: str, value: Any) -> None:
        if self.check is not None and not _safe(self.check, value):
            raise ValueError(f"{method} option {name} must be {self.expect}, got {name}={value!r}")


def _safe(check: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(check(value))
    except (TypeError, ValueError):
        return False


def _resolve(target: Callable | str | None) -> Callable | None:
    if target is None or callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Method:
    """Everything the package knows about one pruning method.

    name: the key users pass (``scope.select(..., method=name)``, ``--method name``).
    stage: ``"pre_llm"``, ``"in_llm"`` or ``"none"``.
    label / paper_label: how our figures print it, and how the paper's tables do (``None``: not in the paper).
    color / marker: a matplotlib colour and marker, the same in every figure.
    fn: pre-LLM selection function; plan: in-LLM drop schedule (callables or ``"module:attr"``).
    saliency: whether it needs CLS saliency: a bool, or ``f(options) -> bool`` (SCOPE at alpha = 0 does not).
    options: name -> :class:`Option`; unknown names and invalid values are refused before anything runs.
    keys_option: the option that takes the vision tower's attention keys when :mod:`scope.patch` runs it
        (VisionZip merges by key similarity) unless the caller passed one.
    cls_option: the option that takes the vision tower's CLS-token feature ``[n, d]`` when :mod:`scope.patch`
        runs it (VisionZip's ``keep_cls``) unless the caller passed one.
    projected: whether the selection runs on the projector's output instead of the vision features: a bool
        or ``f(options) -> bool`` (DivPrune's ``feature_space="projected"``); :mod:`scope.patch` then
        projects every token first and selects among the projected rows.
    sample_ids_option: the option that takes one id per image (a hash of its pixels) when :mod:`scope.patch`
        runs it, so a random draw depends on the image and the seed, not on the batch.
    compact_positions: in-LLM only: whether RoPE positions are renumbered after a drop (PDrop) or each kept
        token keeps its own (FastV).
    budget_optional: in-LLM only: ``budget=None`` is meaningful (PDrop's own ratio schedule).
    selection_flops: ``f(n, k, d) -> int``: the selection's elementwise work on one ``n``-token crop that
        FlopCounterMode does not see (its matmuls are counted by running it); 0 when omitted.
    aliases: other names accepted for it (``"vanilla"`` for ``"none"``).
    """

    name: str
    stage: str
    label: str
    paper_label: str | None = None
    color: str | None = None
    marker: str = "o"
    fn: Callable | str | None = None
    plan: Callable | str | None = None
    saliency: bool | Callable[[Mapping[str, Any]], bool] = False
    options: Mapping[str, Option] = field(default_factory=dict)
    keys_option: str | None = None
    cls_option: str | None = None
    projected: bool | Callable[[Mapping[str, Any]], bool] = False
    sample_ids_option: str | None = None
    compact_positions: bool = False
    budget_optional: bool = False
    selection_flops: Callable[[int, int, int], int] | None = None
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.stage not in _STAGES:
            raise ValueError(f"method {self.name!r}: stage must be one of {_STAGES}, got {self.stage!r}")
        if self.stage == PRE_LLM and self.fn is None:
            raise ValueError(f"pre-LLM method {self.name!r} needs fn (its selection function)")
        if self.stage == IN_LLM and self.plan is None:
            raise ValueError(f"in-LLM method {self.name!r} needs plan (its drop schedule)")

    @property
    def function(self) -> Callable:
        """The selection function (pre-LLM)."""
        return _resolve(self.fn)

    @property
    def planner(self) -> Callable:
        """The drop-schedule function (in-LLM)."""
        return _resolve(self.plan)

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``options``; returns them with every default filled in. Unknown names raise."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = ", ".join(self.options) or "no options"
            raise ValueError(f"method {self.name!r} got unknown option(s) {unknown}; it takes {takes}")
        for name, value in options.items():
            self.options[name].validate(self.name, name, value)
        return {**{k: o.default for k, o in self.options.items()}, **options}

    def needs_saliency(self, options: Mapping[str, Any] | None = None) -> bool:
        if callable(self.saliency):
            return bool(self.saliency(self.check_options(dict(options or {}))))
        return bool(self.saliency)

    def selects_projected(self, options: Mapping[str, Any] | None = None) -> bool:
        """Whether, with ``options``, the selection reads the projector's output (see ``projected``)."""
        if callable(self.projected):
            return bool(self.projected(self.check_options(dict(options or {}))))
        return bool(self.projected)

    def tokens_per_layer(
        self, budget: int | None, n_visual: int, num_layers: int, options: Mapping[str, Any] | None = None
    ) -> list[int]:
        """Visual tokens of one ``n_visual``-token image that each of the ``num_layers`` LLM layers sees."""
        if self.stage == NONE or (budget is None and self.stage == PRE_LLM):
            return [n_visual] * num_layers
        if self.stage == PRE_LLM:
            return [min(budget, n_visual)] * num_layers
        stages = {s.layer: s for s in self.planner(budget, num_layers, **self.check_options(options or {}))}
        counts, current = [], n_visual
        for i in range(num_layers):
            if i in stages:
                current = min(current, stages[i].keep(n_visual))
            counts.append(current)
        return counts

    def average_tokens(self, budget, n_visual: int, num_layers: int, options=None) -> float:
        """Visual tokens per LLM layer, averaged over the layers: how in-LLM methods compare to pre-LLM ones."""
        return sum(self.tokens_per_layer(budget, n_visual, num_layers, options)) / num_layers


# --------------------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------------------

METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register(method: Method, replace: bool = False) -> Method:
    """Add ``method`` to :data:`METHODS` (and its aliases); ``replace=True`` to redefine a name."""
    taken = [n for n in (method.name, *method.aliases) if n in METHODS or n in _ALIASES]
    if taken and not replace:
        raise ValueError(f"method name(s) {taken} already registered; pass replace=True to redefine")
    if replace and method.name in METHODS:
        unregister(method.name)
    # a registered name wins over another method's alias of the same spelling (get_method looks there
    # first), and that alias comes back when the name is unregistered
    METHODS[method.name] = method
    for alias in method.aliases:
        _ALIASES[alias] = method.name
    return method


def unregister(name: str) -> None:
    """Remove a registered method (tests register toy methods and remove them again)."""
    method = METHODS.pop(name)
    for alias in method.aliases:
        _ALIASES.pop(alias, None)


def get_method(name: str | Method) -> Method:
    """The record of ``name`` (an alias works too); a clear error listing the choices otherwise."""
    if isinstance(name, Method):
        return name
    if isinstance(name, str):
        if name in METHODS:  # a registered name wins over another method's alias
            return METHODS[name]
        if name in _ALIASES:
            return METHODS[_ALIASES[name]]
    raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")


def find_method(name) -> Method | None:
    """The record of ``name`` (aliases too), or None for a name this session has not registered: for reading
    what others recorded (run folders, tables), where an unknown method is not an error."""
    try:
        return get_method(name)
    except ValueError:
        return None


def names(*stages: str) -> list[str]:
    """Registered method names of the given stages (all when none given), in registration order."""
    return [m.name for m in METHODS.values() if not stages or m.stage in stages]


def is_unpruned(name: str | None) -> bool:
    """Whether a run of method ``name`` is the unpruned model (``None`` too: the model as given)."""
    if name is None:
        return True
    return get_method(name).stage == NONE


def from_paper_label(label: str) -> str:
    """Our method name for a row label of the paper's tables: "SCOPE (Ours)" -> "scope", "PDrop†" -> "pdrop",
    "Vanilla 13B (CVPR'24)" -> "none". A method we do not have comes back as the paper spells it, without
    venue or dagger ("SparseVLM (ICML'25)" -> "SparseVLM"), which is also how figures then label it."""
    key = _bare(label)
    for m in METHODS.values():
        spellings = (m.name, m.label, m.paper_label or "", *m.aliases)
        if key in {_bare(s) for s in spellings} or key.split(" ")[0] in m.aliases:
            return m.name
    return label.split("(")[0].replace("†", "").strip()


def _bare(label: str) -> str:
    # "PDrop†" -> "pdrop", "DivPrune (CVPR'25)" -> "divprune", "Uniform grid" -> "uniform grid"
    return label.split("(")[0].replace("†", "").strip().lower()


# --------------------------------------------------------------------------------------------------------
# option checks
# --------------------------------------------------------------------------------------------------------


def _number(x) -> float | None:
    """``x`` as a Python number when it is one: ints, floats, numpy scalars, one-element tensors; bools and
    everything else give None."""
    if isinstance(x, bool) or type(x).__name__ == "bool_":
        return None
    if isinstance(x, numbers.Real):
        return float(x)
    if hasattr(x, "item") and getattr(x, "numel", lambda: getattr(x, "size", 0))() == 1:
        value = x.item()
        return None if isinstance(value, bool) else _number(value)
    return None


def _finite_nonneg(x) -> bool:
    v = _number(x)
    return v is not None and math.isfinite(v) and v >= 0


def _int(lo: int | None = None) -> Callable[[Any], bool]:
    # whole numbers in any numeric type (3, 3.0, numpy.int64(3), tensor(3)); 2.5 is refused
    def check(x) -> bool:
        v = _number(x)
        return v is not None and math.isfinite(v) and v.is_integer() and (lo is None or v >= lo)

    return check


def _one_of(*values) -> Callable[[Any], bool]:
    return lambda x: x in values


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or check(x)


def _bool(x) -> bool:
    return isinstance(x, bool) or type(x).__name__ == "bool_"


def _grid(x) -> bool:
    return len(x) == 2 and all(_int(1)(v) for v in x)


def _layers(x) -> bool:
    xs = [_number(v) for v in x]
    return bool(xs) and all(_int(1)(v) for v in x) and xs == sorted(set(xs))


def _ints(x) -> bool:
    return all(_int()(v) for v in x)


def _stages(x) -> bool:
    # [(layer, keep), ...]: layers increasing from 1, every count >= 1
    pairs = [tuple(p) for p in x]
    return (
        bool(pairs)
        and all(len(p) == 2 for p in pairs)
        and _layers([p[0] for p in pairs])
        and all(_int(1)(p[1]) for p in pairs)
    )


def _rating_stages(x) -> bool:
    # SparseVLM [(rating layer, top-k), ...]: layers increasing from 0, every count >= 1
    pairs = [tuple(p) for p in x]
    layers = [_number(p[0]) for p in pairs if len(p) == 2]
    return (
        bool(pairs)
        and len(layers) == len(pairs)
        and all(_int(0)(v) for v in layers)
        and layers == sorted(set(layers))
        and all(_int(1)(p[1]) for p in pairs)
    )


def _ratio(x) -> bool:
    v = _number(x)
    return v is not None and 0 < v < 1


def _tensor_or_none(x) -> bool:
    return x is None or hasattr(x, "shape")


IMPL = Option(
    "auto",
    _one_of("auto", "fast", "reference", "dense"),
    "'auto' (dense on CUDA, fast elsewhere), 'fast', 'reference' or 'dense'",
)
# "float32": the greedy's arithmetic upcast (ours); "float16": the authors' code, which runs it in the model's
# half precision (normalise, cosine matrix, gains, scores), see scope.half
PRECISION = Option("float32", _one_of("float32", "float16"), "'float32' or 'float16'")


# --------------------------------------------------------------------------------------------------------
# closed forms of the selections' elementwise work (see scope.efficiency)
# --------------------------------------------------------------------------------------------------------


def _greedy_coverage_flops(n: int, k: int, d: int) -> int:
    # row normalisation (3 n d) + K dense greedy steps: max(0, S_uv - c_u) summed over u for every v (3 n^2),
    # then weighting, argmax and the coverage update (3 n); the lazy greedy does less: an upper bound
    return 3 * n * d + k * (3 * n * n + 3 * n)


def _maxmin_flops(n: int, k: int, d: int) -> int:
    # normalisation + nearest-neighbour pass (n^2) + K steps of min-update and argmax (2 n)
    return 3 * n * d + n * n + k * 2 * n


def _merge_flops(n: int, k: int, d: int) -> int:
    # normalisation + one argmax over the contextual similarity + the merge mean
    return 6 * n * d


# --------------------------------------------------------------------------------------------------------
# the methods that ship with the package
# --------------------------------------------------------------------------------------------------------

_SEL = "scope.select"
_IN_LLM = "scope.patch.in_llm"

BUILTIN = (
    Method(UNPRUNED, NONE, "All tokens", "Vanilla (upper bound)", "#000000", "*", aliases=("vanilla", "full")),
    Method(
        "scope", PRE_LLM, "SCOPE", "SCOPE (Ours)", PALETTE[0], "o",
        fn=f"{_SEL}:select_scope",
        saliency=lambda o: o["alpha"] != 0,
        options={
            "alpha": Option(1.0, _finite_nonneg, "a finite number >= 0"),
            "combine": Option("mul", _one_of("mul", "add"), "'mul' or 'add'"),
            "impl": IMPL,
            "precision": PRECISION,
        },
        selection_flops=_greedy_coverage_flops,
    ),
    Method(
        "coverage", PRE_LLM, "Coverage-only", "Coverage-only", PALETTE[2], "^",
        fn=f"{_SEL}:select_coverage", options={"impl": IMPL, "precision": PRECISION},
        selection_flops=_greedy_coverage_flops,
    ),
    Method("saliency", PRE_LLM, "Saliency-only", "Saliency-only", PALETTE[1], "s",
           fn=f"{_SEL}:select_saliency", saliency=True),
    Method("random", PRE_LLM, "Random", "Random", PALETTE[7], "X", fn=f"{_SEL}:select_random",
           options={"seed": Option(0, _int(), "an int"),
                    "sample_ids": Option(None, _optional(_ints), "None or one int per sample")},
           sample_ids_option="sample_ids"),
    Method("uniform", PRE_LLM, "Uniform grid", "Uniform", PALETTE[5], "P", fn=f"{_SEL}:select_uniform",
           options={"grid": Option(None, _optional(_grid), "None or (rows, cols) of positive ints")}),
    Method(
        "divprune", PRE_LLM, "DivPrune", "DivPrune", PALETTE[4], "v",
        fn=f"{_SEL}:select_divprune",
        options={
            "feature_space": Option("vision", _one_of("vision", "projected"), "'vision' or 'projected'"),
            "precision": PRECISION,
        },
        projected=lambda o: o["feature_space"] == "projected", selection_flops=_maxmin_flops,
    ),
    Method(
        "visionzip", PRE_LLM, "VisionZip", "VisionZip", PALETTE[3], "D",
        fn=f"{_SEL}:merge_visionzip", saliency=True,
        options={
            "n_contextual": Option(None, _optional(_int(0)), "None or an int >= 0"),
            "metric": Option(None, _tensor_or_none, "None or a tensor [B, N, d'] of merge features"),
            "order": Option("raster", _one_of("raster", "official"), "'raster' or 'official'"),
            "keep_cls": Option(False, _bool, "True or False"),
            "cls_token": Option(None, _tensor_or_none, "None or a tensor [B, d] of CLS features"),
        },
        keys_option="metric", cls_option="cls_token", selection_flops=_merge_flops,
    ),
    Method("fastv", IN_LLM, "FastV", "FastV", PALETTE[8], "<", plan=f"{_IN_LLM}:fastv_plan",
           options={"layer": Option(2, _int(1), "an int >= 1")}),
    Method(
        "pdrop", IN_LLM, "PDrop", "PDrop†", PALETTE[9], ">", plan=f"{_IN_LLM}:pdrop_plan",
        options={
            "layers": Option(None, _optional(_layers), "None or increasing ints >= 1"),
            "ratio": Option(0.5, _ratio, "a number in (0, 1)"),
            "stages": Option(None, _optional(_stages), "None or [(layer, keep), ...], layers increasing >= 1"),
        },
        compact_positions=True, budget_optional=True, aliases=("pyramiddrop",),
    ),
    Method(
        "sparsevlm", IN_LLM, "SparseVLM", "SparseVLM", "#7f3c8d", "h",  # the palette is taken: a purple
        plan="scope.patch.sparsevlm:sparsevlm_plan",
        options={
            "layers": Option(None, _optional(lambda x: _layers([v + 1 for v in x])),
                             "None or increasing ints >= 0 (the rating layers)"),
            "stages": Option(None, _optional(_rating_stages),
                             "None or [(rating layer, top-k), ...], layers increasing >= 0"),
            "recycle": Option(True, _bool, "True or False"),
        },
        compact_positions=True, budget_optional=True,
    ),
)  # fmt: skip

for _m in BUILTIN:
    register(_m)
del _m


# the methods the paper's efficiency comparison shows (FLOP and latency tables by default)
COMPARED = ("scope", "visionzip", "divprune", "random", "fastv", "pdrop")


def describe(methods: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """One row per method (name, stage, label, paper label, options with defaults): for docs and notebooks."""
    return [
        {
            "method": m.name,
            "stage": m.stage,
            "label": m.label,
            "paper_label": m.paper_label,
            "options": {k: o.default for k, o in m.options.items()},
        }
        for m in (get_method(n) for n in (methods if methods is not None else METHODS))
    ]


# --------------------------------------------------------------------------------------------------------
# the authors' settings (the paper's protocol)
# --------------------------------------------------------------------------------------------------------

# PDrop† of the paper: (layer, visual tokens kept from that layer on) per model family and nominal budget,
# chosen so that the visual tokens averaged over the 32 LLM layers come to about the budget. Source:
# kinredon/SCOPE, LLaVA/llava/model/llava_arch.py (``layer_list`` / ``image_token_ratio_list`` set for
# LLaVA-1.5 as "original pdrop parameters", and for LLaVA-NeXT at 160 over 2880 tokens); the counts are
# absolute (> 1), and ``layer_list`` entry b drops after layer b - 1, so layer b is the first to see them.
PDROP_PRESETS: dict[tuple[str, int], tuple[tuple[int, int], ...]] = {
    ("llava", 64): ((2, 66), (6, 30), (16, 17)),
    ("llava", 128): ((2, 303), (6, 110), (16, 36)),
    ("llava", 192): ((2, 300), (6, 200), (16, 110)),
    ("llava_next", 160): ((1, 136), (6, 100), (16, 44)),
}

# SparseVLM of the paper on LLaVA-1.5: (rating layer, top-k visual tokens kept after it) per budget, the
# authors' ``sparse_token_list_{192,128,64}`` at ``pruning_loc = [2, 6, 15]`` (Gumpest/SparseVLMs,
# llava/model/language_model/score.py). Layer b rates and is the last to see the previous count; recycled
# clusters come on top of k (scope.patch.sparsevlm). The authors publish no LLaVA-NeXT schedule.
SPARSEVLM_PRESETS: dict[tuple[str, int], tuple[tuple[int, int], ...]] = {
    ("llava", 64): ((2, 66), (6, 30), (15, 17)),
    ("llava", 128): ((2, 303), (6, 110), (15, 36)),
    ("llava", 192): ((2, 300), (6, 200), (15, 110)),
}

# VisionZip contextual tokens per budget as the SCOPE authors ran it (kinredon/SCOPE,
# LLaVA/llava/model/builder.py, ``context_dict``); the other budgets equal our default round(10 K / 64).
# On LLaVA-NeXT the authors divide both counts by the crops (+0.5, rounded down), which our per-crop rule
# already gives at 160 / 320 / 640, so the table applies to LLaVA-1.5 only.
VISIONZIP_CONTEXTUAL: dict[int, int] = {8: 2, 16: 4, 32: 6, 48: 8, 64: 10, 128: 20, 192: 30}

_FAMILIES = ("llava", "llava_next")
# families whose paper runs (Tables 3 and 8) we have no authors' code for: their methods keep our defaults
_FAMILIES_WITHOUT_SETTINGS = ("qwen2_vl", "qwen2_5_vl", "video_llava")


def paper_options(method: str, budget: int | None, family: str) -> dict[str, Any]:
    """The options of ``method`` that reproduce the authors' runs of the paper on ``family`` ("llava" or
    "llava_next") at ``budget``: PDrop's stage preset (an error names a budget without one), VisionZip's
    feeding order, contextual split and kept CLS token, DivPrune's projected features and float16
    arithmetic, SCOPE's (and its variants') float16 arithmetic, SparseVLM's LLaVA-1.5 schedule (other
    budgets and LLaVA-NeXT: ``{}``, our budget rule); ``{}`` for the other methods.
    """
    if family in _FAMILIES_WITHOUT_SETTINGS:
        return {}
    if family not in _FAMILIES:
        known = _FAMILIES + _FAMILIES_WITHOUT_SETTINGS
        raise ValueError(f"family must be one of {known}, got family={family!r}")
    name = get_method(method).name
    if name == "pdrop":
        preset = PDROP_PRESETS.get((family, budget))
        if preset is None:
            known = sorted(b for f, b in PDROP_PRESETS if f == family)
            raise ValueError(
                f"no PDrop preset of the authors for {family} at budget={budget!r}; presets exist at {known}"
            )
        return {"stages": [list(p) for p in preset]}  # lists: what config.json gives back
    if name == "sparsevlm":
        preset = SPARSEVLM_PRESETS.get((family, budget))
        return {} if preset is None else {"stages": [list(p) for p in preset]}
    if name == "visionzip":
        out: dict[str, Any] = {"order": "official", "keep_cls": True}
        if family == "llava" and budget in VISIONZIP_CONTEXTUAL:
            out["n_contextual"] = VISIONZIP_CONTEXTUAL[budget]
        return out
    if name == "divprune":
        return {"feature_space": "projected", "precision": "float16"}
    if name in ("scope", "coverage"):  # SCOPE and its ablation variants (alpha, combine, coverage-only)
        return {"precision": "float16"}
    return {}
