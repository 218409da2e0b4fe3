"""MiniLLaVA building blocks: offline word-level tokenizer, processor with chat template, model configs.

Nothing here downloads anything: the tokenizer vocabulary is the closed SynthBench vocabulary, the image
processor is ``CLIPImageProcessorPil`` (no torchvision) and the model is a randomly initialised
``LlavaForConditionalGeneration`` -- a CLIP-style ViT (CLS + 24x24 patches at 192 px / patch 8, features
from layer -2), the LLaVA MLP projector and a small Llama.
"""

from __future__ import annotations

import numpy as np
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from scope.mini.scenes import COLORS, DIGITS, SHAPES, make_scene
from scope.mini.synthbench import FAMILIES, LETTERS, make_question

SPECIAL = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
IMAGE_SIZE = 192
PATCH_SIZE = 8
N_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576, as LLaVA-1.5
# LLaVA-1.5's conversation format: "USER: <image>\n{question} ASSISTANT: {answer}</s>" (image parts first, as
# llava-hf's template). Newlines are whitespace to the word-level tokenizer, so they produce no token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{{ '\\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_PRE = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+ : "image?" -> "image", "?"


def split_words(text: str) -> list[str]:
    """The words of ``text`` as the word-level tokenizer splits it (``"image?"`` -> ``"image"``, ``"?"``)."""
    return [w for w, _ in _PRE.pre_tokenize_str(text)]


def build_vocab(n_scenes: int = 3000) -> list[str]:
    """Closed vocabulary: every word the question generator can emit (sampled widely) plus answer words."""
    words: set[str] = {"USER", "ASSISTANT", ":", "\n"} - {"\n"}
    words |= set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(DIGITS) | set(LETTERS)
    words |= {str(i) for i in range(10)} | {"yes", "no", "left", "right", "above", "below"}
    for seed in range(n_scenes):
        rng = np.random.default_rng(seed)
        scene = make_scene(seed)
        for family in FAMILIES:
            words |= set(split_words(make_question(scene, family, rng)["question"]))
    return SPECIAL + sorted(words)


def word_tokenizer(
    vocab: dict[str, int], pre_tokenizer, special: list[str], post_processor=None, **kwargs
) -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer built offline: ``<unk>``/``<pad>``/``<s>``/``</s>`` and ``<image>`` as
    special, unnormalised tokens (the processor glues N copies ``<image><image>...`` without spaces), left
    padding as generation needs. Shared by MiniLLaVA and the tiny test models of ``scope.testing``."""
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizer
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if post_processor is not None:
        core.post_processor = post_processor
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        **kwargs,
    )


def build_tokenizer(vocab: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (BOS prepended, ``<image>`` a special token so glued copies split)."""
    vocab = vocab or build_vocab()
    bos = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab.index("<s>"))]
    )
    ids = {w: i for i, w in enumerate(vocab)}
    return word_tokenizer(ids, _PRE, SPECIAL, post_processor=bos, model_max_length=4096)


def llava_processor(tokenizer, image_size: int, patch_size: int, grid_pinpoints=None):
    """A LLaVA processor with our chat template: ``LlavaProcessor`` on ``image_size`` px CLIP-normalised
    images, or with ``grid_pinpoints`` a ``LlavaNextProcessor`` on crops of that size (anyres). The one
    builder of MiniLLaVA(-NeXT) and of the tiny test models (:mod:`scope.testing`)."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    crop = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    if grid_pinpoints is None:
        image_processor, cls = CLIPImageProcessorPil(**crop, do_center_crop=True), LlavaProcessor
    else:
        pinpoints = [list(p) for p in grid_pinpoints]
        image_processor = LlavaNextImageProcessorPil(
            **crop, image_grid_pinpoints=pinpoints, do_center_crop=True
        )
        cls = LlavaNextProcessor
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS that the "default" strategy drops
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """LlavaProcessor: 192 px CLIP-normalised images, 576 placeholders (CLS is dropped by the model)."""
    return llava_processor(tokenizer or build_tokenizer(), IMAGE_SIZE, PATCH_SIZE)


def llava_config(
    tokenizer,
    image_size: int,
    patch_size: int,
    vision: tuple[int, int, int] = (128, 512, 4),
    lm: tuple[int, int, int, int] = (256, 704, 4, 4),
    max_positions: int = 4096,
    tie_embeddings: bool = True,
    grid_pinpoints=None,
):
    """A LLaVA-1.5-shaped config (CLIP tower with CLS, features of layer -2, MLP projector, Llama LM): the one
    builder of MiniLLaVA and of the tiny test models.

    vision: (width, MLP width, layers); lm: (width, MLP width, layers, key-value heads), 4 attention heads
    each. ``grid_pinpoints`` makes it a ``LlavaNextConfig`` (anyres crops of ``image_size``).
    """
    from transformers import LlavaNextConfig

    (v_width, v_ffn, v_layers), (width, ffn, layers, kv_heads) = vision, lm
    vision_config = CLIPVisionConfig(
        hidden_size=v_width,
        intermediate_size=v_ffn,
        num_hidden_layers=v_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=v_width,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_embeddings,
    )
    extra = {} if grid_pinpoints is None else {"image_grid_pinpoints": [list(p) for p in grid_pinpoints]}
    return (LlavaConfig if grid_pinpoints is None else LlavaNextConfig)(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(image_size // patch_size) ** 2,
        tie_word_embeddings=tie_embeddings,
        **extra,
    )


def build_config(
    tokenizer: PreTrainedTokenizerFast,
    vision_layers: int = 4,
    vision_width: int = 128,
    lm_layers: int = 4,
    lm_width: int = 256,
) -> LlavaConfig:
    """MiniLLaVA's config at toy width (see the model card for the chosen sizes)."""
    vision = (vision_width, 4 * vision_width, vision_layers)
    lm = (lm_width, int(2.75 * lm_width), lm_layers, 4)
    return llava_config(tokenizer, IMAGE_SIZE, PATCH_SIZE, vision, lm)


def build_model(config: LlavaConfig, seed: int = 0) -> LlavaForConditionalGeneration:
    import torch

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()
