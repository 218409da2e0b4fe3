"""MiniLLaVA-NeXT: the LLaVA-NeXT (anyres) version of MiniLLaVA, initialised from it.

A 384 px SynthBench image becomes a 192 px base crop plus a 2x2 grid of 192 px crops, i.e. 5 x 576 tower
tokens; ``pack_image_features`` keeps the base tokens first, reassembles the grid (48 x 48) and appends one
learned ``image_newline`` per grid row: 576 + 48 * 49 = 2928 tokens reach the language model. The tower,
projector and language model start from MiniLLaVA and keep training on these multi-crop inputs, so the grid
crops (twice the resolution) can recover small shapes and digits.
"""

from __future__ import annotations

import torch
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)

from scope.mini.model import IMAGE_SIZE, PATCH_SIZE, llava_processor

NEXT_IMAGE_SIZE = 2 * IMAGE_SIZE  # SynthBench renders for NeXT at 384 px
GRID_PINPOINTS = [
    [IMAGE_SIZE, 2 * IMAGE_SIZE],
    [2 * IMAGE_SIZE, IMAGE_SIZE],
    [2 * IMAGE_SIZE, 2 * IMAGE_SIZE],
]
NEXT_SIZES = torch.tensor([[NEXT_IMAGE_SIZE, NEXT_IMAGE_SIZE]])  # image_sizes of one 384 px anyres image
# The 5 crops of a 384 px scene in the processor's order: the whole scene (base crop, downsampled), then the
# 2x2 grid of full-resolution crops as (x0, y0, size) boxes of the render.
NEXT_CROPS = [
    None,
    *((x, y, IMAGE_SIZE) for y in (0, IMAGE_SIZE) for x in (0, IMAGE_SIZE)),
]


def build_next_processor(tokenizer) -> LlavaNextProcessor:
    """LlavaNextProcessor over the MiniLLaVA tokenizer: 192 px crops, anyres pinpoints up to 384 x 384."""
    return llava_processor(tokenizer, IMAGE_SIZE, PATCH_SIZE, GRID_PINPOINTS)


def next_from_mini(mini) -> LlavaNextForConditionalGeneration:
    """A LlavaNextForConditionalGeneration with MiniLLaVA's tower, projector and LM; image_newline = 0."""
    c = mini.config
    config = LlavaNextConfig(
        vision_config=c.vision_config.to_dict(),
        text_config=c.text_config.to_dict(),
        image_token_index=c.image_token_index,
        vision_feature_layer=c.vision_feature_layer,
        vision_feature_select_strategy=c.vision_feature_select_strategy,
        projector_hidden_act=c.projector_hidden_act,
        image_grid_pinpoints=GRID_PINPOINTS,
        image_seq_length=c.image_seq_length,
        tie_word_embeddings=True,
    )
    model = LlavaNextForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(mini.float().state_dict(), strict=False)
    if unexpected or set(missing) - {"model.image_newline"}:
        raise ValueError(f"weights do not map onto LLaVA-NeXT: missing={missing}, unexpected={unexpected}")
    with torch.no_grad():
        model.model.image_newline.zero_()
    return model.eval()
