"""scope.patch on tiny LLaVA / LLaVA-NeXT models built offline (pre-LLM pruning)."""

from __future__ import annotations

import pytest
import torch

import scope
from scope.patch import is_patched
from scope.patch.llava import vision_features
from scope.testing import chat_prompt, tiny_images, tiny_llava, tiny_llava_next

N = 16  # visual tokens per image / crop of the tiny models (32 px, patch 8)
TOL = 1e-5  # batch vs alone: same math, different padding -> float32 reduction-order noise only


@pytest.fixture(scope="module")
def llava():
    model, processor = tiny_llava(seed=0)
    yield model, processor
    scope.unpatch(model)


@pytest.fixture(scope="module")
def llava_next():
    model, processor = tiny_llava_next(seed=0)
    yield model, processor
    scope.unpatch(model)


def _inputs(processor, questions, images, n_images=None):
    n_images = n_images or [1] * len(questions)
    text = [
        chat_prompt(processor, q, n) if n else f"USER: {q} ASSISTANT:" for q, n in zip(questions, n_images)
    ]
    return processor(images=images or None, text=text, return_tensors="pt", padding=True)


class LLMInput:
    """Records what enters the language model: sequence length and image-token count per row."""

    def __init__(self, model):
        self.image_token_id = model.config.image_token_id
        self.handles = [
            model.model.register_forward_pre_hook(self._ids, with_kwargs=True),
            model.model.language_model.register_forward_pre_hook(self._embeds, with_kwargs=True),
        ]

    def _ids(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids.shape[1] > 1:  # prefills only, not the one-token decoding steps
            self.image_tokens = (ids == self.image_token_id).sum(1).tolist()

    def _embeds(self, module, args, kwargs):
        if kwargs["inputs_embeds"].shape[1] > 1:
            self.length = kwargs["inputs_embeds"].shape[1]

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def test_saliency_hook_matches_eager_attention():
    sdpa, processor = tiny_llava(seed=1)
    eager, _ = tiny_llava(seed=1, attn_implementation="eager")
    pv = processor(images=tiny_images(3, seed=5), text=["<image>"] * 3, return_tensors="pt").pixel_values
    feats, sal, keys = vision_features(sdpa, pv)
    out = eager.model.vision_tower(pv, output_attentions=True, output_hidden_states=True)
    ref_sal = out.attentions[-2][:, :, 0, 1:].sum(1)  # CLS row of layer -2, summed over heads
    assert sal.shape == (3, N) and feats.shape == (3, N, 32) and keys.shape[:2] == (3, N)
    torch.testing.assert_close(sal, ref_sal, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(feats, out.hidden_states[-2][:, 1:], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(sal[0], sal[0].mean().expand(N))  # not trivially uniform


@torch.no_grad()
def test_none_and_full_budget_equal_unpatched(llava):
    model, processor = llava
    inputs = _inputs(processor, ["what is in the image ?"], tiny_images(1))
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    for method, budget in [("none", 64), ("scope", N), ("scope", 1000), ("visionzip", N)]:
        with scope.patch(model, method=method, budget=budget):
            assert torch.equal(model(**inputs).logits, ref), (method, budget)
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref_gen)


@torch.no_grad()
@pytest.mark.parametrize("method", ["scope", "visionzip", "random", "divprune"])
def test_llm_sees_k_tokens_per_image(llava, method):
    model, processor = llava
    inputs = _inputs(processor, ["what is in the image ?", "how many ?"], tiny_images(2, seed=3))
    rec = LLMInput(model)
    try:
        model(**inputs)
        full = rec.length
        with scope.patch(model, method=method, budget=5):
            logits = model(**inputs).logits
            assert rec.image_tokens == [5, 5]
            assert rec.length == full - (N - 5) == logits.shape[1]
            assert model._scope.last["tokens_per_image"] == [5, 5]
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert rec.image_tokens == [5, 5]  # the prefill of generate saw the pruned prompt too
    finally:
        rec.close()
    # generate hands back the caller's own prompt, then the new tokens
    assert torch.equal(out[:, : inputs.input_ids.shape[1]], inputs.input_ids)
    assert out.shape[1] == inputs.input_ids.shape[1] + 3


@torch.no_grad()
def test_padded_batch_equals_each_alone(llava):
    model, processor = llava
    questions = ["what is in the image ?", "how many red circle and blue square ?", "yes"]
    images = tiny_images(3, seed=7)
    with scope.patch(model, method="scope", budget=6):
        batch = _inputs(processor, questions, images)
        assert (batch.attention_mask == 0).any()  # really left padded
        logits = model(**batch).logits[:, -1]
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch.input_ids.shape[1] :]
        for i, (q, im) in enumerate(zip(questions, images)):
            alone = _inputs(processor, [q], [im])
            torch.testing.assert_close(logits[i], model(**alone).logits[0, -1], atol=TOL, rtol=0)
            new = model.generate(**alone, max_new_tokens=4, do_sample=False)[0, alone.input_ids.shape[1] :]
            assert torch.equal(gen[i, : new.numel()], new)  # a row may stop early at EOS


@torch.no_grad()
def test_text_only_and_mixed_batches(llava):
    model, processor = llava
    text_only = processor(text=["USER: what is this ? ASSISTANT:"], return_tensors="pt")
    ref = model(**text_only).logits
    ref_gen = model.generate(**text_only, max_new_tokens=3, do_sample=False)
    with scope.patch(model, method="scope", budget=4):
        assert torch.equal(model(**text_only).logits, ref)
        assert torch.equal(model.generate(**text_only, max_new_tokens=3, do_sample=False), ref_gen)
        # one row with an image, one without, left padded together
        im = tiny_images(1, seed=2)
        mixed = _inputs(processor, ["what is in the image ?", "how many ?"], im, n_images=[1, 0])
        logits = model(**mixed).logits[:, -1]
        torch.testing.assert_close(
            logits[0],
            model(**_inputs(processor, ["what is in the image ?"], im)).logits[0, -1],
            atol=TOL,
            rtol=0,
        )
        alone_text = processor(text=["USER: how many ? ASSISTANT:"], return_tensors="pt")
        torch.testing.assert_close(logits[1], model(**alone_text).logits[0, -1], atol=TOL, rtol=0)


@torch.no_grad()
def test_several_images_in_one_prompt(llava):
    model, processor = llava
    images = tiny_images(3, seed=11)
    inputs = _inputs(processor, ["what is left and right ?", "what ?"], images, n_images=[2, 1])
    rec = LLMInput(model)
    try:
        with scope.patch(model, method="scope", budget=3):
            logits = model(**inputs).logits
            assert rec.image_tokens == [6, 3]
            assert model._scope.last["tokens_per_image"] == [3, 3, 3]
            # the two-image row alone gives the same answer
            alone = _inputs(processor, ["what is left and right ?"], images[:2], n_images=[2])
            torch.testing.assert_close(logits[0, -1], model(**alone).logits[0, -1], atol=TOL, rtol=0)
    finally:
        rec.close()


@torch.no_grad()
def test_unpatch_restores_exactly(llava):
    model, processor = llava
    inputs = _inputs(processor, ["what is in the image ?"], tiny_images(1, seed=4))
    ref = model(**inputs).logits
    scope.patch(model, method="scope", budget=4)
    assert is_patched(model)
    scope.patch(model, method="random", budget=8, seed=1)  # re-patching replaces the patch
    assert model(**inputs).logits.shape[1] == ref.shape[1] - (N - 8)
    scope.unpatch(model)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert not is_patched(model)
    assert torch.equal(model(**inputs).logits, ref)
    scope.unpatch(model)  # a no-op now


def test_bad_inputs(llava, llava_next):
    model, processor = llava
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        scope.patch(model, method="nope", budget=4)
    with pytest.raises(ValueError, match="budget"):
        scope.patch(model, method="scope", budget=0)
    with pytest.raises(ValueError, match="LlamaModel"):
        scope.patch(model.model.language_model, method="scope", budget=4)
    with pytest.raises(ValueError, match="keep_newlines"):
        scope.patch(model, method="scope", budget=4, keep_newlines=True)
    assert not is_patched(model)
    next_model, next_processor = llava_next
    inputs = _inputs(next_processor, ["what ?"], tiny_images(1, size=(64, 32)))
    with scope.patch(next_model, method="scope", budget=2):  # fewer than one token per crop
        with pytest.raises(ValueError, match="smaller than the 3 crops"):
            next_model(**inputs)


@torch.no_grad()
def test_next_keep_all_with_newlines_equals_unpatched(llava_next):
    # a 64x32 image fits the 1x2 grid exactly: no letterbox, so transformers' own packing (base crop,
    # stitched grid rows each followed by a newline) must equal "keep every token + keep_newlines"
    model, processor = llava_next
    inputs = _inputs(processor, ["what is in the image ?", "yes"], tiny_images(2, size=(64, 32), seed=3))
    ref = model(**inputs).logits
    with scope.patch(model, method="scope", budget=3 * N, keep_newlines=True):
        torch.testing.assert_close(model(**inputs).logits, ref, atol=1e-6, rtol=0)
    with scope.patch(model, method="none"):
        assert torch.equal(model(**inputs).logits, ref)


@torch.no_grad()
def test_next_mapping_base_first_then_stitched_raster(llava_next):
    model, processor = llava_next
    image = tiny_images(1, size=(64, 32), seed=9)
    inputs = _inputs(processor, ["what ?"], image)
    got = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: got.update(embeds=kw["inputs_embeds"]), with_kwargs=True
    )
    try:
        with scope.patch(model, method="saliency", budget=12):  # 3 crops -> 4 tokens each
            model(**inputs)
            idx = model._scope.last["indices"][0]  # [3 crops, 4]
        # expected order from transformers' own packing of an id map (no unpad on this size, no newlines)
        crops = inputs.pixel_values[0]
        feats, sal, _ = vision_features(model, crops)
        assert torch.equal(idx, sal.topk(4).indices.sort(-1).values)
        id_map = torch.zeros(3, N, 1)
        for c in range(3):
            id_map[c, idx[c], 0] = (c * N + idx[c] + 1).float()
        packed, _ = model.model.pack_image_features(
            [id_map], inputs.image_sizes, "default", image_newline=None
        )
        order = packed[0][:, 0]
        order = order[order > 0].long() - 1  # flat crop * N + token, in the sequence order
        assert order[:4].div(N, rounding_mode="floor").eq(0).all()  # base crop first
        expected = model.model.multi_modal_projector(feats.reshape(-1, feats.shape[-1])[order])
        mask = _collapsed_image_mask(model, inputs, 12)
        torch.testing.assert_close(got["embeds"][0][mask[0]], expected, atol=1e-6, rtol=0)
    finally:
        hook.remove()


def _collapsed_image_mask(model, inputs, k):
    """Image-token mask of the collapsed prompt (first k placeholders of the run kept)."""
    ids = inputs.input_ids
    is_img = ids == model.config.image_token_id
    keep = torch.ones_like(is_img)
    pos = is_img[0].nonzero()[:, 0]
    keep[0, pos[k:]] = False
    return is_img[keep].view(1, -1)


@torch.no_grad()
def test_next_tokens_and_generate(llava_next):
    model, processor = llava_next
    images = tiny_images(2, size=(48, 30), seed=1) + tiny_images(1, size=(64, 64), seed=2)
    inputs = _inputs(processor, ["what ?", "how many ?", "describe it ."], images)
    rec = LLMInput(model)
    try:
        with scope.patch(model, method="scope", budget=10):
            crops = [3, 3, 5]  # 48x30 -> 1x2 grid + base; 64x64 -> 2x2 grid + base
            model(**inputs)
            assert model._scope.last["crops"] == crops
            assert rec.image_tokens == [(10 // c) * c for c in crops]
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            alone = _inputs(processor, ["describe it ."], images[2:])
            out_alone = model.generate(**alone, max_new_tokens=3, do_sample=False)
            new = out_alone[0, alone.input_ids.shape[1] :]
            assert torch.equal(out[2, inputs.input_ids.shape[1] :][: new.numel()], new)
        with scope.patch(model, method="scope", budget=10, keep_newlines=True):
            model(**inputs)
            per_image = model._scope.last["tokens_per_image"]
            assert all(t > (10 // c) * c for t, c in zip(per_image, crops))  # newlines added
    finally:
        rec.close()


def test_package_attributes_are_the_functions_even_after_importing_the_submodules(llava):
    # `import scope.patch` would rebind scope.patch to the submodule; scope/__init__ imports them first
    import scope.load  # noqa: F401
    import scope.patch  # noqa: F401

    assert callable(scope.patch) and callable(scope.load) and callable(scope.select)
    model, _ = llava
    with scope.patch(model, method="scope", budget=4) as patched:
        assert patched is model and is_patched(model)
    assert not is_patched(model)


@torch.no_grad()
def test_reused_vision_features_give_the_same_picks_and_run_the_tower_once(llava, llava_next):
    for model, processor in (llava, llava_next):
        inputs = _inputs(processor, ["what ?", "yes"], tiny_images(2, size=(64, 32), seed=5))
        calls = []
        hook = model.model.vision_tower.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        try:
            plain = {}
            for method in ("scope", "visionzip", "random"):
                with scope.patch(model, method, 6):
                    plain[method] = (model(**inputs).logits, model._scope.last["indices"])
            n_plain = len(calls)
            with scope.reuse_vision_features(model) as cache:
                for method in ("scope", "visionzip", "random"):
                    with scope.patch(model, method, 6):
                        logits, idx = model(**inputs).logits, model._scope.last["indices"]
                    assert torch.equal(logits, plain[method][0])
                    assert all(torch.equal(a, b) for a, b in zip(idx, plain[method][1]))
        finally:
            hook.remove()
        assert n_plain == 3 and len(calls) - n_plain == 1  # one tower pass for three methods
        assert (cache.hits, cache.misses) == (2, 1)
        assert "_scope_vision_cache" not in model.__dict__  # gone after the block


def test_vision_cache_keeps_its_first_entries_when_full():
    from scope.patch.cache import VisionCache

    cache = VisionCache(max_bytes=2 * 4 * 10)  # room for two entries of ten float32 values
    batches = [torch.full((1, 10), float(i)) for i in range(3)]
    for _ in range(2):  # a sweep reads the same batches twice, in the same order
        for b in batches:
            key = cache.key(b)
            if cache.get(key) is None:
                cache.put(key, (b * 2,))
    assert (cache.hits, cache.misses) == (2, 4)  # the first two hit in the second pass; the third never fits
    got = cache.get(cache.key(batches[0]))[0]
    got.add_(1)  # a caller changing what it got does not change the cache
    assert torch.equal(cache.get(cache.key(batches[0]))[0], batches[0] * 2)


@torch.no_grad()
def test_next_selects_all_crops_of_a_batch_in_one_call_per_crop_budget(llava_next, monkeypatch):
    import importlib

    next_patch = importlib.import_module("scope.patch.llava_next")  # scope.patch is also the function

    model, processor = llava_next
    images = tiny_images(2, size=(64, 32), seed=1) + tiny_images(1, size=(64, 64), seed=2)  # 3, 3 and 5 crops
    inputs = _inputs(processor, ["what ?", "yes", "how many red circle ?"], images)
    calls = []
    real = next_patch.select_rows
    monkeypatch.setattr(next_patch, "select_rows", lambda f, *a: calls.append(f.shape[0]) or real(f, *a))
    with scope.patch(model, "scope", 15):  # 5 per crop for 3-crop images, 3 per crop for the 5-crop one
        batched = model(**inputs).logits[:, -1]
        kept = model._scope.last["indices"]
    assert sorted(calls) == [5, 6]  # one call for both 3-crop images, one for the 5-crop image
    for i, (q, image) in enumerate(zip(["what ?", "yes", "how many red circle ?"], images)):
        with scope.patch(model, "scope", 15):
            alone = model(**_inputs(processor, [q], [image])).logits[:, -1]
            assert torch.equal(model._scope.last["indices"][0], kept[i])
        torch.testing.assert_close(alone[0], batched[i], atol=TOL, rtol=0)
