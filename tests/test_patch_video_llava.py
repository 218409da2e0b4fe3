"""scope.patch on a tiny Video-LLaVA built offline from the published config: images and videos pruned
before the LLM, a video's budget split over its frames, each frame keeping its CLS token."""

from __future__ import annotations

import pytest
import torch

import scope
from scope.efficiency import llm_layer_flops_closed_form, load_config
from scope.efficiency_video import video_prefill_flops, video_tokens
from scope.patch import is_patched
from scope.testing import tiny_images, tiny_video, tiny_video_llava

TOL = 1e-5  # batch vs alone: same math, different padding -> float32 reduction-order noise only
FRAMES = 4
PER_FRAME = 17  # 32 px frames, 8 px patches: 16 patches + CLS
VIDEO_Q = "USER: <video>\nwhat is in the image ? ASSISTANT:"
IMAGE_Q = "USER: <image>\nhow many ? ASSISTANT:"


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_video_llava(seed=0)
    yield model, processor
    scope.unpatch(model)


def _videos(processor, questions, seeds, images=None):
    videos = [tiny_video(FRAMES, seed=s) for s in seeds]
    return processor(text=questions, videos=videos, images=images, padding=True, return_tensors="pt")


def _reference_rows(model, pixel_values_videos, frame_idx):
    """Independent of the patch: eager attention of the video tower, hidden_states[-2] rows at ``frame_idx``
    [videos, frames, k], projected; and the CLS attention of layer -2 over each frame's patches."""
    tower = model.model.video_tower
    model.set_attn_implementation("eager")
    try:
        out = tower(pixel_values_videos.flatten(0, 1), output_hidden_states=True, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    hidden = out.hidden_states[-2]  # [frames, 17, d]
    cls_attention = out.attentions[-2][:, :, 0, 1:].sum(1)  # layer -2 is the one whose output is read
    idx = frame_idx.flatten(0, 1)
    rows = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
    return model.model.multi_modal_projector(rows).flatten(0, 1), cls_attention


class LLMInput:
    """Records the prefill's embeddings and ids as the multimodal model receives them."""

    def __init__(self, model):
        self.model = model
        self.handle = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if kwargs["inputs_embeds"].shape[1] > 1:
            self.embeds = kwargs["inputs_embeds"]

    def close(self):
        self.handle.remove()


def test_tiny_model_keeps_the_published_layout(tiny):
    model, processor = tiny
    published = load_config("video-llava-7b")
    for key in ("vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act"):
        assert getattr(model.config, key) == getattr(published, key)
    inputs = _videos(processor, [VIDEO_Q, IMAGE_Q], [0], images=tiny_images(1))
    assert int((inputs.input_ids == model.config.video_token_id).sum()) == FRAMES * PER_FRAME
    assert int((inputs.input_ids == model.config.image_token_id).sum()) == PER_FRAME - 1  # CLS dropped


@torch.no_grad()
@pytest.mark.parametrize("method,budget", [("scope", 10_000), ("none", 8), ("visionzip", FRAMES * PER_FRAME)])
def test_keep_all_is_exact(tiny, method, budget):
    model, processor = tiny
    # one unpadded row with an image and a video (a padded batch gets compact positions, as on LLaVA)
    inputs = _videos(
        processor, ["USER: <image>\n<video>\nwhat is in the image ? ASSISTANT:"], [0], tiny_images(1)
    )
    scope.unpatch(model)
    ref = model(**inputs).logits
    with scope.patch(model, method, budget=budget):
        out = model(**inputs).logits
    assert torch.equal(out, ref)
    assert not is_patched(model)


@torch.no_grad()
def test_llm_reads_cls_plus_most_salient_patches_per_frame(tiny):
    model, processor = tiny
    inputs = _videos(processor, [VIDEO_Q], [3])
    k = 5
    scope.patch(model, "saliency", budget=FRAMES * k + 3)  # the remainder 3 is not spent
    rec = LLMInput(model)
    try:
        model(**inputs)
    finally:
        rec.close()
    idx = model._scope.last["frame_indices"]
    assert tuple(idx.shape) == (1, FRAMES, k)
    rows, cls_attention = _reference_rows(model, inputs.pixel_values_videos, idx)
    top = cls_attention.topk(k - 1, dim=-1).indices.sort(-1).values + 1  # patch i sits at 1 + i
    expected = torch.cat([torch.zeros(FRAMES, 1, dtype=torch.long), top], 1)
    assert torch.equal(idx[0], expected)
    slots = inputs.input_ids[0] == model.config.video_token_id
    first = int(slots.nonzero()[0])
    got = rec.embeds[0, first : first + FRAMES * k]
    torch.testing.assert_close(got, rows, atol=1e-5, rtol=1e-5)
    dropped = FRAMES * (PER_FRAME - k)
    assert model._scope.last["llm_input_length"] == inputs.input_ids.shape[1] - dropped


@torch.no_grad()
def test_frame_cls_options(tiny):
    model, processor = tiny
    inputs = _videos(processor, [VIDEO_Q], [1])
    scope.patch(model, "scope", budget=FRAMES * 6, keep_frame_cls=False)
    model(**inputs)
    idx = model._scope.last["frame_indices"]
    assert idx.shape[-1] == 6 and bool((idx >= 1).all())  # patches only
    # VisionZip's own keep_cls keeps the CLS once, as its first dominant token
    scope.patch(model, "visionzip", budget=FRAMES * 6, keep_cls=True, order="official")
    model(**inputs)
    idx = model._scope.last["frame_indices"][0]
    assert idx.shape == (FRAMES, 6)
    assert bool((idx[:, 0] == 0).all()) and bool((idx[:, 1:] > 0).all())
    scope.patch(model, "scope", budget=FRAMES)  # one token per frame: the CLS alone
    model(**inputs)
    assert torch.equal(model._scope.last["frame_indices"][0], torch.zeros(FRAMES, 1, dtype=torch.long))


@torch.no_grad()
def test_batch_equals_single(tiny):
    model, processor = tiny
    questions = [VIDEO_Q, "USER: <video>\nhow many ? ASSISTANT:"]
    scope.patch(model, "scope", budget=FRAMES * 7)
    batch = model(**_videos(processor, questions, [4, 5])).logits[:, -1]
    for i, (q, s) in enumerate(zip(questions, [4, 5])):
        alone = model(**_videos(processor, [q], [s])).logits[:, -1]
        torch.testing.assert_close(batch[i : i + 1], alone, atol=TOL, rtol=TOL)
    mixed = _videos(processor, [IMAGE_Q, VIDEO_Q], [6], images=tiny_images(1, seed=2))
    both = model(**mixed).logits[:, -1]
    assert model._scope.last["tokens_per_image"] == [PER_FRAME - 1]  # 16 <= budget 28: all kept
    assert model._scope.last["tokens_per_video"] == [FRAMES * 7]
    image_alone = model(**processor(text=[IMAGE_Q], images=tiny_images(1, seed=2), return_tensors="pt"))
    video_alone = model(**_videos(processor, [VIDEO_Q], [6]))
    torch.testing.assert_close(both[0:1], image_alone.logits[:, -1], atol=TOL, rtol=TOL)
    torch.testing.assert_close(both[1:2], video_alone.logits[:, -1], atol=TOL, rtol=TOL)


@torch.no_grad()
def test_generate_returns_caller_prompt(tiny):
    model, processor = tiny
    inputs = _videos(processor, [VIDEO_Q], [7])
    scope.unpatch(model)
    ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with scope.patch(model, "scope", budget=10_000):
        same = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(same, ref)
    with scope.patch(model, "scope", budget=FRAMES * 3):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs.input_ids.shape[1] + 4)
    assert torch.equal(out[:, : inputs.input_ids.shape[1]], inputs.input_ids)


def test_errors_name_the_bad_value(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="keep_frame_cls"):
        scope.patch(model, "scope", budget=8, keep_frame_cls="yes")
    with pytest.raises(ValueError, match="Video-LLaVA"):
        scope.patch(model, "fastv", budget=8)
    assert not is_patched(model)
    scope.patch(model, "scope", budget=FRAMES - 1)
    with pytest.raises(ValueError, match=f"budget={FRAMES - 1}"):
        model(**_videos(processor, [VIDEO_Q], [0]))
    scope.unpatch(model)


def test_video_tokens_and_flops_by_hand():
    # 224 px / 14 px = 16 -> 256 patches + CLS per frame; 136 over 8 frames = 17 per frame
    assert video_tokens(budget=136) == {
        "frames": 8, "patches_per_frame": 256, "tokens_per_frame": 257, "unpruned": 2056,
        "kept_per_frame": 17, "kept": 136,
    }  # fmt: skip
    t = load_config("video-llava-7b").text_config
    for budget, kept in ((None, 2056), (136, 136)):
        row = video_prefill_flops(method="scope", budget=budget)
        n = 64 + kept
        llm = t.num_hidden_layers * llm_layer_flops_closed_form(t, n) + 2 * t.hidden_size * t.vocab_size
        assert row["visual_kept"] == kept
        assert row["llm_gflops"] * 1e9 == pytest.approx(llm, rel=1e-9)
    with pytest.raises(ValueError, match="budget=4"):
        video_tokens(budget=4)
