"""FastV and PDrop inside the language model of tiny LLaVA / LLaVA-NeXT models."""

from __future__ import annotations

import pytest
import torch

import scope
from scope.patch import equivalent_tokens, is_patched
from scope.testing import chat_prompt, tiny_images, tiny_llava, tiny_llava_next

N = 16
LAYERS = 6
TOL = 1e-5


@pytest.fixture(scope="module")
def llava():
    model, processor = tiny_llava(seed=3, text_layers=LAYERS)
    yield model, processor
    scope.unpatch(model)


def schedule(method, budget, n_visual, num_layers, options):
    return scope.get_method(method).tokens_per_layer(budget, n_visual, num_layers, options)


def _inputs(processor, questions, images):
    text = [chat_prompt(processor, q) for q in questions]
    return processor(images=images, text=text, return_tensors="pt", padding=True)


def test_schedule_and_equivalent_tokens():
    assert schedule("fastv", 64, 576, 32, {}) == [576, 576] + [64] * 30
    assert equivalent_tokens("fastv", 64, 576, 32) == pytest.approx((2 * 576 + 30 * 64) / 32)
    # PDrop: stage ends 8/16/24, halving; budget=None is the paper's ratio schedule
    assert schedule("pdrop", None, 576, 32, {}) == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert schedule("pdrop", 100, 576, 32, {}) == [576] * 8 + [100] * 8 + [50] * 8 + [25] * 8
    assert schedule("pdrop", None, 576, 40, {})[:11] == [576] * 10 + [288]  # scaled to the depth
    assert equivalent_tokens("scope", 64, 576, 32) == 64
    with pytest.raises(ValueError, match="layer"):
        schedule("fastv", 64, 576, 32, {"layer": 32})
    with pytest.raises(ValueError, match="ratio"):
        schedule("pdrop", None, 576, 32, {"ratio": 1.5})
    with pytest.raises(ValueError, match="unknown option"):
        schedule("fastv", 64, 576, 32, {"alpha": 1.0})


@torch.no_grad()
@pytest.mark.parametrize("method,budget", [("fastv", 5), ("pdrop", 8)])
def test_counts_and_batch_equals_alone(llava, method, budget):
    model, processor = llava
    questions = ["what is in the image ?", "how many red circle ?", "yes"]
    images = tiny_images(3, seed=5)
    with scope.patch(model, method=method, budget=budget):
        batch = _inputs(processor, questions, images)
        assert (batch.attention_mask == 0).any()
        logits = model(**batch).logits
        assert logits.shape[:2] == batch.input_ids.shape  # scattered back to the caller's length
        counts = model._scope.last["visual_tokens_per_layer"]
        expected = schedule(method, budget, N, LAYERS, {})
        assert counts.tolist() == [expected] * 3
        assert model._scope.last["equivalent_tokens"] == [pytest.approx(sum(expected) / LAYERS)] * 3
        gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
        for i, (q, im) in enumerate(zip(questions, images)):
            alone = _inputs(processor, [q], [im])
            torch.testing.assert_close(logits[i, -1], model(**alone).logits[0, -1], atol=TOL, rtol=0)
            new = model.generate(**alone, max_new_tokens=5, do_sample=False)[0, alone.input_ids.shape[1] :]
            assert torch.equal(gen[i, batch.input_ids.shape[1] :][: new.numel()], new)  # rows stop at EOS


@torch.no_grad()
def test_full_budget_matches_unpatched(llava):
    # keeping every token still goes through the packing, explicit masks and swapped RoPE tables
    model, processor = llava
    inputs = _inputs(processor, ["what is in the image ?", "yes"], tiny_images(2, seed=1))
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    for method in ("fastv", "pdrop"):
        with scope.patch(model, method=method, budget=N * 4 if method == "pdrop" else N):
            torch.testing.assert_close(model(**inputs).logits[:, -1], ref[:, -1], atol=TOL, rtol=0)
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref_gen)


def _reference_logits(model, input_ids, pixel_values, kept_slots, stage_layers, method):
    """Slow reference: the full sequence through every layer, dropped prompt tokens masked out as keys.

    No packing, no per-stage KV cache: a dropped token simply stops being visible from its stage on;
    FastV keeps original positions, PDrop numbers the visible tokens compactly per stage.
    """
    base = model.model
    lm = base.language_model
    emb = base.get_input_embeddings()(input_ids)
    feats = torch.cat(base.get_image_features(pixel_values=pixel_values).pooler_output)
    emb = emb.masked_scatter((input_ids == model.config.image_token_id)[..., None], feats)
    T = input_ids.shape[1]
    n_prompt = kept_slots[0].shape[1]
    visible = torch.ones(T, dtype=torch.bool)
    pos = torch.arange(T)
    h = emb
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i, layer in enumerate(lm.layers):
        if i in stage_layers:
            visible = torch.ones(T, dtype=torch.bool)
            visible[:n_prompt] = kept_slots[stage_layers.index(i)][0]
            if method == "pdrop":
                pos = (visible.long().cumsum(0) - 1).clamp(min=0)
        mask = (causal & visible[None, :]) | torch.eye(T, dtype=torch.bool)
        rope = lm.rotary_emb(h, position_ids=pos[None])
        h = layer(h, attention_mask=mask[None, None], position_embeddings=rope, position_ids=pos[None])
    return model.lm_head(lm.norm(h))[0]


@torch.no_grad()
@pytest.mark.parametrize("method,budget", [("fastv", 4), ("pdrop", 8)])
def test_generate_with_cache_matches_reference(llava, method, budget):
    model, processor = llava
    inputs = _inputs(processor, ["describe the picture of a red circle ."], tiny_images(1, seed=8))
    with scope.patch(model, method=method, budget=budget):
        out = model.generate(
            **inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        kept = model._scope.last["kept_slots"]
        stage_layers = model._scope.last["stage_layers"]
    n_text = int((inputs.input_ids != model.config.image_token_id).sum())
    assert [int(k.sum()) - n_text for k in kept] == [
        schedule(method, budget, N, LAYERS, {})[s] for s in stage_layers
    ]
    ref = _reference_logits(model, out.sequences[:, :-1], inputs.pixel_values, kept, stage_layers, method)
    L = inputs.input_ids.shape[1]
    for t, step_logits in enumerate(out.logits):  # teacher-forced on the generated tokens
        torch.testing.assert_close(step_logits[0], ref[L - 1 + t], atol=1e-4, rtol=0)


@torch.no_grad()
def test_in_llm_on_next_and_beams_and_unpatch():
    model, processor = tiny_llava_next(seed=2, text_layers=4)
    inputs = processor(
        images=tiny_images(2, size=(48, 30), seed=4),
        text=[chat_prompt(processor, "what ?"), chat_prompt(processor, "how many ?")],
        return_tensors="pt",
        padding=True,
    )
    ref = model(**inputs).logits
    n_visual = int((inputs.input_ids[0] == model.config.image_token_id).sum())
    with scope.patch(model, method="fastv", budget=6):
        model(**inputs)
        assert model._scope.last["visual_tokens_per_layer"][0].tolist() == [n_visual, n_visual, 6, 6]
        out = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
        assert out.shape == (2, inputs.input_ids.shape[1] + 3)
    assert not any("forward" in layer.__dict__ for layer in model.model.language_model.layers)
    assert not model.model._forward_pre_hooks and not model.model.language_model._forward_hooks
    assert torch.equal(model(**inputs).logits, ref)


def test_in_llm_bad_inputs():
    model, _ = tiny_llava(seed=0, text_layers=4, attn_implementation="eager")
    with pytest.raises(ValueError, match="fastv layer"):
        scope.patch(model, method="fastv", budget=4, layer=4)
    with pytest.raises(ValueError, match="budget"):
        scope.patch(model, method="fastv", budget=None)
    assert not is_patched(model)


@torch.no_grad()
def test_eager_attention_gives_the_same_drop():
    sdpa, processor = tiny_llava(seed=4, text_layers=4)
    eager, _ = tiny_llava(seed=4, text_layers=4, attn_implementation="eager")
    inputs = _inputs(processor, ["what is in the image ?", "yes"], tiny_images(2, seed=6))
    with scope.patch(sdpa, method="pdrop", budget=8), scope.patch(eager, method="pdrop", budget=8):
        a, b = sdpa(**inputs).logits, eager(**inputs).logits
        kept_a, kept_b = sdpa._scope.last["kept_slots"], eager._scope.last["kept_slots"]
    assert all(torch.equal(x, y) for x, y in zip(kept_a, kept_b))
    torch.testing.assert_close(a[:, -1], b[:, -1], atol=TOL, rtol=0)


@torch.no_grad()
def test_under_accelerate_device_map_hooks(llava):
    """A ``device_map`` model: accelerate wraps every layer's forward to move its inputs; our wrapper runs
    outside it and follows each layer's execution device. Here every device is the CPU (no second device on
    this machine): the hooks are there and the results equal the undispatched model's."""
    from accelerate import dispatch_model

    from scope.testing import tiny_llava

    model, processor = llava
    twin, _ = tiny_llava(seed=3, text_layers=LAYERS)
    twin = dispatch_model(twin, device_map={"": "cpu"}, force_hooks=True)
    assert hasattr(twin.model.language_model.layers[0], "_hf_hook")
    inputs = _inputs(processor, ["what is in the image ?", "yes"], tiny_images(2, seed=2))
    for method, budget in (("fastv", 5), ("pdrop", 8)):
        with scope.patch(model, method, budget), scope.patch(twin, method, budget):
            torch.testing.assert_close(twin(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
            a = twin.generate(**inputs, max_new_tokens=4, do_sample=False)
            assert torch.equal(a, model.generate(**inputs, max_new_tokens=4, do_sample=False))


@torch.no_grad()
def test_each_layer_asks_its_device_on_every_call(llava, monkeypatch):
    """The device is not frozen at patch time: a model moved after ``scope.patch`` (``model.to("cuda")``)
    keeps working, since every wrapped layer looks up where it computes when it is called."""
    import importlib

    in_llm = importlib.import_module("scope.patch.in_llm")
    model, processor = llava
    asked = []
    real = in_llm._layer_device
    monkeypatch.setattr(in_llm, "_layer_device", lambda layer: asked.append(layer) or real(layer))
    inputs = _inputs(processor, ["what is in the image ?"], tiny_images(1))
    with scope.patch(model, "fastv", 5):
        assert asked == []  # nothing decided when patching
        model(**inputs)
        model(**inputs)
    assert len(asked) == 2 * LAYERS
