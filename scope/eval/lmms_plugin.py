"""An lmms-eval model, ``scope_llava``: any LLaVA / LLaVA-NeXT checkpoint, pruned by ``scope.patch``.

For users who already run the field's harness (``pip install 'scope-pruning[lmms]'``)::

    lmms-eval --model scope_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=scope,budget=64,dtype=float16 \\
        --tasks gqa,mme,pope --batch_size 8

``--model_args``: ``pretrained`` (hub id or path; default the embedded MiniLLaVA), ``method`` (default
"scope"; "none" = unpruned), ``budget`` (default 64), ``dtype``, ``max_new_tokens`` (default: the task's),
and any option of the method (``alpha=0.5``, ``combine=add``, ...).

lmms-eval finds the model through the ``lmms_eval.models`` entry point (``manifest`` below) in current
releases, and through ``register_model`` when this module is imported in older ones. Prompts follow the
checkpoint's chat template and decoding is greedy, exactly as ``python -m scope.eval`` does.
"""

from __future__ import annotations

from typing import Any

try:
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ImportError as err:  # the extra is optional: say how to get it
    raise ImportError(
        "scope.eval.lmms_plugin needs lmms-eval; install it with `pip install 'scope-pruning[lmms]'` "
        "(or `pip install lmms-eval`)"
    ) from err

import torch

from scope.eval.generate import build_prompt, generate_answers
from scope.methods import is_unpruned


@register_model("scope_llava")
class ScopeLlava(lmms):
    """lmms-eval wrapper of a ``scope``-patched transformers LLaVA model (generation tasks only)."""

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = "scope",
        budget: int = 64,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str | None = None,
        max_new_tokens: int | None = None,
        model: Any = None,
        processor: Any = None,
        **options: Any,
    ) -> None:
        super().__init__()
        from scope.eval.runner import partial_state
        from scope.patch import patch, unpatch

        state = partial_state()
        self._rank, self._world_size = state.process_index, state.num_processes
        if model is None:
            kw = {"dtype": getattr(torch, dtype)} if dtype else {}
            from scope.load import load

            model, processor = load(pretrained, **kw)
            model.to(device or state.device)
        self.model, self.processor = model.eval(), processor
        self.method, self.budget, self.options = method, int(budget), dict(options)
        self.batch_size = int(batch_size)
        self.max_new_tokens = max_new_tokens
        unpatch(self.model)
        if not is_unpruned(method):
            patch(self.model, method=method, budget=self.budget, **self.options)

    def generate_until(self, requests) -> list[str]:
        """Answer each request: (context, gen_kwargs, doc_to_visual, doc_id, task, split)."""
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[start : start + self.batch_size]]
            visuals = [
                list(dv(self.task_dict[task][split][doc_id])) for _, _, dv, doc_id, task, split in chunk
            ]
            prompts = [build_prompt(self.processor, ctx, len(v)) for (ctx, *_), v in zip(chunk, visuals)]
            gen = chunk[0][1] or {}
            mnt = self.max_new_tokens or int(gen.get("max_new_tokens", 16))
            texts, _ = generate_answers(self.model, self.processor, prompts, visuals, mnt)
            for (_, g, *_), text in zip(chunk, texts):
                until = (g or {}).get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    text = text.split(stop)[0] if stop else text
                out.append(text.strip())
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError("scope_llava answers generation tasks only (generate_until)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("scope_llava answers single-turn generation tasks only")


def manifest():
    """Entry point for lmms-eval's model registry (group ``lmms_eval.models``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="scope_llava", simple_class_path="scope.eval.lmms_plugin.ScopeLlava")
