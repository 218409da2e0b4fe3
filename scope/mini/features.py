"""Layer -2 features of the trained tower, extracted once (bf16) for stage 2 and for evaluation."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from scope.mini.labels import patch_labels, scene_batch
from scope.mini.model import N_PATCHES
from scope.mini.next import NEXT_CROPS, NEXT_IMAGE_SIZE, NEXT_SIZES
from scope.mini.scenes import make_scene, render
from scope.mini.tower import tower_hidden


@torch.no_grad()
def extract_features(model, seeds, batch: int = 32, desc: str = "features", with_masks: bool = False):
    """Layer -2 patch features (CLS dropped) for each seed's scene, bf16 [P, 576, d].

    ``with_masks`` also returns the patch owners ([P, 576]: 1 + object index, 0 = background) for stage 2.
    """
    tower = model.model.vision_tower
    out, masks = [], []
    for i in tqdm(range(0, len(seeds), batch), desc=desc):
        _, px, dense, _ = scene_batch(seeds[i : i + batch])
        masks.append(dense[:, 5].to(torch.int16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.append(tower_hidden(tower, px)[:, 1:].to(torch.bfloat16))
    return (torch.cat(out), torch.cat(masks)) if with_masks else torch.cat(out)


@torch.no_grad()
def extract_next_features(
    model, processor, seeds, batch: int = 8, desc: str = "features", with_masks: bool = False
):
    """Layer -2 features of the 5 anyres crops of each 384 px scene, bf16 [P, 5, 576, d].

    ``with_masks`` also returns the patch owners in the packed order the LM sees ([P, 2928]: the base crop,
    then the 48 x 48 grid row by row with 0 at each ``image_newline``), for the stage-2 attention targets.
    """
    out, masks = [], []
    for i in tqdm(range(0, len(seeds), batch), desc=desc):
        scenes = [make_scene(int(s)) for s in seeds[i : i + batch]]
        rendered = [render(sc, NEXT_IMAGE_SIZE, with_ids=True) for sc in scenes]
        px = processor.image_processor([im for im, _ in rendered], return_tensors="pt")["pixel_values"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = tower_hidden(model.model.vision_tower, px.flatten(0, 1))[:, 1:]
        out.append(h.to(torch.bfloat16).view(len(scenes), px.shape[1], N_PATCHES, -1))
        if with_masks:
            masks += [packed_owners(model, sc, ids) for sc, (_, ids) in zip(scenes, rendered)]
    feats = torch.cat(out)
    return (feats, torch.stack(masks)) if with_masks else feats


def packed_owners(model, scene, ids: np.ndarray) -> torch.Tensor:
    """[2928] patch owners of a scene's anyres crops, packed as ``pack_image_features`` packs the tokens."""
    crops = torch.from_numpy(np.stack([patch_labels(scene, ids, box)[5] for box in NEXT_CROPS]))
    packed = model.model.pack_image_features(
        [crops[..., None].float()], NEXT_SIZES, "default", image_newline=torch.zeros(1)
    )[0][0]
    return packed[:, 0].round().to(torch.int16)
