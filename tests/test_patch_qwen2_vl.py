"""scope.patch on tiny Qwen2-VL / Qwen2.5-VL models built offline: pruning merged tokens with M-RoPE kept."""

from __future__ import annotations

import pytest
import torch

import scope
from scope.patch import is_patched
from scope.patch.qwen2_vl import vision_features
from scope.testing import chat_prompt, tiny_images, tiny_qwen2_vl

TOL = 1e-5  # batch vs alone: same math, different padding -> float32 reduction-order noise only
VERSIONS = ("2", "2.5")
SQUARE, WIDE = (32, 32), (48, 32)  # 16 and 24 merged tokens (8x8 and 8x12 patches of 4 px, 2x2 merge)


@pytest.fixture(scope="module", params=VERSIONS)
def qwen(request):
    model, processor = tiny_qwen2_vl(seed=0, version=request.param)
    yield model, processor
    scope.unpatch(model)


def _inputs(processor, questions, images):
    text = [chat_prompt(processor, q) for q in questions]
    return processor(images=images, text=text, return_tensors="pt", padding=True)


def _two(processor):
    """A left-padded batch: a 16-token image with a long question, a 24-token image with a short one."""
    images = tiny_images(1, size=SQUARE, seed=1) + tiny_images(1, size=WIDE, seed=2)
    return _inputs(processor, ["what is in the image ?", "how many ?"], images)


class LLMInput:
    """Records the prefill's ids (of the multimodal model) and position ids (of the language model)."""

    def __init__(self, model):
        self.handles = [
            model.model.register_forward_pre_hook(self._outer, with_kwargs=True),
            model.model.language_model.register_forward_pre_hook(self._inner, with_kwargs=True),
        ]
        self.positions = []

    def _outer(self, module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:  # prefills only
            self.input_ids, self.mask = kwargs["input_ids"], kwargs.get("attention_mask")
            self.encoded = kwargs.get("mm_encoder_outputs")

    def _inner(self, module, args, kwargs):
        self.positions.append(kwargs["position_ids"])

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def test_keep_all_is_exact(qwen):
    model, processor = qwen
    inputs = _two(processor)
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    for method, budget in [("none", 4), ("scope", 1.0), ("divprune", 1.0), ("visionzip", 1.0)]:
        with scope.patch(model, method=method, budget=budget):
            assert torch.equal(model(**inputs).logits, ref), (method, budget)
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref_gen)
    one = _inputs(processor, ["what ?"], tiny_images(1, size=SQUARE, seed=5))
    ref_one = model(**one).logits
    with scope.patch(model, method="scope", budget=16):  # a count equal to the image's 16 tokens
        assert torch.equal(model(**one).logits, ref_one)


@torch.no_grad()
def test_hand_computed_positions_of_kept_tokens(qwen):
    # "USER: <|vision_start|>" are positions 0, 1; the 4x4 merged grid starts at 2: token j sits at
    # (t, h, w) = (2, 2 + j // 4, 2 + j % 4); the text after the image starts at 2 + max(4, 4) = 6
    model, processor = qwen
    inputs = _inputs(processor, ["what ?"], tiny_images(1, size=SQUARE, seed=3))
    rec = LLMInput(model)
    try:
        with scope.patch(model, method="scope", budget=5):
            model(**inputs)
            kept = model._scope.last["indices"][0]
    finally:
        rec.close()
    pos = rec.positions[0][:, 0]  # [3, L']
    is_img = rec.input_ids[0] == model.config.image_token_id
    expected = torch.stack([torch.full_like(kept, 2), 2 + kept // 4, 2 + kept % 4])
    assert torch.equal(pos[:, is_img], expected)
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    after = torch.arange(6, 6 + int((~is_img).sum()) - 2)
    assert torch.equal(pos[:, ~is_img][:, 2:], after.expand(3, -1))


@torch.no_grad()
def test_kept_positions_equal_unpruned_in_a_padded_batch(qwen):
    model, processor = qwen
    inputs = _two(processor)
    assert (inputs.attention_mask == 0).any()
    ref, _ = model.model.get_rope_index(  # transformers' own positions of the unpruned batch
        inputs.input_ids,
        inputs.mm_token_type_ids,
        inputs.image_grid_thw,
        attention_mask=inputs.attention_mask,
    )
    rec = LLMInput(model)
    try:
        with scope.patch(model, method="scope", budget=0.25):
            model(**inputs)
            kept, mask = model._scope.last["indices"], rec.mask
            n_forward = len(rec.positions)
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        unpatched = len(rec.positions)
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        rec.close()
    pos, gen_prefill = rec.positions[0], rec.positions[n_forward]
    is_img = inputs.input_ids == model.config.image_token_id
    for b in range(2):
        # the original slots that stay: real text tokens and the kept tokens' placeholders
        img_slots = is_img[b].nonzero()[:, 0]
        slots = (inputs.attention_mask[b].bool() & ~is_img[b]).clone()
        slots[img_slots[kept[b]]] = True
        valid = mask[b].bool()
        assert torch.equal(pos[:, b][:, valid], ref[:, b][:, slots])
        assert torch.equal(gen_prefill[1:, b][:, valid], ref[:, b][:, slots])
    # decoding continues from the same M-RoPE positions as unpatched (the last prompt token is never
    # pruned); row 0 (text positions for mask building) counts the shortened sequence
    for step in (1, 2):
        assert torch.equal(rec.positions[n_forward + step][1:], rec.positions[unpatched + step][1:])
    assert out.shape[1] == inputs.input_ids.shape[1] + 3


@torch.no_grad()
def test_budget_as_count_and_share(qwen):
    model, processor = qwen
    inputs = _two(processor)
    rec = LLMInput(model)
    try:
        for budget, expected in [(5, [5, 5]), (0.25, [4, 6]), (0.1, [1, 2])]:
            with scope.patch(model, method="scope", budget=budget):
                logits = model(**inputs).logits
                counts = (rec.input_ids == model.config.image_token_id).sum(1).tolist()
                assert counts == expected == model._scope.last["tokens_per_image"], budget
                assert logits.shape[1] == _pruned_length(inputs, [16, 24], expected)
    finally:
        rec.close()


def _pruned_length(inputs, n_in, n_out):
    """Length of the left-packed batch once row b drops ``n_in[b] - n_out[b]`` image tokens."""
    real = inputs.attention_mask.sum(1).tolist()
    return max(r - (a - k) for r, a, k in zip(real, n_in, n_out))


@torch.no_grad()
@pytest.mark.parametrize("method", ["scope", "divprune"])
def test_padded_batch_equals_each_alone(qwen, method):
    model, processor = qwen
    questions = ["what is in the image ?", "how many red circle ?", "yes"]
    images = [tiny_images(1, size=s, seed=i)[0] for i, s in enumerate([SQUARE, WIDE, (32, 48)])]
    with scope.patch(model, method=method, budget=0.25):
        batch = _inputs(processor, questions, images)
        logits = model(**batch).logits[:, -1]
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch.input_ids.shape[1] :]
        for i, (q, im) in enumerate(zip(questions, images)):
            alone = _inputs(processor, [q], [im])
            torch.testing.assert_close(logits[i], model(**alone).logits[0, -1], atol=TOL, rtol=0)
            new = model.generate(**alone, max_new_tokens=4, do_sample=False)[0, alone.input_ids.shape[1] :]
            assert torch.equal(gen[i, : new.numel()], new)


@torch.no_grad()
@pytest.mark.parametrize("method", ["scope", "divprune", "saliency", "visionzip", "random"])
def test_picks_equal_scope_select_and_rows_are_the_models_tokens(qwen, method):
    model, processor = qwen
    inputs = _two(processor)
    own = model.model.get_image_features(inputs.pixel_values, inputs.image_grid_thw).pooler_output
    feats, sal, keys = vision_features(model, inputs.pixel_values, inputs.image_grid_thw)
    for f, o in zip(feats, own):  # the merged tokens selected from are the model's own image features
        torch.testing.assert_close(f, o, atol=1e-6, rtol=0)
    rec = LLMInput(model)
    try:
        with scope.patch(model, method=method, budget=6):
            model(**inputs)
            kept = model._scope.last["indices"]
    finally:
        rec.close()
    rows = rec.encoded["image"].pooler_output
    for i, (f, s) in enumerate(zip(feats, sal)):
        if method in ("scope", "divprune", "saliency"):
            assert torch.equal(kept[i], scope.select(f, s, 6, method=method))
            torch.testing.assert_close(rows[i], f[kept[i]], atol=0, rtol=0)
        assert kept[i].shape == (6,) and bool((kept[i].diff() > 0).all())
        assert rows[i].shape == (6, f.shape[1]) and bool(torch.isfinite(rows[i]).all())


def _eager_received(model, pixel_values, grid_thw, block):
    """Reference saliency from the eager attention weights transformers computes (recorded at ``block``),
    in raster order of the merged tokens (Qwen2.5-VL's window order undone by matching the merger's rows)."""
    import importlib

    module = importlib.import_module(type(model).__module__)
    weights, original = [], module.eager_attention_forward

    def recording(mod, *args, **kwargs):
        out, w = original(mod, *args, **kwargs)
        if mod is model.model.visual.blocks[block].attn:
            weights.append(w)
        return out, w

    module.eager_attention_forward = recording
    try:
        out = model.model.visual(pixel_values, grid_thw=grid_thw)
    finally:
        module.eager_attention_forward = original
    per_patch = torch.cat([w[0].sum(0).mean(0) for w in weights])  # heads summed, queries averaged
    per_token = per_patch.view(-1, 4).sum(1)  # tower order
    tower_rows = model.model.visual.merger(out.last_hidden_state)
    order = torch.cdist(out.pooler_output, tower_rows).argmin(1)  # raster token -> its tower slot
    return per_token[order], len(weights)


@torch.no_grad()
@pytest.mark.parametrize("version", VERSIONS)
def test_saliency_hook_matches_eager_attention(version):
    sdpa, processor = tiny_qwen2_vl(seed=1, version=version)
    eager, _ = tiny_qwen2_vl(seed=1, version=version, attn_implementation="eager")
    inputs = _two(processor)
    _, sal, _ = vision_features(sdpa, inputs.pixel_values, inputs.image_grid_thw)
    ref, segments = _eager_received(eager, inputs.pixel_values, inputs.image_grid_thw, block=2)
    assert segments == 2  # one full-attention segment per image at the last block
    torch.testing.assert_close(torch.cat(sal), ref, atol=1e-6, rtol=1e-5)
    heads = sdpa.config.vision_config.num_heads
    for s in sal:  # each query's row sums to 1: the image's received attention sums to the head count
        torch.testing.assert_close(s.sum(), torch.tensor(float(heads)), atol=1e-5, rtol=0)
    assert not torch.allclose(sal[0], sal[0].mean().expand_as(sal[0]))


@torch.no_grad()
def test_saliency_sources(qwen):
    model, processor = qwen
    inputs = _two(processor)
    feats, norm, _ = vision_features(
        model, inputs.pixel_values, inputs.image_grid_thw, saliency_source="norm"
    )
    for f, s in zip(feats, norm):
        torch.testing.assert_close(s, f.float().norm(dim=-1))
    _, mean_q, _ = vision_features(
        model, inputs.pixel_values, inputs.image_grid_thw, saliency_source="mean_query"
    )
    heads = model.config.vision_config.num_heads
    for s in mean_q:  # one softmax row per head, spread over the image's tokens
        torch.testing.assert_close(s.sum(), torch.tensor(float(heads)), atol=1e-5, rtol=0)
    with scope.patch(model, method="scope", budget=4, saliency_source="mean_query", vision_layer=1):
        model(**inputs)
        assert model._scope.last["tokens_per_image"] == [4, 4]


@torch.no_grad()
def test_unpatch_restores_exactly(qwen):
    model, processor = qwen
    inputs = _two(processor)
    ref = model(**inputs).logits
    scope.patch(model, method="scope", budget=4)
    scope.patch(model, method="random", budget=0.5, seed=1)  # re-patching replaces the patch
    assert is_patched(model) and model(**inputs).logits.shape[1] == _pruned_length(inputs, [16, 24], [8, 12])
    scope.unpatch(model)
    assert "forward" not in model.__dict__ and not is_patched(model)
    assert torch.equal(model(**inputs).logits, ref)


def test_bad_inputs(qwen):
    model, processor = qwen
    inputs = _two(processor)
    for budget in (0, -1, 1.5, 0.0, True, "25%"):
        with pytest.raises(ValueError, match="budget"):
            scope.patch(model, method="scope", budget=budget)
    with pytest.raises(ValueError, match="supports LLaVA models only"):
        scope.patch(model, method="fastv", budget=4)
    with pytest.raises(ValueError, match="saliency_source"):
        scope.patch(model, method="scope", budget=4, saliency_source="cls")
    with pytest.raises(ValueError, match="vision_layer"):
        scope.patch(model, method="scope", budget=4, vision_layer=7)
    with pytest.raises(ValueError, match="unknown option"):
        scope.patch(model, method="scope", budget=4, keep_newlines=True)
    assert not is_patched(model)
    with scope.patch(model, method="scope", budget=20):  # more than the first image's 16 tokens
        with pytest.raises(ValueError, match="budget=20 is larger than the 16 visual tokens of image 0"):
            model(**inputs)
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"})


def test_windowed_saliency_layer_is_refused():
    model, _ = tiny_qwen2_vl(version="2.5")  # full attention in blocks 1 and 2, windows in block 0
    with pytest.raises(ValueError, match="full-attention block"):
        scope.patch(model, method="scope", budget=4, vision_layer=0)
    scope.patch(model, method="scope", budget=4, vision_layer=1)
    scope.unpatch(model)


@pytest.mark.parametrize("version", VERSIONS)
def test_scope_load_picks_the_qwen_class_and_patches(tmp_path, version):
    import transformers

    model, processor = tiny_qwen2_vl(version=version)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(
        tmp_path
    )  # (reloads as its tokenizer here: the video processor needs torchvision)
    loaded, _ = scope.load(str(tmp_path), device="cpu", method="scope", budget=0.25)
    cls = (
        transformers.Qwen2VLForConditionalGeneration
        if version == "2"
        else transformers.Qwen2_5_VLForConditionalGeneration
    )
    assert type(loaded) is cls and is_patched(loaded) and loaded._scope.budget == 0.25


@torch.no_grad()
def test_compare_saliency_sources(qwen):
    from scope.patch.qwen2_vl import compare_saliency_sources

    model, processor = qwen
    inputs = _two(processor)
    rows = compare_saliency_sources(model, inputs.pixel_values, inputs.image_grid_thw, share=0.25)
    assert [r["pair"] for r in rows[:3]] == ["attention~mean_query", "attention~norm", "mean_query~norm"]
    assert [r["image"] for r in rows] == [0, 0, 0, 1, 1, 1]
    for r in rows:
        assert -1 <= r["spearman"] <= 1 and 0 <= r["top_overlap"] <= 1 and 0 < r["scope_jaccard"] <= 1
    # by hand for one pair: the top-4 of two sources, overlap over k = floor(0.25 * 16) = 4
    _, a, _ = vision_features(model, inputs.pixel_values, inputs.image_grid_thw, saliency_source="attention")
    _, n, _ = vision_features(model, inputs.pixel_values, inputs.image_grid_thw, saliency_source="norm")
    top_a, top_n = set(a[0].topk(4).indices.tolist()), set(n[0].topk(4).indices.tolist())
    assert rows[1]["top_overlap"] == len(top_a & top_n) / 4


def test_a_trainable_tower_under_a_patch_is_refused(qwen):
    model, processor = qwen
    inputs = _two(processor)
    model.train()
    try:
        with scope.patch(model, "scope", 0.25):
            with pytest.raises(RuntimeError, match="without gradients"):
                model(**inputs)
            model.model.visual.requires_grad_(False)
            model(**inputs).logits.sum().backward()  # the LLM still trains
            assert model.model.language_model.layers[0].mlp.up_proj.weight.grad is not None
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
        model.model.visual.requires_grad_(True)
