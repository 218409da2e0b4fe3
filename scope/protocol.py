"""Evaluation protocols: how a question and its images become what the model receives.

Two protocols, one :class:`Protocol` record each in :data:`PROTOCOLS`:

``paper``
    The SCOPE authors' runs: the original LLaVA code (``liuhaotian/llava-v1.5-7b``, ``llava-v1.6-vicuna-7b``)
    under their copy of lmms-eval (its ``llava`` model). Images as LLaVA's ``process_images`` prepares them:
    LLaVA-1.5 (``image_aspect_ratio="pad"``) pads each image to a square filled with the CLIP mean colour
    (``expand2square``) before the CLIP processor, whose centre crop then cuts nothing; LLaVA-NeXT
    (``"anyres"``) picks the crop grid reading ``image_grid_pinpoints`` as (width, height) pairs, where
    transformers reads them as (height, width) (see :func:`width_height_pinpoints`). The prompt is the
    ``vicuna_v1`` conversation (:func:`conversation`). Tasks take the authors' lmms-eval settings (TextVQA
    with OCR tokens, SEED video questions on their first frame, the YAMLs' max new tokens:
    ``Task.authors`` in :mod:`scope.eval.tasks`), and methods the authors' baseline settings
    (:func:`scope.methods.paper_options`).
``hf``
    The checkpoint's own processor and chat template (llava-hf: resize the short side then centre-crop, no
    system prompt), and the tasks as current lmms-eval sets them.

:func:`resolve_protocol` picks ``paper`` for real checkpoints (hub ids, local folders outside the
repository's ``data/``) and ``hf`` for the embedded MiniLLaVA models, whose own processor and template are
the ones they were trained with (there is no separate "embedded" protocol: ``hf`` is "the checkpoint's
own"), and for in-memory models without a name (the tiny test models).

Qwen2-VL / Qwen2.5-VL (native-resolution processors, :func:`native_resolution`): the authors ran them through
lmms-eval's ``qwen2_vl`` model, which sends the checkpoint's own chat template (its default system prompt,
the images in front of the question in one user turn) and the processor's resize between ``min_pixels`` and
``max_pixels`` (3136 and 12845056, the checkpoints' own). So under ``paper`` a Qwen processor gets its chat
template and its images as they are; only the task settings (``Task.authors``) are the authors'. The pixel
limits are run options (:func:`pixel_limits`, :func:`limited_pixels`). What lmms-eval does differently and we
do not: it resizes with ``qwen_vl_utils`` (PIL bicubic) before the processor, and recent versions re-encode
every image as JPEG (quality 75) first; see docs/qwen2vl.md.

    from scope.protocol import resolve_protocol, build_prompt, prepare_images, applied
    p = resolve_protocol("llava-hf/llava-1.5-7b-hf")                         # PAPER
    with applied(processor, model, p):
        text = build_prompt(processor, question, len(images), p)
        inputs = processor(images=prepare_images(processor, images, p), text=[text], return_tensors="pt")
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "VICUNA_V1_SYSTEM",
    "Protocol",
    "PAPER",
    "HF",
    "PROTOCOLS",
    "get_protocol",
    "resolve_protocol",
    "is_embedded",
    "expand_to_square",
    "mean_fill",
    "conversation",
    "build_prompt",
    "prepare_images",
    "width_height_pinpoints",
    "applied",
    "native_resolution",
    "pixel_limits",
    "limited_pixels",
    "run_options",
    "model_inputs",
    "format_inputs",
]

# LLaVA's conversation.py, conv_vicuna_v1 (the template lmms-eval's llava model uses by default)
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Protocol:
    """How one protocol prepares inputs (see the module docstring for what each one reproduces)."""

    name: str
    summary: str
    pad_to_square: bool  # single-crop models: expand to a square in the processor's mean colour first
    system: str | None  # the vicuna_v1 conversation with this system prompt; None: the chat template
    width_height_pinpoints: bool  # anyres models: read image_grid_pinpoints as the original LLaVA-NeXT
    authors: bool  # the authors' task settings (Task.authors) and baseline options (paper_options)


PAPER = Protocol(
    "paper",
    "the authors' pipeline: LLaVA with mean-colour square padding / original anyres grid and the vicuna_v1 "
    "conversation; Qwen-VL with its own chat template and pixel limits",
    pad_to_square=True,
    system=VICUNA_V1_SYSTEM,
    width_height_pinpoints=True,
    authors=True,
)
HF = Protocol(
    "hf",
    "the checkpoint's own processor and chat template",
    pad_to_square=False,
    system=None,
    width_height_pinpoints=False,
    authors=False,
)
PROTOCOLS = {p.name: p for p in (PAPER, HF)}


def get_protocol(protocol: str | Protocol) -> Protocol:
    """The :class:`Protocol` named ``protocol`` ("paper", "hf"); a record is returned as it is."""
    if isinstance(protocol, Protocol):
        return protocol
    key = str(protocol).strip().lower()
    if key not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is unknown; choose from {sorted(PROTOCOLS)}")
    return PROTOCOLS[key]


def is_embedded(model_id: str | Path | None) -> bool:
    """Whether ``model_id`` is a checkpoint folder inside the repository's ``data/`` (MiniLLaVA, -NeXT)."""
    from scope import paths

    if model_id is None or not str(model_id).strip():
        return False
    path = Path(str(model_id)).expanduser()
    return path.exists() and path.resolve().is_relative_to(Path(paths.DATA_DIR).resolve())


def resolve_protocol(model_id: str | Path | None = None, protocol: str | Protocol | None = None) -> Protocol:
    """``protocol`` when given; else ``paper`` for a real checkpoint, ``hf`` for the embedded models and for a
    model without a name (``model_id`` None or "")."""
    if protocol is not None:
        return get_protocol(protocol)
    if model_id is None or not str(model_id).strip() or is_embedded(model_id):
        return HF
    return PAPER


# ----------------------------------------------------------------------------------------------------------
# images


def expand_to_square(image, fill: Sequence[int]):
    """``image`` centred on a square of side max(width, height) filled with ``fill`` (LLaVA's expand2square:
    the offset of the shorter side is rounded down)."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), tuple(fill))
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def mean_fill(image_processor: Any) -> tuple[int, ...]:
    """The padding colour LLaVA uses: the processor's normalisation mean in 0-255, rounded down."""
    return tuple(int(x * 255) for x in image_processor.image_mean)


def _image_processor(processor: Any) -> Any:
    return getattr(processor, "image_processor", processor)


def _anyres(processor: Any) -> bool:
    return getattr(_image_processor(processor), "image_grid_pinpoints", None) is not None


def native_resolution(processor: Any) -> bool:
    """Whether ``processor`` cuts images at (close to) their own size into merged patch tokens, as the
    Qwen2-VL / Qwen2.5-VL processors do (an image processor with ``merge_size`` and ``temporal_patch_size``)."""
    ip = _image_processor(processor)
    return (
        getattr(ip, "merge_size", None) is not None and getattr(ip, "temporal_patch_size", None) is not None
    )


def pixel_limits(processor: Any) -> dict[str, int] | None:
    """``{"min_pixels", "max_pixels"}`` a native-resolution processor resizes every image between (its
    ``size`` shortest / longest edge, in pixels of area); None for other processors."""
    if not native_resolution(processor):
        return None
    size = _image_processor(processor).size
    return {"min_pixels": int(size["shortest_edge"]), "max_pixels": int(size["longest_edge"])}


@contextlib.contextmanager
def limited_pixels(processor: Any, min_pixels: int | None = None, max_pixels: int | None = None):
    """Within the block, a native-resolution processor resizes images to at least ``min_pixels`` and at most
    ``max_pixels`` pixels of area (either None: as configured); restored afterwards. Raises ValueError for
    a processor without pixel limits or for bad values, naming them."""
    if min_pixels is None and max_pixels is None:
        yield
        return
    limits = pixel_limits(processor)
    if limits is None:
        raise ValueError(
            f"min_pixels / max_pixels apply to native-resolution (Qwen-VL) processors only, not to "
            f"{type(processor).__name__} (got min_pixels={min_pixels!r}, max_pixels={max_pixels!r})"
        )
    lo = limits["min_pixels"] if min_pixels is None else min_pixels
    hi = limits["max_pixels"] if max_pixels is None else max_pixels
    for name, v in (("min_pixels", lo), ("max_pixels", hi)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
    if lo > hi:
        raise ValueError(f"min_pixels={lo} is larger than max_pixels={hi}")
    ip = _image_processor(processor)
    saved = ip.size
    if dataclasses.is_dataclass(saved):  # transformers' SizeDict
        ip.size = dataclasses.replace(saved, shortest_edge=lo, longest_edge=hi)
    else:
        ip.size = {**saved, "shortest_edge": lo, "longest_edge": hi}
    try:
        yield
    finally:
        ip.size = saved


def prepare_images(processor: Any, images: Sequence[Any], protocol: str | Protocol) -> list:
    """What the protocol does to each image before the processor: ``paper`` pads single-crop models' images to
    a mean-coloured square; anyres and native-resolution (Qwen) images and ``hf`` go to the processor as they
    are."""
    p = get_protocol(protocol)
    if not p.pad_to_square or _anyres(processor) or native_resolution(processor):
        return list(images)
    fill = mean_fill(_image_processor(processor))
    return [expand_to_square(im, fill) for im in images]


def width_height_pinpoints(pinpoints: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each pair swapped, the order kept.

    The original LLaVA-NeXT reads a pinpoint as (width, height), transformers as (height, width). With the
    llava-hf list (both orientations of every grid) the set is the same either way, but ties go to the first
    match: an image no larger than one crop on either side fits 1x2 and 2x1 grids equally, and the original
    takes the tall one (336 wide x 672 high) where transformers takes the wide one. Handing transformers the
    pairs swapped makes it choose, count and unpad exactly the original's grid.
    """
    return [[int(b), int(a)] for a, b in pinpoints]


_SWAPPED: set[int] = set()  # objects whose pinpoints `applied` has swapped (a nested call leaves them)


@contextlib.contextmanager
def applied(processor: Any, model: Any = None, protocol: str | Protocol = HF) -> Iterator[None]:
    """Within the block, the processor (and the model, when given) select anyres grids as ``protocol`` says;
    both are restored afterwards. Nothing changes for ``hf`` or for single-crop models."""
    p = get_protocol(protocol)
    targets = [_image_processor(processor), getattr(model, "config", None)]
    targets = [
        t for t in targets if getattr(t, "image_grid_pinpoints", None) is not None and id(t) not in _SWAPPED
    ]
    if not p.width_height_pinpoints or not targets:
        yield
        return
    saved = [(t, t.image_grid_pinpoints) for t in targets]
    for t, pins in saved:
        t.image_grid_pinpoints = width_height_pinpoints(pins)
        _SWAPPED.add(id(t))
    try:
        yield
    finally:
        for t, pins in saved:
            t.image_grid_pinpoints = pins
            _SWAPPED.discard(id(t))


# ----------------------------------------------------------------------------------------------------------
# prompts


def conversation(
    question: str, n_images: int = 1, system: str = VICUNA_V1_SYSTEM, image_token: str = "<image>"
) -> str:
    """One user turn of LLaVA's vicuna_v1 conversation, as lmms-eval's llava model builds it: the image
    tokens (joined by spaces) and a newline in front of the question, then
    ``system + " USER: " + message + " ASSISTANT:"`` (SeparatorStyle.TWO with sep " ")."""
    message = " ".join([image_token] * n_images) + "\n" + question if n_images else question
    return f"{system} USER: {message} ASSISTANT:"


def build_prompt(processor: Any, question: str, n_images: int = 1, protocol: str | Protocol = HF) -> str:
    """The prompt text for one question with ``n_images`` images in front of it.

    ``paper``: :func:`conversation`, except for a native-resolution (Qwen) processor, which gets its chat
    template as lmms-eval's ``qwen2_vl`` model sends it. ``hf``: the processor's chat template (llava-hf
    checkpoints and the embedded models ship one); without a template, LLaVA-1.5's
    ``USER: <image>\\n{question} ASSISTANT:``.
    """
    p = get_protocol(protocol)
    token = getattr(processor, "image_token", "<image>")
    if p.system is not None and not native_resolution(processor):
        return conversation(question, n_images, p.system, token)
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
    return "USER: " + f"{token}\n" * n_images + f"{question} ASSISTANT:"


def run_options(
    protocol: str | Protocol, method: str | None, budget: int | None, model: Any, options: dict | None = None
) -> dict:
    """The method options a run uses: under ``paper`` the authors' settings for the model's family
    (:func:`scope.methods.paper_options`, empty for the families whose authors' code is not published)
    overridden by ``options``; otherwise ``options`` as given."""
    from scope.methods import get_method, is_unpruned, paper_options

    options = dict(options or {})
    if not get_protocol(protocol).authors or method is None or is_unpruned(method):
        return options
    family = getattr(getattr(model, "config", None), "model_type", "llava")
    return {**paper_options(get_method(method).name, budget, family), **options}


# ----------------------------------------------------------------------------------------------------------
# what the model sees (python -m scope.eval --show-prompts)


def model_inputs(processor: Any, question: str, images: Sequence[Any], protocol: str | Protocol) -> dict:
    """What the model receives for one question under ``protocol``, computed with the processor alone.

    Returns ``text`` (the prompt after the conversation / chat template), ``image_tokens`` (image
    placeholders in the tokenized prompt), and per image ``original`` and ``prepared`` sizes (width, height;
    ``prepared`` after the protocol's own step, e.g. square padding), ``grid`` (anyres: the chosen
    resolution as width x height and the crop count, base image included), ``native`` (native-resolution
    processors: the resized width x height, the patch grid (t, h, w) and the merged tokens) and ``pixels``
    (the shape of one crop's pixel tensor; native resolution: the image's rows of patch pixels).
    """
    p = get_protocol(protocol)
    with applied(processor, None, p):
        text = build_prompt(processor, question, len(images), p)
        prepared = prepare_images(processor, images, p)
        inputs = processor(images=prepared or None, text=[text], return_tensors="pt")
        per_image = [
            {"original": im.size, "prepared": pim.size, **_layout(processor, inputs, i, pim)}
            for i, (im, pim) in enumerate(zip(images, prepared))
        ]
    token = getattr(processor, "image_token", None)
    tid = processor.tokenizer.convert_tokens_to_ids(token) if token is not None else None
    n_tokens = int((inputs["input_ids"] == tid).sum()) if tid is not None else None
    return {"text": text, "image_tokens": n_tokens, "images": per_image}


def _layout(processor: Any, inputs: Any, i: int, image: Any) -> dict:
    """How image ``i`` (``image`` as prepared) was cut: anyres grid, native-resolution grid, pixel shape."""
    ip = _image_processor(processor)
    if native_resolution(processor):
        t, h, w = (int(x) for x in inputs["image_grid_thw"][i])
        tokens = t * h * w // ip.merge_size**2
        size = (w * ip.patch_size, h * ip.patch_size)
        return {"native": (size, (t, h, w), tokens), "pixels": (t * h * w, inputs["pixel_values"].shape[-1])}
    out: dict[str, Any] = {"pixels": tuple(inputs["pixel_values"].shape[-3:])}
    pinpoints = getattr(ip, "image_grid_pinpoints", None)
    if pinpoints is not None:
        from transformers.image_processing_utils import select_best_resolution

        crop = ip.crop_size["height"]
        h, w = select_best_resolution((image.size[1], image.size[0]), pinpoints)
        out["grid"] = ((w, h), 1 + (w // crop) * (h // crop))
    return out


def format_inputs(header: str, inputs: dict) -> str:
    """:func:`model_inputs` as printed lines: the text JSON-quoted (every space and newline visible)."""
    lines = [header, f"  text: {json.dumps(inputs['text'], ensure_ascii=False)}"]
    for i, im in enumerate(inputs["images"], 1):
        (w0, h0), (w1, h1) = im["original"], im["prepared"]
        step = f" -> padded {w1}x{h1}" if (w1, h1) != (w0, h0) else ""
        if "grid" in im:
            (gw, gh), n = im["grid"]
            step += f" -> anyres grid {gw}x{gh}, {n} crops (base + {n - 1})"
        pixels = "x".join(str(s) for s in im["pixels"])
        if "native" in im:
            (rw, rh), (t, gh, gw), n = im["native"]
            step += f" -> resized {rw}x{rh}, patch grid {t}x{gh}x{gw} -> {n} merged tokens"
            lines.append(f"  image {i}: {w0}x{h0}{step} (pixels {pixels})")
            continue
        lines.append(f"  image {i}: {w0}x{h0}{step} -> pixels {pixels} per crop")
    lines.append(f"  image tokens in the prompt: {inputs['image_tokens']}")
    return "\n".join(lines)
