"""SCOPE: Saliency-Coverage Oriented token Pruning for multimodal LLMs (NeurIPS 2025), reproduced.

One-call API::

    import scope
    kept = scope.select(features, saliency, budget=64)            # plain tensors -> kept indices
    scope.METHODS                                                  # the registry: name -> scope.Method
    model, processor = scope.load(method="scope", budget=64)      # embedded MiniLLaVA, pruned
    scope.patch(hf_llava_model, method="scope", budget=64)        # any transformers LLaVA / LLaVA-NeXT

``scope.select``, ``scope.patch`` and ``scope.load`` name both a module and the function it defines; they
are imported here at once so that the package attribute is always the function (reach the modules with
``from scope.select import ...``). Other submodules load on first use.
"""

from __future__ import annotations

import importlib

from .coverage import coverage_gain, set_coverage, theta_coverage
from .load import load
from .methods import METHODS, Method, Option, get_method, register
from .patch import equivalent_tokens, is_patched, patch, reuse_vision_features, unpatch
from .select import Pruned, prune, scope_greedy_fast, scope_greedy_reference, select

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "select": "scope.select",
    "prune": "scope.select",
    "METHODS": "scope.methods",
    "Method": "scope.methods",
    "Option": "scope.methods",
    "register": "scope.methods",
    "get_method": "scope.methods",
    "Pruned": "scope.select",
    "scope_greedy_reference": "scope.select",
    "scope_greedy_fast": "scope.select",
    "set_coverage": "scope.coverage",
    "theta_coverage": "scope.coverage",
    "coverage_gain": "scope.coverage",
    "patch": "scope.patch",
    "unpatch": "scope.patch",
    "is_patched": "scope.patch",
    "equivalent_tokens": "scope.patch",
    "reuse_vision_features": "scope.patch",
    "load": "scope.load",
    "evaluate": "scope.eval",
    "sweep": "scope.eval",
    "paper_table": "scope.report",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        value = getattr(module, name)
        globals()[name] = value  # also undoes the import system binding the submodule under this name
        return value
    raise AttributeError(f"module 'scope' has no attribute {name!r}")


def __dir__():
    return __all__
