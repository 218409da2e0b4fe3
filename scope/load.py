"""``scope.load``: a LLaVA / LLaVA-NeXT model and its processor, optionally patched, offline-first.

    model, processor = scope.load()                                   # the embedded MiniLLaVA
    model, processor = scope.load("llava-hf/llava-1.5-7b-hf", method="scope", budget=64)

A hub id is only fetched when it is not in the local Hugging Face cache *and* the hub is reachable; with
``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) or no network the call fails at once with a message
that says what to do, instead of waiting for network timeouts.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ["load", "load_processor", "hub_reachable", "resolve_device", "resolve_dtype"]

_TRUE = {"1", "true", "yes", "on"}


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds (DNS included)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    result = {"ok": False}

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result["ok"] = True
        except OSError:
            pass

    # a thread bounds the DNS lookup too, which socket timeouts do not cover
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return result["ok"]


def _model_class(config):
    import transformers

    classes = {
        "llava": transformers.LlavaForConditionalGeneration,
        "llava_next": transformers.LlavaNextForConditionalGeneration,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "video_llava": transformers.VideoLlavaForConditionalGeneration,
    }
    if config.model_type not in classes:
        raise ValueError(
            f"scope.load supports LLaVA ('llava'), LLaVA-NeXT ('llava_next'), Qwen2-VL ('qwen2_vl'), "
            f"Qwen2.5-VL ('qwen2_5_vl') and Video-LLaVA ('video_llava') checkpoints, got "
            f"model_type={config.model_type!r}"
        )
    return classes[config.model_type]


def _resolve(model_id_or_path: str | os.PathLike | None, kwargs: dict[str, Any]) -> str:
    """A local directory, or a hub id that is cached or downloadable; raise a clear error otherwise."""
    from scope import paths

    if model_id_or_path is None:
        path = Path(paths.MINILLAVA_DIR)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"the embedded MiniLLaVA checkpoint is missing at {path}; build it with `make model` "
                f"(or pass a model id / path to scope.load)"
            )
        return str(path)
    name = str(model_id_or_path)
    if Path(name).expanduser().exists():
        path = Path(name).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json; is it a save_pretrained directory?")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"no such model directory: {name}")

    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json", revision=kwargs.get("revision")), str)
    if cached:
        return name
    if kwargs.get("local_files_only") or _offline():
        raise FileNotFoundError(
            f"{name!r} is not in the local Hugging Face cache and downloads are off (HF_HUB_OFFLINE / "
            f"local_files_only). Download it once where the hub is reachable "
            f"(`huggingface-cli download {name}`), copy the cache (HF_HOME) here, or pass a local "
            f"save_pretrained directory."
        )
    if not hub_reachable():
        raise ConnectionError(
            f"{name!r} is not in the local Hugging Face cache and the hub "
            f"({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) cannot be reached. Download it "
            f"where there is network (`huggingface-cli download {name}`) and copy the cache (HF_HOME), or pass "
            f"a local directory."
        )
    return name


def _embedded(source: str) -> bool:
    """Whether ``source`` is a checkpoint shipped in the repository's ``data/`` (MiniLLaVA, MiniLLaVA-NeXT)."""
    from scope import paths

    path = Path(source).expanduser()
    return path.exists() and path.resolve().is_relative_to(Path(paths.DATA_DIR).resolve())


# what a save_pretrained folder of a LLaVA model and its processor holds: any one file of each group
_NEEDED = {
    "weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
    "image processor config": ("preprocessor_config.json", "processor_config.json"),
    "tokenizer": ("tokenizer.json", "tokenizer.model"),
}


def _missing_files(folder: Path) -> list[str]:
    """What a local checkpoint folder lacks, by group ("weights (model.safetensors or ...)")."""
    return [
        f"{what} ({' or '.join(names)})"
        for what, names in _NEEDED.items()
        if not any((folder / n).exists() for n in names)
    ]


def load(
    model_id_or_path: str | os.PathLike | None = None,
    method: str | None = None,
    budget: int | None = None,
    *,
    device: str | None = "auto",
    dtype: str | Any = None,
    protocol: str | None = None,
    **from_pretrained_kwargs: Any,
):
    """Load a LLaVA, LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL checkpoint and its processor; patch it when ``method``
    is given.

    Args:
        model_id_or_path: a hub id (``"llava-hf/llava-1.5-7b-hf"``), a local ``save_pretrained``
            directory, or None for the embedded MiniLLaVA (``scope.paths.MINILLAVA_DIR``).
        method: None (unpatched) or a ``scope.patch`` method ("scope", "visionzip", "fastv", ...).
        budget: visual tokens per image for the patch; None means 64 (PDrop: its ratio schedule).
        device: "auto" (CUDA when present, else CPU), a device such as "cuda:1" or "cpu", or None to leave
            the model where ``from_pretrained`` put it (also what happens with a ``device_map``).
        dtype: "float16", "bfloat16", "float32" or a torch dtype; None: the embedded checkpoints load in
            float32 (their answers then do not depend on the CPU's bf16 kernels), others in their stored dtype.
        protocol: "paper" or "hf" (:mod:`scope.protocol`); default "paper" for real checkpoints, "hf" for
            the embedded ones. Recorded on the processor (``processor.scope_protocol``), which
            :func:`scope.eval.evaluate` follows; under "paper" ``method`` gets the authors' settings
            (:func:`scope.methods.paper_options`).
        **from_pretrained_kwargs: passed to ``from_pretrained`` of the model (e.g. ``device_map``,
            ``revision``, ``attn_implementation``).

    Returns:
        ``(model, processor)``, the model in eval mode.

    Raises:
        FileNotFoundError: the embedded checkpoint is not built yet (run ``make model``), or a hub id is not
            cached while downloads are off.
        ConnectionError: a hub id is not cached and the hub cannot be reached.
        ValueError: the checkpoint is not one of those families, or a bad ``device`` / ``dtype``.
    """
    kwargs = dict(from_pretrained_kwargs)
    # a device_map or a quantized load places the weights itself (bitsandbytes models refuse .to)
    placed = "device_map" in kwargs or "quantization_config" in kwargs
    target = None if placed else resolve_device(device)
    source = _resolve(model_id_or_path, kwargs)
    dtype = _dtype(dtype, kwargs, _embedded(source))
    if dtype is not None:
        kwargs["dtype"] = dtype
    from scope.protocol import resolve_protocol, run_options

    proto = resolve_protocol(None if model_id_or_path is None else source, protocol)
    model, processor = _from_files(source, kwargs)
    processor.scope_protocol = proto.name
    model.eval()
    if target is not None:
        model.to(target)
    if method is not None:
        from scope.methods import NONE, get_method
        from scope.patch import patch

        record = get_method(method)
        if budget is None and record.stage != NONE and not record.budget_optional:
            budget = 64
        patch(model, method=method, budget=budget, **run_options(proto, method, budget, model))
    return model, processor


def load_processor(model_id_or_path: str | os.PathLike | None = None, **kwargs: Any):
    """The processor of a checkpoint alone (no weights): from a local folder, the local Hugging Face cache,
    or the hub when reachable; None is the embedded MiniLLaVA. Its ``scope_protocol`` is the checkpoint's
    default protocol. Raises as :func:`load` does when the files cannot be found."""
    from transformers import AutoProcessor

    from scope.protocol import resolve_protocol

    source = _resolve(model_id_or_path, kwargs)
    local_only = _offline() or bool(kwargs.pop("local_files_only", False)) or Path(source).exists()
    if not local_only and not hub_reachable():
        local_only = True
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_only, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load the processor of {source!r}: {err}. Its processor and tokenizer files (a few MB, "
            f"no weights) must be local: `huggingface-cli download {source} --exclude '*.safetensors'`."
        ) from err
    processor.scope_protocol = resolve_protocol(None if model_id_or_path is None else source).name
    return processor


def resolve_device(device: str | None):
    """ "auto" -> CUDA when present, else CPU; None stays None; anything else must name a usable device."""
    import torch

    if device is None:
        return None
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device ('auto', 'cpu', 'cuda', 'cuda:1', ...)") from err
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine; use 'auto' or 'cpu'")
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return target


def resolve_dtype(value):
    """``"float16"`` / ``"torch.float16"`` / a torch dtype -> that dtype; ``"auto"`` (the stored one) and None
    as they are; anything else a ValueError naming it."""
    import torch

    if value is None or isinstance(value, torch.dtype) or value == "auto":
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={value!r} is not a torch dtype (float16, bfloat16, float32) or 'auto'")
    return dtype


def _dtype(dtype, kwargs: dict, embedded: bool):
    import torch

    given = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    if dtype is not None and given is not None:
        raise ValueError(f"give the dtype once: dtype={dtype!r} and from_pretrained dtype={given!r}")
    dtype = resolve_dtype(dtype if dtype is not None else given)
    if dtype is None and embedded:
        # The embedded checkpoints are stored in bf16 but run in fp32: CPU bf16 kernels round differently
        # on different CPUs, and near-tied answers flipped between two machines (make reproduce tables).
        dtype = torch.float32
    return dtype


def _from_files(source: str, kwargs: dict):
    """Model and processor from ``source`` (local folder, or the hub only when reachable)."""
    from transformers import AutoConfig, AutoProcessor

    local_only = _offline() or bool(kwargs.pop("local_files_only", False)) or Path(source).exists()
    if not local_only and not hub_reachable():
        local_only = True  # cached hub id, no network: use the cache instead of waiting on timeouts
    hub_kw = {k: kwargs[k] for k in ("revision", "cache_dir", "token") if k in kwargs}
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only, **hub_kw)
        model = _model_class(config).from_pretrained(source, local_files_only=local_only, **kwargs)
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_only, **hub_kw)
    except OSError as err:  # e.g. config cached but weights not
        if Path(source).is_dir():
            missing = _missing_files(Path(source))
            raise FileNotFoundError(
                f"could not load the local checkpoint {source}: {err}. "
                + (f"It lacks {', '.join(missing)}." if missing else "")
                + " Copy the complete save_pretrained folder there."
            ) from err
        raise FileNotFoundError(
            f"could not load {source!r} from {'the local cache' if local_only else 'the hub'}: {err}. "
            f"Download the full checkpoint (`huggingface-cli download {source}`) or pass a local directory."
        ) from err
    return model, processor
