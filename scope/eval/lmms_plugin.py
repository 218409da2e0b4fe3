"""An lmms-eval model, ``scope_llava``: any LLaVA / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL / Video-LLaVA checkpoint,
pruned by ``scope.patch``.

For users who already run the field's harness (``pip install 'scope-pruning[lmms]'``)::

    lmms-eval --model scope_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=scope,budget=64,dtype=float16 \\
        --tasks gqa,mme,pope --batch_size 8

    lmms-eval --model scope_llava --tasks gqa,mmbench_en_dev,mme,pope --batch_size 1 \\
        --model_args pretrained=Qwen/Qwen2-VL-7B-Instruct,method=scope,budget=0.25,dtype=bfloat16
    torchrun --nproc_per_node 2 -m lmms_eval --model scope_llava --model_args ...   # one GPU per process
    accelerate launch --num_processes 2 -m lmms_eval --model scope_llava --model_args ...

``--model_args`` keys, by kind:

- loading (to :func:`scope.load`, i.e. ``from_pretrained``): ``pretrained`` (hub id or path; default the
  embedded MiniLLaVA), ``dtype`` (``float16``, ``bfloat16``, ``float32`` or ``auto``),
  ``attn_implementation``, ``device_map``, ``revision``, ``device``;
- ``protocol``: ``paper`` (default for real checkpoints: the authors' image preprocessing, vicuna_v1
  conversation and baseline settings, and SEED video questions on their first frame as the authors' llava
  model answers them) or ``hf`` (the checkpoint's own processor and chat template; the default for the
  embedded models); see :mod:`scope.protocol`. Task prompts are lmms-eval's own: for the authors' TextVQA
  prompt use a task config with ``ocr: true``;
  Qwen-VL checkpoints get their own chat template under both protocols (what lmms-eval's ``qwen2_vl`` model
  sends);
- ``min_pixels``, ``max_pixels``: Qwen-VL only, the image areas the processor resizes to (default the
  checkpoint's, 3136 and 12845056, as lmms-eval's ``qwen2_vl`` model);
- pruning: ``method`` (default "scope"; "none" = unpruned), ``budget`` (default 64; ``none`` for PDrop's
  reference schedule; on Qwen-VL a share such as ``0.25``);
- ``max_new_tokens`` (default: the task's);
- every other key is an option of the method (``alpha=0.5``, ``combine=add``, ``layers=[8,16,24]``...).
  Options are checked against the method and the loaded model when the model is built
  (:func:`scope.patch.check`), so a typo fails at start-up, not at the first generation.

Under torchrun or ``accelerate launch`` each process loads its own copy on its own device (accelerate's
``PartialState``: ``cuda:LOCAL_RANK``) unless ``device_map`` places the model; lmms-eval shards the requests
by ``rank`` / ``world_size``. lmms-eval finds the model through the ``lmms_eval.models`` entry point
(``manifest`` below) in current releases, and through ``register_model`` when this module is imported in
older ones. Prompts and images follow the protocol and decoding is greedy, exactly as ``python -m scope.eval``
does.

Video tasks (e.g. lmms-eval's ``activitynetqa``) on Video-LLaVA: lmms-eval hands each request a video file
path; the plugin decodes the 8 frames Video-LLaVA samples (:mod:`scope.eval.video_tasks`, PyAV) and sends
them as ``videos=`` with the ``<video>`` prompt of the protocol. Scoring stays lmms-eval's (its GPT judge).
"""

from __future__ import annotations

import contextlib
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
from scope.eval.rundir import json_value
from scope.eval.tasks import get_task
from scope.eval.video_tasks import is_video_path, supports_video, video_frames
from scope.load import resolve_dtype
from scope.methods import IN_LLM, get_method, is_unpruned
from scope.protocol import PROTOCOLS, applied, limited_pixels, prepare_images, resolve_protocol, run_options

# --model_args keys passed on to scope.load (from_pretrained); pretrained, dtype and device are arguments
LOAD_KEYS = ("attn_implementation", "device_map", "revision")
AUTO_BATCH_SIZE = 8  # what batch_size=auto (or auto:N) means: no probing, a fixed size that fits 7B on a GPU
_FIXED_KEYS = (
    "pretrained",
    "method",
    "budget",
    "batch_size",
    "dtype",
    "device",
    "protocol",
    "max_new_tokens",
    "min_pixels",
    "max_pixels",
)


def split_model_args(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``--model_args`` keys that are not named arguments into (``from_pretrained`` kwargs, options).

    Loading keys (:data:`LOAD_KEYS`) are kept as given (``revision`` as a string: lmms-eval turns digits
    into ints); every other key is a selection option, whose string values are read as JSON where they
    parse (``layers=[8,16,24]`` -> a list, ``seed=null`` -> None) and kept as strings otherwise.
    """
    load_kw: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in LOAD_KEYS:
            if value is not None:
                load_kw[key] = str(value) if key == "revision" else value
        else:
            options[key] = json_value(value)
    return load_kw, options


def parse_batch_size(value: int | str | None, max_batch_size: int | None = None) -> int:
    """lmms-eval's ``--batch_size``: an int (or its string), or ``auto`` / ``auto:N``.

    ``auto`` does not probe the memory: it means :data:`AUTO_BATCH_SIZE` (8) prompts per ``generate``,
    capped by ``max_batch_size`` when lmms-eval passes one.
    """
    if value is None:
        return 1
    if isinstance(value, str) and value.strip().lower().split(":")[0] == "auto":
        return min(AUTO_BATCH_SIZE, int(max_batch_size)) if max_batch_size else AUTO_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size must be a positive int, 'auto' or 'auto:N', got {value!r}") from None
    if size < 1 or isinstance(value, bool) or (isinstance(value, float) and value != size):
        raise ValueError(f"batch_size must be a positive int, 'auto' or 'auto:N', got {value!r}")
    return size


parse_dtype = resolve_dtype  # lmms-eval's dtype=float16 / torch.float16 / auto


def _budget(value: Any) -> Any:
    """lmms-eval hands ``budget`` over as int, float or string; ``none`` means None (PDrop's schedule), a
    whole number a token count, a fraction (``0.25``) a share of each image's tokens (Qwen-VL)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        return None
    if isinstance(value, str):
        value = json_value(value.strip())
    if isinstance(value, float) and value.is_integer() and value > 1:
        return int(value)
    return value  # scope.patch.check names anything else


def _int_or_none(value: Any) -> Any:
    """A pixel limit as lmms-eval hands it over (int or string); anything not a whole number is left for
    :func:`scope.protocol.limited_pixels` to name."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def target_device(device: str | torch.device | None, state: Any) -> torch.device:
    """The device a process loads its copy onto: the process's own (``state.device``, ``cuda:LOCAL_RANK``
    under torchrun / accelerate) unless ``device`` names another; with several processes a bare ``cuda``
    means each process's own GPU, not all of them on ``cuda:0``."""
    own = torch.device(state.device)
    if device is None:
        return own
    dev = torch.device(device)
    if state.num_processes > 1 and dev.index is None and dev.type == own.type:
        return own
    return dev


def _model_device(model: Any) -> torch.device:
    return torch.device(getattr(model, "device", None) or next(model.parameters()).device)


def _precheck(method: str, options: dict[str, Any]) -> None:
    """What can be checked before a checkpoint loads: the method's name and, for pre-LLM and unpruned
    methods, the option names and values (the full check against the model follows after loading)."""
    from scope.patch import method_options

    record = get_method(method)
    if record.stage != IN_LLM:
        record.check_options(method_options(options))


@contextlib.contextmanager
def _explained(method: Any):
    """Re-raise a ValueError of the method checks with a word on how model_args keys are read."""
    try:
        yield
    except ValueError as err:
        raise ValueError(
            f"scope_llava: {err} (model_args other than {', '.join(_FIXED_KEYS + LOAD_KEYS)} are options of "
            f"method {method!r})"
        ) from err


@register_model("scope_llava")
class ScopeLlava(lmms):
    """lmms-eval wrapper of a ``scope``-patched transformers LLaVA model (generation tasks only).

    Pass ``model`` and ``processor`` to wrap an already loaded model (then no loading key may be given);
    otherwise the checkpoint ``pretrained`` is loaded with :func:`scope.load`. See the module docstring for
    the ``--model_args`` keys. ``rank``, ``world_size``, ``device`` and ``batch_size`` are what lmms-eval's
    evaluator reads (it shards requests by rank and gathers counts on ``device``).

    Raises:
        ValueError: an unknown method, an invalid budget or option (checked before patching, against the
            loaded model), an unknown ``protocol``, an unsupported ``dtype`` or ``batch_size``.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = "scope",
        budget: int | str | None = 64,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        protocol: str | None = None,
        max_new_tokens: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        model: Any = None,
        processor: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from scope.eval.runner import partial_state
        from scope.patch import check, patch, unpatch

        if protocol is not None and str(protocol).strip().lower() not in PROTOCOLS:
            raise ValueError(
                f"scope_llava: protocol={protocol!r} is unknown; choose from {sorted(PROTOCOLS)}"
            )
        load_kw, options = split_model_args(kwargs)
        budget = _budget(budget)
        with _explained(method):  # an unknown method or option fails before the checkpoint loads
            _precheck(method, options)
        self.batch_size = parse_batch_size(batch_size, max_batch_size)
        state = partial_state()
        self._rank, self._world_size = state.process_index, state.num_processes
        if model is None:
            model, processor = self._load(pretrained, parse_dtype(dtype), device, load_kw, state)
        elif pretrained is not None or dtype is not None or load_kw:
            raise ValueError("scope_llava: pretrained, dtype and loading keys apply only without model=")
        elif device is not None:
            from scope.load import resolve_device

            model.to(resolve_device(str(target_device(device, state))))  # a clear error for a missing device
        self._device = _model_device(model)
        self.model, self.processor = model.eval(), processor
        self.protocol = resolve_protocol(pretrained, protocol or getattr(processor, "scope_protocol", None))
        options = run_options(self.protocol, method, budget, model, options)
        self.method, self.budget, self.options = method, budget, dict(options)
        self.max_new_tokens = max_new_tokens
        self.pixels = (_int_or_none(min_pixels), _int_or_none(max_pixels))
        with limited_pixels(self.processor, *self.pixels):  # a bad limit, or limits for LLaVA, fail here
            pass
        with _explained(method):  # patch checks everything first and replaces an earlier patch
            if is_unpruned(method):  # the unpruned model runs unpatched
                check(self.model, method, budget, **self.options)
                unpatch(self.model)
            else:
                patch(self.model, method=method, budget=budget, **self.options)

    @staticmethod
    def _load(pretrained, dtype, device, load_kw: dict[str, Any], state):
        """``scope.load`` with the loading keys; the model goes to this process's device unless
        ``device_map`` placed it."""
        from scope.load import load

        kw = dict(load_kw)
        if dtype is not None:
            kw["dtype"] = dtype
        # straight onto this process's device (no detour through another GPU; scope.load names a device this
        # machine lacks); a device_map places it itself
        where = None if "device_map" in kw else str(target_device(device, state))
        return load(None if pretrained is None else str(pretrained), device=where, **kw)

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go (lmms-eval gathers request counts on it under several processes)."""
        return self._device

    @property
    def rank(self) -> int:
        """This process's index (accelerate's ``PartialState``; lmms-eval may overwrite ``_rank``)."""
        return self._rank

    @property
    def world_size(self) -> int:
        """The number of processes."""
        return self._world_size

    def generate_until(self, requests) -> list[str]:
        """Answer each request: (context, gen_kwargs, doc_to_visual, doc_id, task, split)."""
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[start : start + self.batch_size]]
            docs = [self.task_dict[task][split][i] for _, _, _, i, task, split in chunk]
            raw = [list(dv(doc)) for (_, _, dv, *_), doc in zip(chunk, docs)]
            video = self._video_batch(raw, [task for *_, task, _ in chunk])
            visuals = [
                video_frames({"video": r[0]}) if video else self._visuals(r, doc, task)
                for r, doc, (*_, task, _) in zip(raw, docs, chunk)
            ]
            p = self.protocol
            prompts = [
                build_prompt(self.processor, ctx, len(v), p, video) for (ctx, *_), v in zip(chunk, visuals)
            ]
            gen = chunk[0][1] or {}
            mnt = self.max_new_tokens or int(gen.get("max_new_tokens", 16))
            kw = {"videos": True} if video else {}  # a video's 8 frames go to the processor as videos=
            with applied(self.processor, self.model, p), limited_pixels(self.processor, *self.pixels):
                texts, _ = generate_answers(self.model, self.processor, prompts, visuals, mnt, **kw)
            for (_, g, *_), text in zip(chunk, texts):
                until = (g or {}).get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    text = text.split(stop)[0] if stop else text
                out.append(text.strip())
        return out

    def _visuals(self, visuals: list, doc, task: str) -> list:
        """A request's images as the protocol prepares them (under ``paper``, a SEED video question keeps
        its first frame, as the authors' lmms-eval llava model does)."""
        seed = get_task("seedbench")
        if self.protocol.authors and task == seed.name and doc.get("data_type") == "video":
            visuals = visuals[:1]
        return prepare_images(self.processor, visuals, self.protocol)

    def _video_batch(self, raw: list[list], tasks: list[str]) -> bool:
        """Whether a batch's requests are videos (lmms-eval hands a video task one file path per request),
        which Video-LLaVA answers from 8 frames sampled as :func:`scope.eval.video_tasks.frame_indices`.
        A batch mixing videos and images, or a video on a model without video input, raises."""
        is_video = [len(r) == 1 and is_video_path(r[0]) for r in raw]
        if not any(is_video):
            return False
        if not all(is_video):
            raise ValueError(f"scope_llava: a batch of tasks {sorted(set(tasks))} mixes videos and images")
        if not supports_video(self.model):
            raise ValueError(
                f"scope_llava: tasks {sorted(set(tasks))} send videos, and {type(self.model).__name__} takes "
                "none; video tasks run on Video-LLaVA (pretrained=LanguageBind/Video-LLaVA-7B-hf)"
            )
        return True

    def loglikelihood(self, requests):
        """Not supported: scope_llava answers generation tasks only."""
        raise NotImplementedError("scope_llava answers generation tasks only (generate_until)")

    def generate_until_multi_round(self, requests):
        """Not supported: scope_llava answers single-turn generation tasks only."""
        raise NotImplementedError("scope_llava answers single-turn generation tasks only")


def manifest():
    """Entry point for lmms-eval's model registry (group ``lmms_eval.models``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="scope_llava", simple_class_path="scope.eval.lmms_plugin.ScopeLlava")
