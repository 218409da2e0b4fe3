"""MiniLLaVA's training code, stage by stage, and a short run of the whole recipe (fast, offline).

``test_short_training_run_gives_the_weights_of_the_reference_code``: ``tests/data/train_short_hashes.json``
holds the sha256 of every tensor after each stage of ``short_run`` (stage 1: the tower; stage 2: the whole
MiniLLaVA; the NeXT stage: the whole MiniLLaVA-NeXT), produced by the code before ``scope/mini/train.py`` was
split by stage (commit bdaaddb). bf16 kernels differ between torch versions and CPU instruction sets, so the
hashes are compared only on the platform that wrote them. Regenerate them (only for a change that is meant to
change the weights) with ``python tests/test_mini_train.py --write``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scope.mini.scenes import make_scene, render
from scope.mini.synthbench import heldout_items

HASHES = Path(__file__).parent / "data" / "train_short_hashes.json"


def _train_lm(model, seq, feats, pool, log, masks, seed: int = 0, **kwargs) -> None:
    """``train_lm`` as these tests run it: attention targets on, a log row every step, no evaluation."""
    from scope.mini.lm import train_lm

    train_lm(
        model, seq, feats, pool, seed=seed, log=log, evaluate_fn=lambda: {}, eval_every=1000, log_every=1,
        masks=masks, ground=1.0, **kwargs,
    )  # fmt: skip


def test_a_few_training_steps_reduce_the_loss():
    from scope.mini.features import extract_features
    from scope.mini.model import build_config, build_model, build_tokenizer, build_vocab
    from scope.mini.sequences import Seq
    from scope.mini.targets import OPTIONAL_READOUTS, READOUTS, TARGET_HEADS
    from scope.mini.tower import train_tower

    torch.manual_seed(0)
    tok = build_tokenizer(build_vocab(n_scenes=100))
    model = build_model(build_config(tok, vision_layers=2, vision_width=32, lm_layers=1, lm_width=32))
    seq = Seq(tok)
    log_rows = []
    log = lambda *row: log_rows.append(row)  # noqa: E731
    train_tower(model, steps=12, batch=4, lr=3e-3, seed=0, log=log, window=6, local=False, warmup=8)
    warm = [r[3]["dense"] for r in log_rows if r[0] == "tower-warmup" and "dense" in r[3]]
    assert len(warm) == 1  # logged every 25 steps: step 0 only
    assert [r[3] for r in log_rows if r[0] == "tower-warmup" and "probe_shape" in r[3]]
    tower_losses = [r[3]["dense"] for r in log_rows if r[0] == "tower" and "dense" in r[3]]
    assert tower_losses[-1] < tower_losses[0]
    probes = [r[3] for r in log_rows if r[0] == "tower" and "probe_colour" in r[3]]
    assert len(probes) == 1 and all(0.0 <= v <= 1.0 for v in probes[0].values())
    pool = np.arange(4)
    feats, masks = extract_features(model, pool, batch=4, with_masks=True)
    assert feats.shape == (4, 576, 32) and masks.shape == (4, 576) and (masks > 0).any()
    log_rows.clear()
    _train_lm(
        model, seq, feats, pool, log, masks, steps=30, batch=4, turns=3, lr=3e-3,
        targets=tuple(TARGET_HEADS),  # the opt-in position heads (--where) too
        readouts=(*READOUTS, *OPTIONAL_READOUTS),
        gap=500,  # half the conversations' text moved up to 500 positions away from the image
    )  # fmt: skip
    lm_losses = [r[3]["loss"] for r in log_rows if r[0] == "lm"]
    assert np.mean(lm_losses[-5:]) < np.mean(lm_losses[:5])
    ground = [r[3]["ground"] for r in log_rows if r[0] == "lm" and "ground" in r[3]]
    assert len(ground) == 30 and all(np.isfinite(g) and g > 0 for g in ground)  # attention targets every step
    # choice and spatial turns come up in most steps
    for kind in (*READOUTS, *OPTIONAL_READOUTS, "where_patch", "relation", "where_a"):
        got = [r[3][f"ground_{kind}"] for r in log_rows if r[0] == "lm" and f"ground_{kind}" in r[3]]
        assert len(got) >= 10 and all(np.isfinite(g) and g > 0 for g in got), kind


def test_training_sequences_match_the_chat_template():
    from scope.mini.model import build_processor, build_tokenizer, build_vocab
    from scope.mini.sequences import Seq

    tok = build_tokenizer(build_vocab(n_scenes=100))
    processor = build_processor(tok)
    qas = [
        {"question": "What colour is the square?", "answer": "red"},
        {"question": "Is there a blue circle in the image? Answer yes or no.", "answer": "no"},
    ]
    messages = []
    for t, qa in enumerate(qas):
        content = ([{"type": "image"}] if t == 0 else []) + [{"type": "text", "text": qa["question"]}]
        messages += [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": qa["answer"]}]},
        ]
    text = processor.apply_chat_template(messages)
    assert text.startswith("USER: <image>\nWhat colour")  # LLaVA-1.5 order: image, then the question
    ids, labels, img_start, qpos = Seq(tok).build_with_positions(qas, n_image=1)
    assert ids == tok(text)["input_ids"]
    assert ids[img_start] == tok.convert_tokens_to_ids("<image>")
    assert [tok.convert_ids_to_tokens(ids[p + 1]) for p in qpos] == ["red", "no"]
    assert [lab for lab in labels if lab != -100] == tok(" red </s> no </s>", add_special_tokens=False)[
        "input_ids"
    ]


def test_patch_labels_of_a_full_resolution_crop():
    from scope.mini.labels import patch_labels

    scene = make_scene(5)
    _, ids = render(scene, 384, with_ids=True)
    whole = patch_labels(scene, ids)
    crop = patch_labels(scene, ids, (0, 0, 192))  # top-left quarter at twice the scale
    assert whole.shape == crop.shape == (9, 576)
    for labels in (whole, crop):
        obj = labels[5] > 0
        assert ((labels[0] > 0) == obj).all() and labels[6][obj].min() >= 1 and labels[6].max() <= 24
    inside = [o for o in scene.objects if o.x < 192 and o.y < 192]
    # every object whose centre is in the crop is marked once, at twice its whole-scene grid coordinates
    assert (crop[4] > 0).sum() == len(inside) and (whole[4] > 0).sum() == len(scene.objects)
    for o in inside:
        k = scene.objects.index(o) + 1
        assert abs(int(np.median(crop[6][crop[5] == k])) - 2 * int(np.median(whole[6][whole[5] == k]))) <= 2


def test_ink_labels_mark_the_patches_that_see_each_digit():
    from scope.mini.labels import patch_labels
    from scope.mini.scenes import DIGITS, glyph_box

    for seed in range(6):
        scene = make_scene(seed)
        _, ids = render(scene, 384, with_ids=True)
        whole, crop = patch_labels(scene, ids), patch_labels(scene, ids, (96, 96, 192))
        for k, o in enumerate(scene.objects, start=1):
            ink = (whole[8] > 0) & (whole[5] == k)
            if not o.glyph:
                assert not ink.any()
                continue
            # a digit covers a few patches of its own object, all labelled with it, never all of the object
            assert 2 <= ink.sum() < (whole[5] == k).sum()
            assert (whole[8][ink] == 1 + DIGITS.index(o.glyph)).all()
            x0, y0, x1, y1 = glyph_box(o)
            if 96 <= x0 and x1 <= 288 and 96 <= y0 and y1 <= 288:  # wholly inside the crop: twice the scale
                assert ((crop[8] > 0) & (crop[5] == k)).sum() >= 2 * ink.sum()
        assert ((whole[8] > 0) <= (whole[5] > 0)).all()  # ink only on objects


def test_glyph_head_ink_term_is_the_mean_loss_over_ink_patches():
    import torch.nn.functional as F

    from scope.mini.labels import scene_batch
    from scope.mini.tower import TowerHeads

    torch.manual_seed(0)
    _, _, dense, cls = scene_batch([3, 4])
    hidden = torch.randn(2, 577, 32)
    plain, inked = TowerHeads(32), TowerHeads(32, ink=2.0)
    inked.load_state_dict(plain.state_dict())
    logits = plain.dense[3](plain.norm_patch(hidden[:, 1:])).flatten(0, 1)
    ink = dense[:, 8].flatten()
    expected = 2.0 * F.cross_entropy(logits[ink > 0], ink[ink > 0])
    diff = inked.loss(hidden, dense, cls)["dense"] - plain.loss(hidden, dense, cls)["dense"]
    assert torch.allclose(diff, expected, atol=1e-5) and expected > 0
    assert "probe_ink" in plain.probe_accuracy(hidden, dense)


def test_pca_patch_init_whitens_patches_and_keeps_the_position_channels():
    from scope.mini.labels import VAL_SEED_BASE, scene_batch
    from scope.mini.model import PATCH_SIZE, build_config, build_model, build_tokenizer
    from scope.mini.tower import LOCAL_POS_CHANNELS, local_attention_init, pca_patch_init

    tower = build_model(build_config(build_tokenizer(), 2, 128, 1, 32)).model.vision_tower
    with torch.no_grad():
        local_attention_init(tower)
        w = tower.embeddings.patch_embedding.weight
        before = w.clone()
        pca_patch_init(tower, n_scenes=8)
        _, px, _, _ = scene_batch(np.arange(VAL_SEED_BASE // 2, VAL_SEED_BASE // 2 + 8))
        p = PATCH_SIZE
        patches = px.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * p * p)
        k = 128 - LOCAL_POS_CHANNELS
        out = (patches - patches.mean(0)) @ w.view(128, -1)[:k].T
        ref = (patches - patches.mean(0)) @ before.view(128, -1)[:k].T
    corr = torch.corrcoef(out.T)
    assert (corr - torch.eye(k)).abs().max() < 1e-3  # decorrelated channels of equal variance
    assert torch.allclose(out.std(0), out.std(0).mean().expand(k), rtol=1e-3)
    assert abs(out.std() / ref.std() - 1) < 1e-3  # the output scale of the random weights is kept
    assert torch.equal(w[k:], before[k:]) and (w[k:] == 0).all()  # position-code channels untouched


def test_sincos_position_embeddings_tell_every_patch_apart():
    from scope.mini.tower import sincos_2d

    e = sincos_2d(24, 128)
    assert e.shape == (576, 128)
    d = torch.cdist(e, e) + torch.eye(576) * 1e3
    assert d.min() > 0.1  # distinct positions
    assert d[0].argmin() in (1, 24)  # the nearest position is a grid neighbour


def test_local_attention_init_points_each_head_at_its_offset():
    from scope.mini.labels import VAL_SEED_BASE, scene_batch
    from scope.mini.model import build_config, build_model, build_tokenizer
    from scope.mini.tower import LOCAL_OFFSETS, local_attention_init

    model = build_model(build_config(build_tokenizer()), seed=0)
    model.set_attn_implementation("eager")
    tower = model.model.vision_tower
    local_attention_init(tower)
    _, px, _, _ = scene_batch([VAL_SEED_BASE, VAL_SEED_BASE + 1])
    with torch.no_grad():
        att = tower(px, output_attentions=True).attentions
    for layer, heads in LOCAL_OFFSETS.items():
        for head, (dr, dc) in heads.items():
            for r, c in ((10, 10), (5, 17)):  # interior patches, whatever the image shows there
                i, j = 1 + r * 24 + c, 1 + (r + dr) * 24 + (c + dc)
                assert att[layer][:, head, i, j].min() > 0.95, (layer, head, r, c)
    # the heads left free (grouping loss, CLS) are not local
    assert att[0][:, 0, 1 + 10 * 24 + 10].max() < 0.5
    small = build_model(build_config(build_tokenizer(), vision_width=32), seed=0).model.vision_tower
    with pytest.raises(ValueError, match="hidden_size=32"):
        local_attention_init(small)


def test_evaluate_features_reports_reading_subsets():
    from scope.mini.evaluate import evaluate_features
    from scope.mini.model import build_config, build_model, build_tokenizer, build_vocab
    from scope.mini.sequences import Seq

    tok = build_tokenizer(build_vocab(n_scenes=100))
    model = build_model(build_config(tok, vision_layers=1, vision_width=32, lm_layers=1, lm_width=32)).eval()
    items = [it for it in heldout_items() if it["family"] in ("reading", "counting")][::8]
    feats = torch.randn(len(items), 576, 32)
    with torch.no_grad():
        acc = evaluate_features(model, Seq(tok), feats, items)
    assert set(acc) == {"reading", "counting", "overall", "reading/large", "reading/small"}
    small = [it for it in items if it["subset"] == "small"]
    assert len(small) == 2 and acc["reading/small"] in (0.0, 0.5, 1.0)
    n_read = sum(it["family"] == "reading" for it in items)
    large = acc["reading/large"] * (n_read - len(small))
    assert acc["reading"] * n_read == pytest.approx(large + acc["reading/small"] * len(small))


def test_grouping_loss_is_minus_log_attention_mass_on_own_object():
    from scope.mini.model import build_config, build_model, build_tokenizer, build_vocab
    from scope.mini.tower import grouping_loss, tower_hidden

    tok = build_tokenizer(build_vocab(n_scenes=100))
    model = build_model(build_config(tok, vision_layers=3, vision_width=32, lm_layers=1, lm_width=32))
    tower = model.model.vision_tower
    with torch.no_grad():  # zero queries -> uniform attention over CLS + 576 patches
        for layer in tower.encoder.layers:
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.q_proj.bias.zero_()
    kept = []
    tower_hidden(tower, torch.randn(2, 3, 192, 192), keep=kept)
    assert len(kept) == 2  # inputs of the layers before layer -2's output
    owner = torch.zeros(2, 576, dtype=torch.long)
    owner[0, :10], owner[0, 10:13], owner[1, 100:150] = 1, 2, 3
    # own-object patch counts over 577 keys, averaged over the 10 + 3 + 50 object patches
    expected = -(10 * np.log(10 / 577) + 3 * np.log(3 / 577) + 50 * np.log(50 / 577)) / 63
    got = grouping_loss(tower, kept, owner)
    assert abs(got.item() - expected) < 1e-4
    assert grouping_loss(tower, kept, torch.zeros_like(owner)).item() == 0.0


def test_turn_targets_name_each_object_apart_and_point_choices_at_the_right_option():
    from scope.mini.model import build_tokenizer, build_vocab
    from scope.mini.sequences import Seq
    from scope.mini.synthbench import CHOICE_SUFFIX
    from scope.mini.targets import turn_targets

    tok = build_tokenizer(build_vocab(n_scenes=100))
    seq = Seq(tok)
    choice = "What colour is the square?\nA. blue\nB. red\nC. green\nD. yellow\n" + CHOICE_SUFFIX
    qas = [
        {"question": "What colour is the square?", "answer": "red", "family": "attribute", "refs": [1]},
        {
            "question": "Is the red circle above or below the blue square?",
            "answer": "above",
            "family": "spatial",
            "refs": [2, 0],
        },
        {
            "question": "How many triangles are there in the image?",
            "answer": "0",
            "family": "counting",
            "refs": [],
        },
        {"question": choice, "answer": "B", "family": "choice", "refs": [1]},
    ]
    ids, _, img_start, qpos = seq.build_with_positions(qas, n_image=6)
    owners = torch.tensor([0, 2, 2, 1, 3, 0])  # 1 + object index of each image token
    got = [
        [
            (kind, tok.convert_ids_to_tokens([ids[q]])[0], tok.convert_ids_to_tokens([ids[k] for k in keys]))
            for kind, q, keys in turn_targets(seq, ids, qa, qp, owners, img_start)
        ]
        for qa, qp in zip(qas, qpos)
    ]
    img = ["<image>"]
    assert got[0] == [
        ("name_a", ":", ["square"]),
        ("name_b", ":", ["square"]),
        ("object_a", ":", img * 2),
        ("object_b", ":", img * 2),
    ]
    assert got[1] == [
        ("name_a", ":", ["red", "circle"]),
        ("name_b", ":", ["blue", "square"]),
        ("object_a", ":", img),
        ("where_a", ":", img),  # the position heads look at the same objects, on spatial questions only
        ("object_b", ":", img),
        ("where_b", ":", img),
        ("relation", ":", ["above", "below"]),  # which relation is asked
    ]
    assert got[2] == [("name_a", ":", ["triangles"]), ("name_b", ":", ["triangles"])]  # nothing to look at
    assert got[3][:4] == got[0]  # the option words are not names
    assert got[3][4:] == [
        ("letter", "blue", ["A"]),
        ("letter", "red", ["B"]),
        ("option", ":", ["red"]),
        ("letter", "green", ["C"]),
        ("letter", "yellow", ["D"]),
    ]
    # object keys are the image tokens of the referenced object: image token j sits at img_start + j
    spatial = dict((k, keys.tolist()) for k, _, keys in turn_targets(seq, ids, qas[1], qpos[1], owners, 3))
    assert spatial["object_a"] == [img_start + 4] and spatial["object_b"] == [img_start + 3]
    assert spatial["where_a"] == spatial["object_a"] and spatial["where_b"] == spatial["object_b"]


@pytest.mark.parametrize("gapped", [False, True])
def test_grounding_loss_is_minus_log_attention_mass_of_the_chosen_head(gapped):
    from scope.mini.model import build_config, build_model, build_tokenizer, build_vocab
    from scope.mini.targets import AttentionInputs, grounding_loss

    tok = build_tokenizer(build_vocab(n_scenes=100))
    model = build_model(build_config(tok, vision_layers=2, vision_width=32, lm_layers=2, lm_width=64))
    model.config.text_config._attn_implementation = "eager"
    ids = torch.randint(5, len(tok), (2, 12))
    # per-row position ids (text moved away from the image in row 1 only) must be what the loss rotates by
    pos = torch.tensor([[*range(12)], [*range(5), *range(505, 512)]]) if gapped else None
    cap = AttentionInputs(model, [0, 1])
    with torch.no_grad():
        out = model.model.language_model(input_ids=ids, position_ids=pos, output_attentions=True)
    cap.remove()
    qb, qp = torch.tensor([0, 1, 1]), torch.tensor([7, 11, 4])
    target = torch.zeros(3, 12, dtype=torch.bool)
    target[0, [1, 2]], target[1, [3, 10]], target[2, [0]] = True, True, True
    for layer, head in ((0, 0), (1, 2)):
        att = out.attentions[layer][qb, head, qp]  # [3, 12] attention of each query
        expected = -torch.log((att * target).sum(-1)).mean()
        got = grounding_loss(cap, qb, qp, target, (layer,), head)
        assert torch.allclose(got, expected, atol=1e-5), (layer, head, got, expected)


def test_head_output_is_the_heads_share_of_the_attention_output_and_readout_is_the_logit_lens():
    from scope.mini.model import build_config, build_model, build_tokenizer, build_vocab
    from scope.mini.targets import AttentionInputs, head_output, head_values, readout_loss

    tok = build_tokenizer(build_vocab(n_scenes=100))
    model = build_model(build_config(tok, vision_layers=2, vision_width=32, lm_layers=2, lm_width=64))
    model.config.text_config._attn_implementation = "eager"
    lm = model.model.language_model
    ids = torch.randint(5, len(tok), (2, 12))
    seen = {}
    hooks = [
        lm.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.update(o=a[0])),
        lm.norm.register_forward_pre_hook(lambda m, a: seen.update(last=a[0])),
    ]
    cap = AttentionInputs(model, [1])
    with torch.no_grad():
        out = lm(input_ids=ids, output_attentions=True)
        logits = model.lm_head(out.last_hidden_state)
        qb, qp = torch.tensor([0, 1, 1]), torch.tensor([7, 11, 4])
        hd, w_o = lm.layers[1].self_attn.head_dim, lm.layers[1].self_attn.o_proj.weight
        for head in (0, 3):
            sl = slice(head * hd, (head + 1) * hd)
            expected = seen["o"][qb, qp, sl] @ w_o[:, sl].T  # the head's columns of o_proj, alone
            got = head_output(cap, 1, head, qb, qp)
            assert torch.allclose(got, expected, atol=1e-5), head
            # ... which is the attention-weighted mean of what each key alone would add (head_values)
            keys = torch.arange(12)
            per_key = torch.stack([head_values(cap, 1, head, b.repeat(12), keys) for b in qb])  # [3, 12, D]
            att = out.attentions[1][qb, head, qp]  # [3, 12]
            assert torch.allclose(torch.einsum("nk,nkd->nd", att, per_key), got, atol=1e-5), head
        token = torch.tensor([3, 9, 4])
        lens = readout_loss(model, seen["last"][qb, qp], token)
        assert torch.allclose(lens, torch.nn.functional.cross_entropy(logits[qb, qp], token), atol=1e-5)
    cap.remove()
    for h in hooks:
        h.remove()


def test_next_owner_masks_follow_the_packed_anyres_order():
    from scope.mini.features import extract_next_features
    from scope.mini.labels import patch_labels, pixels
    from scope.mini.model import build_config, build_model, build_tokenizer, build_vocab
    from scope.mini.next import NEXT_CROPS, build_next_processor, next_from_mini
    from scope.mini.scenes import make_scene, render
    from scope.mini.sequences import Seq

    tok = build_tokenizer(build_vocab(n_scenes=100))
    mini = build_model(build_config(tok, vision_layers=2, vision_width=32, lm_layers=1, lm_width=32))
    model, processor = next_from_mini(mini), build_next_processor(tok)
    seeds = np.array([3, 11])
    feats, masks = extract_next_features(model, processor, seeds, batch=2, with_masks=True)
    assert feats.shape == (2, 5, 576, 32) and masks.shape == (2, 576 + 48 * 49)
    im, ids = render(make_scene(3), 384, with_ids=True)
    px = processor.image_processor([im], return_tensors="pt")["pixel_values"][0]
    for k, box in enumerate(NEXT_CROPS[1:], start=1):  # the processor's grid crops, in NEXT_CROPS order
        x, y, size = box
        assert torch.allclose(px[k], pixels([im.crop((x, y, x + size, y + size))])[0], atol=1e-4)
    owners = [torch.from_numpy(patch_labels(make_scene(3), ids, box)[5]) for box in NEXT_CROPS]
    assert torch.equal(masks[0, :576].long(), owners[0])
    grid = masks[0, 576:].long().view(48, 49)
    assert (grid[:, 48] == 0).all()  # image_newline slots
    for k, (r, c) in enumerate([(0, 0), (0, 24), (24, 0), (24, 24)], start=1):
        assert torch.equal(grid[r : r + 24, c : c + 24].flatten(), owners[k])
    assert set(masks[0].unique().tolist()) == set(range(len(make_scene(3).objects) + 1))
    rows = []
    _train_lm(
        model, Seq(tok), feats, seeds, lambda *r: rows.append(r), masks, steps=2, batch=2, turns=2, lr=1e-3
    )
    assert [np.isfinite(r[3]["ground"]) for r in rows if "ground" in r[3]] == [True, True]


def test_ordinal_row_and_column_heads_decode_the_number_of_positive_thresholds():
    from scope.mini.tower import TowerHeads

    heads = TowerHeads(32)
    label = torch.tensor([0, 1, 7, 24])  # background, row 0, row 6, row 23
    exact = torch.where(label[:, None] > torch.arange(24), 9.0, -9.0)
    assert heads._predict("row", exact).tolist() == label.tolist()
    assert heads._dense_loss("row", exact, label).max() < 1e-3
    off_by_one = torch.where(label[:, None] > torch.arange(24) + 1, 9.0, -9.0)
    wrong = heads._dense_loss("row", off_by_one, label)
    assert (wrong[1:] > 0.3).all() and heads._predict("col", off_by_one).tolist() == [0, 0, 6, 23]
    # the other heads keep plain cross-entropy over classes
    logits = torch.randn(4, 7)
    assert torch.allclose(
        heads._dense_loss("colour", logits, label.clamp(max=6)),
        torch.nn.functional.cross_entropy(logits, label.clamp(max=6), reduction="none"),
    )


def test_object_position_agrees_with_the_spatial_answers():
    from scope.mini.targets import object_position

    checked = 0
    for it in heldout_items():
        if it["family"] != "spatial":
            continue
        scene = make_scene(it["seed"])
        (ra, ca), (rb, cb) = (object_position(scene, r) for r in it["refs"])
        assert all(-2 <= v <= 2 for v in (ra, ca, rb, cb))
        # the read-out's target says what the answer says: a is left of b <=> its column is smaller, etc.
        expected = {"left": ca < cb, "right": ca > cb, "above": ra < rb, "below": ra > rb}[it["answer"]]
        assert expected, (it["question"], it["answer"], (ra, ca), (rb, cb))
        checked += 1
    assert checked >= 50


def test_where_flag_adds_the_position_heads_and_says_so_in_the_recipe():
    from scope.mini.targets import (
        DEFAULT_TARGETS,
        OPTIONAL_READOUTS,
        OPTIONAL_TARGETS,
        READOUTS,
        TARGET_HEADS,
        WHERE_READOUTS,
    )
    from scope.mini.train import card_recipe, parser, where_options

    plain, where = parser().parse_args(["--no-where"]), parser().parse_args(["--where"])
    assert where_options(plain) == {} and "With `--where`" not in card_recipe(plain)
    extra = where_options(where)
    assert set(extra["targets"]) == set(TARGET_HEADS) and {"where_a", "where_b"} <= set(extra["targets"])
    assert extra["readouts"] == (*READOUTS, *WHERE_READOUTS)
    assert set(WHERE_READOUTS) <= set(OPTIONAL_READOUTS)
    assert not set(OPTIONAL_TARGETS) & set(DEFAULT_TARGETS)
    assert "With `--where`" in card_recipe(where)


def test_make_model_defaults_ink_loss_principal_components_and_position_heads():
    from scope.mini.targets import OPTIONAL_TARGETS
    from scope.mini.train import card_recipe, parser, where_options

    args = parser().parse_args([])
    assert args.tower_ink == 1.0 and args.tower_pca is True and args.where is True
    recipe = card_recipe(args)
    assert (
        "ink covers (weight 1.0)" in recipe
        and "principal components" in recipe
        and "With `--where`" in recipe
    )
    assert set(where_options(args)["targets"]) >= set(OPTIONAL_TARGETS)
    off = parser().parse_args(["--tower-ink", "0", "--no-tower-pca", "--no-where"])
    assert off.tower_ink == 0 and off.tower_pca is False and off.where is False and where_options(off) == {}
    assert "ink covers" not in card_recipe(off) and "principal components" not in card_recipe(off)
    assert "--where" not in card_recipe(off).split("Seed")[0]
    assert "--all --no-where --tower-ink 0.0 --no-tower-pca`" in card_recipe(
        off
    )  # the card's rebuild command
    assert "--all`" in recipe
    assert args.text_gap == 0 and "further on" not in recipe  # the shipped recipe trains without gaps
    gapped = parser().parse_args(["--text-gap", "2400"])
    assert "random 0-2400 positions further on" in card_recipe(gapped)
    assert "--all --text-gap 2400`" in card_recipe(gapped)


def test_training_is_deterministic_for_a_seed():
    """`make model` promises the same checkpoints for the same seed (on one machine and thread count)."""
    from scope.mini.features import extract_features
    from scope.mini.model import build_config, build_model, build_tokenizer, build_vocab
    from scope.mini.sequences import Seq
    from scope.mini.tower import train_tower

    tok = build_tokenizer(build_vocab(n_scenes=100))
    seq = Seq(tok)

    def run(seed):
        model = build_model(
            build_config(tok, vision_layers=2, vision_width=32, lm_layers=1, lm_width=32), seed
        )
        quiet = lambda *row: None  # noqa: E731
        train_tower(
            model, steps=4, batch=4, lr=3e-3, seed=seed, log=quiet, window=6, zoom=0.5, warmup=2, local=False
        )
        pool = np.arange(4) + seed
        feats, masks = extract_features(model, pool, batch=4, with_masks=True)
        _train_lm(
            model, seq, feats, pool, quiet, masks, steps=4, batch=2, turns=3, lr=3e-3, seed=seed, curriculum=2
        )
        return {k: v.clone() for k, v in model.state_dict().items()}

    a, b, other = run(0), run(0), run(1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(not torch.equal(a[k], other[k]) for k in a) > len(a) // 2


def test_text_gaps_move_only_the_text_after_the_image_of_the_chosen_share():
    from scope.mini.sequences import text_gaps

    lengths, ends = [10, 7, 12, 9] * 50, [5, 3, 6, 4] * 50
    pos = text_gaps(lengths, ends, 100, 0.5, np.random.default_rng(0))
    assert pos.shape == (200, 12)
    gaps = pos[:, -1] - 11
    for b, end in enumerate(ends):
        assert pos[b, :end].tolist() == list(range(end))  # the prompt and the image keep 0..end-1
        assert (pos[b, end:] - torch.arange(end, 12) == gaps[b]).all()  # the text moves by one gap
    assert 0 <= gaps.min() and gaps.max() <= 100
    assert 0.35 < (gaps > 0).float().mean() < 0.65  # about half the rows, each by 0..100
    assert gaps.max() > 50
    none = text_gaps(lengths, ends, 100, 0.0, np.random.default_rng(0))
    assert (none == torch.arange(12)).all()


def test_lr_factor_cosine_and_warmup_stable_decay():
    from scope.mini.lm import lr_factor
    from scope.mini.train import card_recipe, parser

    cos = [lr_factor(s, 100) for s in range(100)]
    assert cos[0] == 1.0 and abs(cos[50] - 0.5) < 1e-9 and all(a > b for a, b in zip(cos, cos[1:]))
    wsd = [lr_factor(s, 100, "wsd") for s in range(100)]
    assert wsd[:80] == [1.0] * 80  # the peak held for the first 80%
    assert all(a > b for a, b in zip(wsd[80:], wsd[81:])) and wsd[90] == 0.5 and 0 < wsd[99] < 0.1
    assert sum(wsd) > sum(cos)  # more steps at a high learning rate
    with pytest.raises(ValueError, match="schedule='linear'"):
        lr_factor(0, 100, "linear")
    default = card_recipe(parser().parse_args([]))  # make model's recipe: wsd
    assert "linear decay over the last 20%" in default and "--all`" in default
    cosine = card_recipe(parser().parse_args(["--lm-schedule", "cosine"]))
    assert "warm-up + cosine" in cosine and "--all --lm-schedule cosine`" in cosine


def test_make_model_defaults_are_the_recipe_of_the_shipped_checkpoint():
    """The card of data/minillava states the recipe it was trained with; `make model` must rebuild that."""
    from scope.mini.train import card_recipe, parser
    from scope.paths import MINILLAVA_DIR

    card = (MINILLAVA_DIR / "README.md").read_text()
    assert card_recipe(parser().parse_args([])) in card
    assert card_recipe(parser().parse_args(["--lm-steps", "2400"])) not in card


def _platform() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def _hashes(module: torch.nn.Module) -> dict[str, str]:
    return {
        k: hashlib.sha256(v.detach().float().contiguous().numpy().tobytes()).hexdigest()
        for k, v in sorted(module.state_dict().items())
    }


def short_run() -> dict[str, dict[str, str]]:
    """Every stage of ``make model`` for a few steps on a tiny model, with every option of the recipe on."""
    from scope.mini.features import extract_features, extract_next_features
    from scope.mini.lm import train_lm
    from scope.mini.model import build_config, build_model, build_tokenizer, build_vocab
    from scope.mini.next import build_next_processor, next_from_mini
    from scope.mini.sequences import Seq
    from scope.mini.targets import OPTIONAL_READOUTS, READOUTS, TARGET_HEADS
    from scope.mini.tower import train_tower

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = build_tokenizer(build_vocab(n_scenes=100))
        model = build_model(build_config(tok, vision_layers=3, vision_width=128, lm_layers=2, lm_width=64), 0)
        quiet = lambda *row: None  # noqa: E731
        train_tower(
            model, steps=4, batch=4, lr=1e-3, seed=0, log=quiet, window=6, zoom=0.5, probe_every=2,
            group=1.0, warmup=2, ink=1.0, pca=True,
        )  # fmt: skip
        out = {"tower": _hashes(model.model.vision_tower)}
        pool = np.arange(6)
        feats, masks = extract_features(model, pool, batch=6, with_masks=True)
        seq = Seq(tok)
        train_lm(
            model, seq, feats, pool, steps=4, batch=2, turns=4, lr=3e-3, seed=0, log=quiet,
            evaluate_fn=lambda: {}, eval_every=2, masks=masks, curriculum=2, curriculum_hold=1, ground=1.0,
            targets=tuple(TARGET_HEADS), readouts=(*READOUTS, *OPTIONAL_READOUTS),
            gap=100, schedule="wsd",
        )  # fmt: skip
        out["minillava"] = _hashes(model)
        nxt = next_from_mini(model.to(torch.bfloat16).float())  # as saved, then loaded for the NeXT stage
        pool = np.arange(2)
        feats, masks = extract_next_features(nxt, build_next_processor(tok), pool, 2, with_masks=True)
        train_lm(
            nxt, seq, feats, pool, steps=2, batch=2, turns=3, lr=1e-3, seed=0, log=quiet,
            evaluate_fn=lambda: {}, eval_every=1, masks=masks, ground=1.0,
        )  # fmt: skip
        out["next"] = _hashes(nxt)
    finally:
        torch.set_num_threads(threads)
    return out


def test_short_training_run_gives_the_weights_of_the_reference_code():
    expected = json.loads(HASHES.read_text())
    if expected["platform"] != _platform():
        pytest.skip(f"hashes written on {expected['platform']}, this is {_platform()}")
    got = short_run()
    for stage in ("tower", "minillava", "next"):
        assert got[stage].keys() == expected[stage].keys(), stage
        changed = [k for k in got[stage] if got[stage][k] != expected[stage][k]]
        assert not changed, f"{stage}: {len(changed)} tensors differ, e.g. {changed[:3]}"


def _code_version() -> str:
    import subprocess

    git = ["git", "-C", str(Path(__file__).parent)]
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "scope"], capture_output=True, text=True
    ).stdout
    return head + (" with uncommitted changes to scope/" if dirty.strip() else "")


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    HASHES.parent.mkdir(exist_ok=True)
    doc = {
        "_comment": "sha256 of every tensor after each stage of short_run in tests/test_mini_train.py, written "
        "by `python tests/test_mini_train.py --write` from the code named in `code`; compared only on `platform`",
        "code": _code_version(),
        "platform": _platform(),
        **short_run(),
    }
    HASHES.write_text(json.dumps(doc, indent=1) + "\n")
