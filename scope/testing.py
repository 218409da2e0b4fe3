"""Tiny LLaVA / LLaVA-NeXT models and processors built offline from configs, for tests and examples.

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
    "tiny_images",
    "chat_prompt",
]

# a small closed vocabulary: enough for chat prompts, questions and generated text in tests
WORDS = (
    "USER: ASSISTANT: what is in the image ? describe it . a an one two three four red green blue "
    "circle square triangle left right top bottom yes no how many colour shape of and picture this"
).split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]


def tiny_tokenizer(extra_words: tuple[str, ...] = ()):
    """A fast word-level tokenizer with ``<image>`` registered as a special token (no network).

    Words split on whitespace; unknown words map to ``<unk>``. Padding is on the left, as generation needs.
    """
    from tokenizers import pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for word in (*WORDS, *extra_words):
        vocab.setdefault(word, len(vocab))
    from scope.mini.model import CHAT_TEMPLATE, word_tokenizer  # transformers loads on first use, not import

    tok = word_tokenizer(vocab, pre_tokenizers.WhitespaceSplit(), SPECIAL)
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
