"""How a conversation and its image reach MiniLLaVA's language model during training and evaluation.

``Seq`` builds the token ids of LLaVA-1.5's multi-turn format directly (the ids the chat template gives),
``embed_images`` projects cached tower features into image tokens (packed anyres tokens for LLaVA-NeXT) and
``lm_forward`` runs the LM with them in the ``<image>`` slots.
"""

from __future__ import annotations

import numpy as np
import torch

from scope.mini.labels import C_LIST, S_LIST
from scope.mini.model import N_PATCHES, split_words
from scope.mini.next import NEXT_SIZES
from scope.mini.synthbench import LETTERS

RELATIONS = ("left", "right", "above", "below")


class Seq:
    """Token ids of the LLaVA-1.5 conversation format, built directly (same ids as the chat template)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        v = tokenizer.get_vocab()
        self.v = v
        self.bos, self.eos, self.pad = v["<s>"], v["</s>"], v["<pad>"]
        self.user, self.asst, self.colon, self.img = v["USER"], v["ASSISTANT"], v[":"], v["<image>"]
        self.names = {v[w] for w in [*C_LIST, *S_LIST, *(x + "s" for x in S_LIST)] if w in v}  # name words
        self.letters = {v[w] for w in LETTERS if w in v}
        self.relations = {v[w] for w in RELATIONS if w in v}
        self.qmark, self.dot = v.get("?", -1), v.get(".", -1)

    def words(self, text: str) -> list[int]:
        """Token ids of ``text``'s words (``<unk>`` for a word outside the vocabulary)."""
        return [self.v.get(w, self.v["<unk>"]) for w in split_words(text)]

    def build(self, qas: list[dict], n_image: int = N_PATCHES) -> tuple[list[int], list[int]]:
        """ids, labels (-100 except answers and their </s>) for a multi-turn conversation about one image.

        Same ids as the chat template: ``<s> USER : <image>*N q1 ASSISTANT : a1 </s> USER : q2 ASSISTANT : ...``
        """
        ids, labels, _, _ = self.build_with_positions(qas, n_image)
        return ids, labels

    def build_with_positions(self, qas: list[dict], n_image: int = N_PATCHES):
        """``build`` plus the first image position and the position that predicts each answer."""
        ids, labels, qpos, img_start = [self.bos], [-100], [], 3
        for t, qa in enumerate(qas):
            q = [self.user, self.colon] + ([self.img] * n_image if t == 0 else [])
            q += self.words(qa["question"]) + [self.asst, self.colon]
            a = self.words(qa["answer"]) + [self.eos]
            qpos.append(len(ids) + len(q) - 1)
            ids += q + a
            labels += [-100] * len(q) + a
        return ids, labels, img_start, qpos


def embed_images(model, feats: torch.Tensor) -> torch.Tensor:
    """Projected image tokens as the model places them: [B, 576, D] (LLaVA) or packed anyres (NeXT).

    ``feats`` are layer -2 tower features without CLS: [B, 576, d], or [B, crops, 576, d] for LLaVA-NeXT.
    """
    proj = model.model.multi_modal_projector(feats)
    if feats.dim() == 3:
        return proj
    packed = [
        model.model.pack_image_features([p], NEXT_SIZES, "default", image_newline=model.model.image_newline)[
            0
        ][0]
        for p in proj
    ]
    return torch.stack(packed)


def lm_forward(
    model, image_embeds: torch.Tensor, ids: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Hidden states of the LM with projected image tokens written into the placeholder slots.

    ``position_ids`` [B, L] (default 0..L-1 in every row, as at inference) lets training move the text away from
    the image (``text_gaps``).
    """
    emb = model.model.language_model.embed_tokens(ids)
    img_mask = ids == model.config.image_token_index
    emb = emb.masked_scatter(img_mask[..., None], image_embeds.to(emb.dtype))  # [B, N, D] or [sum N_i, D]
    return model.model.language_model(inputs_embeds=emb, position_ids=position_ids).last_hidden_state


def text_gaps(
    lengths: list[int], image_ends: list[int], max_gap: int, share: float, rng: np.random.Generator
) -> torch.Tensor:
    """Position ids [B, max(lengths)] with the text after each row's image moved ``gap`` positions further on.

    A ``share`` of the rows gets a gap drawn uniformly from 0..``max_gap``, the others none. LLaVA-NeXT packs
    2352 grid tokens between the base crop and the question, so a MiniLLaVA whose LM only ever saw the
    question right after the image reads the base crop from distances it never trained on (shifting the
    question's positions by 2352 took the shipped MiniLLaVA's validation accuracy from 0.85 to 0.35). Relative
    positions are all RoPE sees, so training with gaps teaches the LM to find the image at any distance.
    """
    pos = torch.arange(max(lengths)).repeat(len(lengths), 1)
    for b, end in enumerate(image_ends):
        if rng.random() < share:
            pos[b, end:] += int(rng.integers(0, max_gap + 1))
    return pos


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """[len(rows), longest row] tensor of the rows, each right-padded with ``value``."""
    n = max(map(len, rows))
    return torch.tensor([r + [value] * (n - len(r)) for r in rows])
