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


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """LlavaProcessor: 192 px CLIP-normalised images, 576 placeholders (CLS is dropped by the model)."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(
    tokenizer: PreTrainedTokenizerFast,
    vision_layers: int = 4,
    vision_width: int = 128,
    lm_layers: int = 4,
    lm_width: int = 256,
) -> LlavaConfig:
    """LLaVA-1.5-shaped config at toy width (see the model card for the chosen sizes)."""
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=lm_width,
        intermediate_size=int(2.75 * lm_width),
        num_hidden_layers=lm_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=N_PATCHES,
        tie_word_embeddings=True,
    )


def build_model(config: LlavaConfig, seed: int = 0) -> LlavaForConditionalGeneration:
    import torch

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()
