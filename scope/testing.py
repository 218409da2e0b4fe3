"""Tiny LLaVA / LLaVA-NeXT / Qwen2-VL / Video-LLaVA models and processors built offline from configs, for tests and examples.

Nothing here touches the network: the tokenizer is a word-level vocabulary built in memory, the image
processors are the PIL backends (no torchvision), weights are random but reproducible from ``seed``.
The models are real ``transformers`` classes, so everything :mod:`scope.patch` does to them it does to the
7B checkpoints too; only the sizes differ.

    model, processor = tiny_llava(seed=0)
    inputs = processor(images=tiny_images(1), text=chat_prompt(processor, "what is this ?"), return_tensors="pt")
    model.generate(**inputs, max_new_tokens=4)
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = [
    "WORDS",
    "tiny_tokenizer",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_qwen2_vl",
    "tiny_video_llava",
    "tiny_images",
    "tiny_video",
    "chat_prompt",
]

# a small closed vocabulary: enough for chat prompts, questions and generated text in tests
WORDS = (
    "USER: ASSISTANT: what is in the image ? describe it . a an one two three four red green blue "
    "circle square triangle left right top bottom yes no how many colour shape of and picture this"
).split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]


def tiny_tokenizer(extra_words: tuple[str, ...] = (), extra_special: tuple[str, ...] = ()):
    """A fast word-level tokenizer with ``<image>`` (and ``extra_special``) registered as special tokens, so
    glued copies split (no network).

    Words split on whitespace; unknown words map to ``<unk>``. Padding is on the left, as generation needs.
    """
    from tokenizers import pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for word in (*extra_special, *WORDS, *extra_words):
        vocab.setdefault(word, len(vocab))
    from scope.mini.model import CHAT_TEMPLATE, word_tokenizer  # transformers loads on first use, not import

    tok = word_tokenizer(vocab, pre_tokenizers.WhitespaceSplit(), SPECIAL + list(extra_special))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _build(seed, image_size, patch_size, text_layers, vision_layers, attn_implementation, pinpoints=None):
    """A tiny (random, seeded) model of ``scope.mini.model.llava_config`` and its processor."""
    from transformers import AutoModelForImageTextToText

    from scope.mini.model import llava_config, llava_processor

    tok = tiny_tokenizer()
    config = llava_config(
        tok,
        image_size,
        patch_size,
        vision=(32, 64, vision_layers),
        lm=(32, 64, text_layers, 2),  # grouped-query attention, so the in-LLM code is tested with it
        max_positions=2048,
        tie_embeddings=False,
        grid_pinpoints=pinpoints,
    )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    # ask for the implementation per sub-model, as transformers 5 resolves it per config
    model.set_attn_implementation(attn_implementation)
    return model, llava_processor(tok, image_size, patch_size, pinpoints)


def tiny_llava(
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    text_layers: int = 4,
    vision_layers: int = 3,
    attn_implementation: str = "sdpa",
):
    """A ~40k-parameter ``LlavaForConditionalGeneration`` and its ``LlavaProcessor``, built offline.

    CLIP tower with CLS (strategy "default", feature layer -2): ``(image_size / patch_size) ** 2`` visual
    tokens per image (16 by default). Llama language model with grouped-query attention.
    """
    return _build(seed, image_size, patch_size, text_layers, vision_layers, attn_implementation)


def tiny_llava_next(
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    text_layers: int = 4,
    vision_layers: int = 3,
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None,
    attn_implementation: str = "sdpa",
):
    """A tiny ``LlavaNextForConditionalGeneration`` (anyres) and its ``LlavaNextProcessor``, built offline.

    Crops are ``image_size`` squares (16 tokens each by default); ``grid_pinpoints`` default to 1x2, 2x1
    and 2x2 grids, so an image becomes the base crop plus 2 or 4 grid crops.
    """
    s = image_size
    pinpoints = grid_pinpoints or ((s, 2 * s), (2 * s, s), (2 * s, 2 * s))
    return _build(seed, image_size, patch_size, text_layers, vision_layers, attn_implementation, pinpoints)


# Qwen2-VL's special tokens (the tiny tokenizer's "<image>" plays <|image_pad|>: the processor reads
# tokenizer.image_token); a Qwen-like chat format "USER: <|vision_start|><image><|vision_end|> q ASSISTANT:"
QWEN_SPECIAL = ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><image><|vision_end|>"
    "{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_qwen2_vl(
    seed: int = 0,
    version: str = "2",
    patch_size: int = 4,
    text_layers: int = 2,
    vision_layers: int = 3,
    max_pixels: int = 64 * 64,
    attn_implementation: str = "sdpa",
):
    """A tiny ``Qwen2VLForConditionalGeneration`` (``version="2"``) or ``Qwen2_5_VLForConditionalGeneration``
    (``"2.5"``) and its processor, built offline with the published 7B layouts' structure at toy sizes.

    Native resolution as the real models: an image is resized to multiples of ``2 * patch_size`` (8 px)
    between ``min_pixels = 16 * 16`` and ``max_pixels``, cut into patches, and every 2x2 patch block is merged
    into one visual token: a 32x32 image gives 16 tokens, 48x32 gives 24. M-RoPE with ``mrope_section``
    (2, 3, 3) over a 16-dim head, grouped-query attention (4 heads, 2 key-value heads). Qwen2.5-VL: windowed
    vision attention (windows of 2x2 merged tokens) except in the full-attention blocks 1 and the last.
    """
    import transformers
    from transformers import AutoModelForImageTextToText, Qwen2VLImageProcessorPil

    if version not in ("2", "2.5"):
        raise ValueError(f"version must be '2' or '2.5', got version={version!r}")
    tok = tiny_tokenizer(extra_words=QWEN_SPECIAL)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<image>", *QWEN_SPECIAL)}
    text = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    vision = dict(
        depth=vision_layers, num_heads=4, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2
    )
    if version == "2":
        cls = transformers.Qwen2VLConfig
        vision.update(embed_dim=32, mlp_ratio=2, hidden_size=64)
    else:
        cls = transformers.Qwen2_5_VLConfig
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=4 * patch_size,
                      fullatt_block_indexes=[1, vision_layers - 1])  # fmt: skip
    config = cls(
        text_config=text, vision_config=vision, image_token_id=ids["<image>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    model.set_attn_implementation(attn_implementation)
    factor = 2 * patch_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": (2 * factor) ** 2, "longest_edge": max_pixels},
    )  # fmt: skip
    base = transformers.Qwen2VLProcessor if version == "2" else transformers.Qwen2_5_VLProcessor
    processor = _images_only(base)(image_processor, tok, chat_template=QWEN_CHAT_TEMPLATE)
    return model, processor


def _images_only(base):
    """``base`` (a Qwen-VL processor class) without its video processor, which needs torchvision (not a
    dependency): the tiny models see images only."""

    class ImageOnlyProcessor(base):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"{base.__name__}ImagesOnly"
    return ImageOnlyProcessor


def tiny_video_llava(
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    text_layers: int = 2,
    vision_layers: int = 3,
    attn_implementation: str = "sdpa",
):
    """A tiny ``VideoLlavaForConditionalGeneration`` and its ``VideoLlavaProcessor``, built offline from the
    published config (``data/configs/video-llava-7b``) with only the sizes shrunk.

    Two CLIP towers (image, video), features of layer -2: an image gives ``(image_size / patch_size) ** 2``
    tokens (16 by default, CLS dropped), every video frame that many plus its CLS (17). Prompts use the
    checkpoint's format, ``"USER: <video>\nwhat is in the image ? ASSISTANT:"``. The processor's video part
    runs the image processor frame by frame (the real video processor needs torchvision, not a dependency):
    ``processor(text=..., videos=[tiny_video(4)], return_tensors="pt")``.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, CLIPImageProcessorPil

    from scope.paths import CONFIGS_DIR

    tok = tiny_tokenizer(extra_special=("<video>",))
    config = AutoConfig.from_pretrained(CONFIGS_DIR / "video-llava-7b")
    v, t = config.vision_config, config.text_config
    for key, value in dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                           num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                           projection_dim=32).items():  # fmt: skip
        setattr(v, key, value)
    for key, value in dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id).items():  # fmt: skip
        setattr(t, key, value)
    config.image_token_id = tok.convert_tokens_to_ids("<image>")
    config.video_token_id = tok.convert_tokens_to_ids("<video>")
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).float().eval()  # the config says bfloat16
    model.set_attn_implementation(attn_implementation)
    crop = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    frames = CLIPImageProcessorPil(**crop, do_center_crop=True)
    processor_cls, video_processor = _frame_video_processor(frames)
    processor = processor_cls(
        image_processor=frames, video_processor=video_processor, tokenizer=tok,
        patch_size=patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    return model, processor


def _frame_video_processor(frames):
    """(a ``VideoLlavaProcessor`` subclass, a video processor running the image processor ``frames`` on
    every frame): transformers' own video processors need torchvision, which is not a dependency."""
    import transformers
    from transformers.video_processing_utils import VideoProcessorMixin

    class FrameVideoProcessor(VideoProcessorMixin):
        def __init__(self, frames):
            super().__init__()
            self.frames = frames

        def preprocess(self, videos, return_tensors=None, **kwargs):
            clips = [self.frames(list(v), return_tensors="pt")["pixel_values"] for v in videos]
            return transformers.BatchFeature(
                {"pixel_values_videos": torch.stack(clips)}, tensor_type=return_tensors
            )

    class FramesVideoLlavaProcessor(transformers.VideoLlavaProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and isinstance(argument, FrameVideoProcessor):
                return FrameVideoProcessor  # transformers looks video processors up only with torchvision
            return super().check_argument_for_proper_class(argument_name, argument)

    return FramesVideoLlavaProcessor, FrameVideoProcessor(frames)


def tiny_video(n_frames: int = 4, size: tuple[int, int] = (32, 32), seed: int = 0) -> list[Image.Image]:
    """A reproducible clip: ``n_frames`` RGB frames of ``size`` whose bright rectangle moves right by a few
    pixels per frame over a fixed random background."""
    rng = np.random.default_rng(seed)
    w, h = size
    background = rng.integers(0, 96, size=(h, w, 3), dtype=np.uint8)
    colour = rng.integers(160, 256, size=3, dtype=np.uint8)
    y0 = int(rng.integers(0, h // 2))
    out = []
    for f in range(n_frames):
        arr = background.copy()
        x0 = (f * max(1, w // (2 * n_frames))) % (w - w // 3)
        arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = colour
        out.append(Image.fromarray(arr))
    return out


def tiny_images(n: int, size: tuple[int, int] = (32, 32), seed: int = 0) -> list[Image.Image]:
    """``n`` reproducible random RGB images of ``size`` = (width, height), each with a bright rectangle."""
    rng = np.random.default_rng(seed)
    out = []
    w, h = size
    for _ in range(n):
        arr = rng.integers(0, 96, size=(h, w, 3), dtype=np.uint8)
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(160, 256, size=3, dtype=np.uint8)
        out.append(Image.fromarray(arr))
    return out


def chat_prompt(processor, question: str, n_images: int = 1) -> str:
    """The chat-formatted prompt for one user turn with ``n_images`` images and a generation prompt."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
