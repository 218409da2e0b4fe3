"""SparseVLM: schedules, raters, rating rows, recycling, and the patch on a tiny 4-layer LLaVA."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import scope
from scope import efficiency
from scope.methods import SPARSEVLM_PRESETS, paper_options
from scope.patch.sparsevlm import (
    authors_average,
    dpc_knn_merge,
    recycle_pruned,
    rows_attention,
    select_raters,
    sparsevlm_plan,
)
from scope.testing import chat_prompt, tiny_images, tiny_llava

N = 16  # visual tokens of a tiny image
TOL = 1e-5


def per_layer(budget, n, layers, options):
    return scope.get_method("sparsevlm").tokens_per_layer(budget, n, layers, options)


# --------------------------------------------------------------------------------------------------------
# schedules, by hand
# --------------------------------------------------------------------------------------------------------

# counts after each stage on a 576-token image, worked out from the authors' rule: p pruned -> m = int(0.3 p)
# + 1 recycled candidates -> int(m / 10) + 1 clusters added to the kept top-k
AFTER = {
    192: (309, 204, 113),  # 576-300=276 -> m 83 -> 9; 309-200=109 -> 33 -> 4; 204-110=94 -> 29 -> 3
    128: (312, 117, 39),  # 273 -> 82 -> 9; 202 -> 61 -> 7; 81 -> 25 -> 3
    64: (82, 32, 18),  # 510 -> 154 -> 16; 52 -> 16 -> 2; 15 -> 5 -> 1
}


@pytest.mark.parametrize("budget", sorted(AFTER))
def test_presets_average_the_hand_computed_tokens_per_layer(budget):
    assert {b for _, b in SPARSEVLM_PRESETS} == set(AFTER)
    options = paper_options("sparsevlm", budget, "llava")
    a, b, c = AFTER[budget]
    # rating layers 2 / 6 / 15 compute on the previous count; layers 3 / 7 / 16 are the first to see fewer
    expected = [576] * 3 + [a] * 4 + [b] * 9 + [c] * 16
    assert per_layer(budget, 576, 32, options) == expected
    average = (3 * 576 + 4 * a + 9 * b + 16 * c) / 32
    assert scope.equivalent_tokens("sparsevlm", budget, 576, 32, **options) == pytest.approx(average)
    row = efficiency.prefill_flops("llava-1.5-7b", "sparsevlm", budget, **options)
    assert row["visual_avg"] == pytest.approx(average) and row["per_layer"] == expected
    # the authors' log counts each rating layer after its drop: 192.03 / 128.6 / 64.8 tokens
    tops = [k for _, k in options["stages"]]
    hand = (2 * 576 + 4 * a + 9 * b + 17 * c) / 32
    assert authors_average(576, tops, [2, 6, 15], 32) == pytest.approx(hand)
    assert abs(hand - budget) < 1
    # without recycling the schedule is the top-k alone
    bare = [576] * 3 + [tops[0]] * 4 + [tops[1]] * 9 + [tops[2]] * 16
    assert per_layer(budget, 576, 32, {**options, "recycle": False}) == bare


def test_budget_rule_without_stages():
    for n, budget in ((576, 192), (576, 64), (2880, 640)):
        stages = sparsevlm_plan(budget, 32)
        assert [s.score_layer for s in stages] == [2, 6, 15] and [s.layer for s in stages] == [3, 7, 16]
        tops = [s.reduce.keywords["top"](n) for s in stages]
        assert tops == sorted(tops, reverse=True)
        assert budget - 2 < authors_average(n, tops, [2, 6, 15], 32) <= budget
    assert per_layer(N, N, 4, {}) == [N] * 4  # budget = all tokens: nothing dropped
    assert [s.score_layer for s in sparsevlm_plan(8, 4)] == [0, 1, 2]  # 2 / 6 / 15 of 32 scaled to 4


def test_options_are_checked():
    assert paper_options("sparsevlm", 192, "llava") == {"stages": [[2, 300], [6, 200], [15, 110]]}
    assert paper_options("sparsevlm", 640, "llava_next") == {}  # no published NeXT schedule: our rule
    with pytest.raises(ValueError, match="stages or layers"):
        per_layer(8, N, 4, {"stages": [(0, 8)], "layers": [1]})
    with pytest.raises(ValueError, match="stages"):
        per_layer(8, N, 4, {"stages": [(2, 8), (1, 4)]})
    with pytest.raises(ValueError, match="rating layers"):
        per_layer(8, N, 4, {"stages": [(3, 8)]})  # the last layer has no layer after it to prune for
    with pytest.raises(ValueError, match="recycle"):
        per_layer(8, N, 4, {"recycle": "yes"})
    with pytest.raises(ValueError, match="budget"):
        per_layer(None, N, 4, {})


# --------------------------------------------------------------------------------------------------------
# raters, rating rows, recycling on bare tensors
# --------------------------------------------------------------------------------------------------------


def test_raters_are_the_text_tokens_above_the_mean_relevance():
    # every visual token's logits over the 4 text tokens are [10, 0, 10, 0]: softmax ~ [.5, 0, .5, 0],
    # mean .25, so text tokens 0 and 2 rate
    visual = torch.tensor([[10.0, 0.0], [10.0, 0.0], [10.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert select_raters(visual, text).tolist() == [True, False, True, False]
    # two visual tokens with opposite preferences: logits [[5, 0, 0], [0, 0, 5]] -> relevance ~ [.5, .007, .5]
    visual = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    assert select_raters(visual, text).tolist() == [True, False, True]


@torch.no_grad()
def test_rating_rows_equal_the_full_attention_map():
    model, _ = tiny_llava(seed=2, text_layers=4)
    lm = model.model.language_model
    layer = lm.layers[1]
    torch.manual_seed(0)
    B, L = 2, 9
    h = torch.randn(B, L, lm.config.hidden_size)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, :2] = False  # left padding
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    cos_sin = lm.rotary_emb(h, position_ids=pos)
    rows = torch.zeros(B, L, dtype=torch.bool)
    rows[0, [4, 7]] = True
    rows[1, [8]] = True
    got = rows_attention(layer, h, cos_sin, valid, rows)
    # independent: every query row of the layer, causal + padding mask, softmax, mean over heads
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(B, L, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, L, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *cos_sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = q @ k.transpose(-1, -2) * attn.head_dim**-0.5
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None] & valid[:, None, :]
    full = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).mean(1)  # [B, L, L]
    torch.testing.assert_close(got[0], full[0, [4, 7]], atol=TOL, rtol=0)
    torch.testing.assert_close(got[1, 0], full[1, 8], atol=TOL, rtol=0)
    assert torch.equal(got[1, 1], torch.zeros(L))  # row 1 has one rater: the padded one is zero


def test_density_peak_clusters_two_blobs_into_their_means():
    a = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1]])
    b = torch.tensor([[5.0, 5.0], [5.2, 5.0], [5.0, 5.2]])
    x = torch.cat([a, b])
    merged, assign, centres = dpc_knn_merge(x, 2)
    assert assign.tolist() in ([0] * 4 + [1] * 3, [1] * 4 + [0] * 3)
    got = sorted(merged.tolist())
    torch.testing.assert_close(torch.tensor(got), torch.stack([a.mean(0), b.mean(0)]), atol=1e-6, rtol=0)
    assert sorted(assign[centres].tolist()) == [0, 1]  # every centre is in its own cluster
    with pytest.raises(ValueError, match="clusters"):
        dpc_knn_merge(x, 8)


def test_recycling_merges_the_best_rated_share_of_the_pruned():
    # 10 pruned tokens: m = int(0.3 * 10) + 1 = 4 best rated are merged into int(4 / 10) + 1 = 1 cluster
    hidden = torch.arange(30, dtype=torch.float32).view(10, 3)
    scores = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.0, 0.7, 0.3, 0.05, 0.6, 0.4])
    merged, chosen, centres = recycle_pruned(hidden, scores)
    assert chosen.tolist() == [1, 3, 5, 8]
    assert merged.shape == (1, 3) and centres.numel() == 1 and int(centres[0]) in (1, 3, 5, 8)
    torch.testing.assert_close(merged[0], hidden[[1, 3, 5, 8]].mean(0))
    # 70 pruned: m = 22 -> 3 clusters, together the 22 best rated
    hidden, scores = torch.randn(70, 4, generator=torch.Generator().manual_seed(0)), torch.linspace(0, 1, 70)
    merged, chosen, _ = recycle_pruned(hidden, scores)
    assert merged.shape == (3, 4) and sorted(chosen.tolist()) == list(range(48, 70))


# --------------------------------------------------------------------------------------------------------
# the patch on a tiny 4-layer LLaVA
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava():
    model, processor = tiny_llava(seed=3, text_layers=4)
    yield model, processor
    scope.unpatch(model)


def _inputs(processor, questions, images):
    text = [chat_prompt(processor, q) for q in questions]
    return processor(images=images, text=text, return_tensors="pt", padding=True)


STAGES = [(0, 10), (1, 6), (2, 3)]
# 16 -> keep 10, p 6 -> m 2 -> 1 cluster: 11; keep 6, p 5 -> m 2 -> 1: 7; keep 3, p 4 -> m 2 -> 1: 4
HAND_COUNTS = [N, 11, 7, 4]


@torch.no_grad()
@pytest.mark.parametrize("recycle,counts", [(True, HAND_COUNTS), (False, [N, 10, 6, 3])])
def test_tokens_each_layer_sees(llava, recycle, counts):
    model, processor = llava
    inputs = _inputs(processor, ["what is in the image ?", "yes"], tiny_images(2, seed=4))
    with scope.patch(model, "sparsevlm", budget=8, stages=STAGES, recycle=recycle):
        model(**inputs)
        assert model._scope.last["visual_tokens_per_layer"].tolist() == [counts] * 2
        assert model._scope.last["equivalent_tokens"] == [pytest.approx(sum(counts) / 4)] * 2
    assert per_layer(8, N, 4, {"stages": STAGES, "recycle": recycle}) == counts


@torch.no_grad()
def test_recycled_token_is_the_mean_of_pruned_rows(llava):
    model, processor = llava
    inputs = _inputs(processor, ["what is in the image ?"], tiny_images(1, seed=6))
    seen = {}
    layers = model.model.language_model.layers
    # layer 0's output (before the drop) and what layer 1 computes on (its norm's input, after the drop)
    hooks = [
        layers[0].register_forward_hook(
            lambda m, a, out: seen.update(out0=out[0] if isinstance(out, tuple) else out)
        ),
        layers[1].input_layernorm.register_forward_pre_hook(lambda m, a: seen.update(in1=a[0])),
    ]
    try:
        with scope.patch(model, "sparsevlm", budget=8, stages=STAGES):
            model(**inputs)
            kept = model._scope.last["kept_slots"][0][0]  # caller slots kept after layer 0 (+ the centre)
    finally:
        for h in hooks:
            h.remove()
    image = (inputs.input_ids[0] == model.config.image_token_id).nonzero()[:, 0]
    out0, in1 = seen["out0"][0], seen["in1"][0]
    first = int(image[0])
    assert in1.shape[0] == inputs.input_ids.shape[1] - N + 11
    visual_in = in1[first : first + 11]
    # the first 10 rows are kept rows of layer 0's output, in order; the 11th is a merge of pruned ones
    kept_rows = [int(s) for s in image if kept[s]]
    assert len(kept_rows) == 11  # 10 kept + the recycled cluster's centre slot
    matches = [s for s in kept_rows if any(torch.allclose(out0[s], v, atol=1e-6) for v in visual_in[:10])]
    assert len(matches) == 10
    torch.testing.assert_close(visual_in[:10], out0[matches], atol=1e-6, rtol=0)
    pruned = [int(s) for s in image if int(s) not in matches]
    assert len(pruned) == 6  # m = int(0.3 * 6) + 1 = 2 of them merged into one token
    means = [out0[list(pair)].mean(0) for pair in itertools.combinations(pruned, 2)]
    assert any(torch.allclose(visual_in[10], m, atol=1e-5) for m in means)
    assert not any(torch.allclose(visual_in[10], out0[s], atol=1e-5) for s in pruned)
    torch.testing.assert_close(in1[first + 11 :], out0[image[-1] + 1 :], atol=1e-6, rtol=0)  # text after


@torch.no_grad()
def test_batch_equals_alone(llava):
    model, processor = llava
    questions = ["what is in the image ?", "how many red circle ?", "yes"]
    images = tiny_images(3, seed=5)
    with scope.patch(model, "sparsevlm", budget=8, stages=STAGES):
        batch = _inputs(processor, questions, images)
        assert (batch.attention_mask == 0).any()
        logits = model(**batch).logits
        assert model._scope.last["visual_tokens_per_layer"].tolist() == [HAND_COUNTS] * 3
        gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
        for i, (q, im) in enumerate(zip(questions, images)):
            alone = _inputs(processor, [q], [im])
            torch.testing.assert_close(logits[i, -1], model(**alone).logits[0, -1], atol=TOL, rtol=0)
            new = model.generate(**alone, max_new_tokens=5, do_sample=False)[0, alone.input_ids.shape[1] :]
            assert torch.equal(gen[i, batch.input_ids.shape[1] :][: new.numel()], new)


@torch.no_grad()
def test_budget_of_all_tokens_is_the_unpatched_model(llava):
    model, processor = llava
    inputs = _inputs(processor, ["what is in the image ?", "yes"], tiny_images(2, seed=1))
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    for options in ({}, {"stages": [(0, N), (1, N), (2, N)]}):
        with scope.patch(model, "sparsevlm", budget=N, **options):
            torch.testing.assert_close(model(**inputs).logits[:, -1], ref[:, -1], atol=TOL, rtol=0)
            assert model._scope.last["visual_tokens_per_layer"].tolist() == [[N] * 4] * 2
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref_gen)
