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
    "CHAT_TEMPLATE",
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

# LLaVA-1.5 style conversation: "USER: <image>\n<text> ASSISTANT:"; content may be a string or a list of
# {"type": "image"} / {"type": "text", "text": ...} parts, as processor.apply_chat_template expects.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_tokenizer(extra_words: tuple[str, ...] = ()):
    """A fast word-level tokenizer with ``<image>`` registered as a special token (no network).

    Words split on whitespace; unknown words map to ``<unk>``. Padding is on the left, as generation needs.
    """
    from tokenizers import pre_tokenizers

    from scope.mini.model import word_tokenizer

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for word in (*WORDS, *extra_words):
        vocab.setdefault(word, len(vocab))
    tok = word_tokenizer(vocab, pre_tokenizers.WhitespaceSplit(), SPECIAL)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _configs(seed_vocab: int, image_size: int, patch_size: int, text_layers: int, vision_layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=seed_vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, so the in-LLM code is tested with it
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return vision, text


def _finish(model, attn_implementation: str):
    model.eval()
    # ask for the implementation per sub-model, as transformers 5 resolves it per config
    model.set_attn_implementation(attn_implementation)
    return model


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
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tiny_tokenizer()
    vision, text = _configs(len(tok), image_size, patch_size, text_layers, vision_layers)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = _finish(LlavaForConditionalGeneration(config), attn_implementation)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS the "default" strategy drops
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


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
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    s = image_size
    pinpoints = [list(p) for p in (grid_pinpoints or ((s, 2 * s), (2 * s, s), (2 * s, 2 * s)))]
    tok = tiny_tokenizer()
    vision, text = _configs(len(tok), image_size, patch_size, text_layers, vision_layers)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_grid_pinpoints=pinpoints,
    )
    torch.manual_seed(seed)
    model = _finish(LlavaNextForConditionalGeneration(config), attn_implementation)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


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
