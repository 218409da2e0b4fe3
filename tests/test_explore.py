"""scope.explore: the tour's explorer (kept tokens, theta-coverage, answers per control setting) and the rule
that picks the tour's example. Expected values come from direct calls of the library's parts (the vision
tower, scope.select, a hand-written coverage count, generate under scope.patch), not from the explorer."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch

import scope
from scope import explore
from scope.methods import PRE_LLM, names
from scope.patch import llava as llava_patch
from scope.patch.llava import vision_features
from scope.testing import chat_prompt, tiny_images, tiny_llava

QUESTIONS = ["how many circle ?", "what colour is the square ?", "is there a red triangle ?"]
TRUTHS = ["two", "red", "yes"]


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_llava(seed=0)
    images = tiny_images(len(QUESTIONS), seed=3)
    samples = [
        {"image": im, "question": q, "answer": a, "family": "counting", "question_id": f"q{i}"}
        for i, (im, q, a) in enumerate(zip(images, QUESTIONS, TRUTHS))
    ]
    return model, processor, samples


@pytest.fixture
def explorer(tiny):
    model, processor, samples = tiny
    return explore.Explorer(model, processor, samples, seed=5)


def _tower(model, processor, image):
    pv = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats, sal, keys = vision_features(model, pv)
    return feats[0].float(), sal[0].float(), keys[0].float(), pv


def _generate(model, processor, sample, **patch_args) -> str:
    """The model's greedy answer, by hand: processor, (patched) generate, decode the new tokens."""
    inputs = processor(
        images=[sample["image"]], text=[chat_prompt(processor, sample["question"])], return_tensors="pt"
    )
    if patch_args:
        scope.patch(model, **patch_args)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1)
    finally:
        scope.unpatch(model)
    # a pre-LLM patch returns the caller's full prompt in front of the new tokens
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def test_offers_the_unpruned_model_and_every_pre_llm_method():
    offered = explore.explorer_methods()
    assert offered[0] == "none" and set(offered[1:]) == set(names(PRE_LLM))
    assert "fastv" not in offered and "pdrop" not in offered


@pytest.mark.parametrize("method", ["scope", "saliency", "coverage", "divprune", "visionzip", "random"])
def test_kept_tokens_are_scope_select_on_the_towers_outputs(tiny, explorer, method):
    model, processor, samples = tiny
    feats, sal, keys, pv = _tower(model, processor, samples[1]["image"])
    opts = {"alpha": 2.0} if method == "scope" else {}
    if method == "visionzip":
        opts["metric"] = keys
    if method == "random":  # the patch seeds the draw by the image's pixels (a CRC-32 per image)
        import zlib

        opts |= {"seed": 5, "sample_ids": [zlib.crc32(pv[0].float().numpy().tobytes())]}
    expected = scope.select(feats, sal, budget=6, method=method, **opts)
    got = explorer.kept(1, method, 6, alpha=2.0)
    assert torch.equal(got, expected)
    assert got.shape == (6,)


def test_unpruned_and_full_budget_keep_every_token(explorer):
    assert torch.equal(explorer.kept(0, "none", 3), torch.arange(16))
    assert explorer.check(0, "none", 3)[2] == 16  # the unpruned model's budget is all N
    assert torch.equal(explorer.kept(0, "scope", 16), torch.arange(16))


@pytest.mark.parametrize("method", ["scope", "random", "visionzip"])
def test_the_tokens_shown_are_the_tokens_the_patched_model_used(explorer, monkeypatch, method):
    seen = []
    real = llava_patch.select_rows
    monkeypatch.setattr(llava_patch, "select_rows", lambda *a: seen.append(real(*a)[0]) or real(*a))
    explorer.answer(2, method, 5, alpha=0.5)
    assert len(seen) == 1
    assert torch.equal(seen[0][0].cpu(), explorer.kept(2, method, 5, alpha=0.5))


def test_theta_coverage_counts_tokens_close_to_a_kept_one(tiny, explorer):
    model, processor, samples = tiny
    feats = _tower(model, processor, samples[0]["image"])[0]
    kept = explorer.kept(0, "saliency", 4)
    unit = feats / feats.norm(dim=-1, keepdim=True)
    best = (unit @ unit[kept].T).max(dim=1).values  # each token's most similar kept token, by hand
    best[kept] = 1.0  # a kept token covers itself
    for theta in (0.0, 0.5, 0.9, 1.0):
        expected = (best >= theta).float().mean().item()
        assert explorer.coverage(0, "saliency", 4, theta=theta) == pytest.approx(expected)
    assert explorer.coverage(0, "saliency", 4, theta=1.0) == pytest.approx(4 / 16)
    assert explorer.coverage(0, "none", 16, theta=0.99) == 1.0


@pytest.mark.parametrize(
    "method, budget, alpha", [("none", 16, 1.0), ("scope", 4, 1.0), ("scope", 4, 0.0), ("saliency", 8, 1.0)]
)
def test_answer_is_the_models_greedy_answer_under_the_same_patch(tiny, explorer, method, budget, alpha):
    model, processor, samples = tiny
    patch_args = {} if method == "none" else {"method": method, "budget": budget}
    if method == "scope":
        patch_args["alpha"] = alpha
    expected = _generate(model, processor, samples[0], **patch_args)
    got = explorer.answer(0, method, budget, alpha)
    assert isinstance(got, str) and got == expected
    assert not scope.is_patched(model)  # the explorer leaves the model as it found it


def test_answers_are_cached_and_batched_answers_match_single_ones(tiny, explorer, monkeypatch):
    batched = explorer.answers([0, 1, 2], "scope", 4)
    fresh = explore.Explorer(*tiny, seed=5)
    assert batched == [fresh.answer(i, "scope", 4) for i in range(3)]
    calls = []
    real = llava_patch.select_rows
    monkeypatch.setattr(llava_patch, "select_rows", lambda *a: calls.append(1) or real(*a))
    explorer.answer(1, "scope", 4)
    assert calls == []  # answered from the cache, the model did not run
    explorer.answer(1, "saliency", 4, alpha=0.0)
    explorer.answer(1, "saliency", 4, alpha=3.0)
    assert calls == [1]  # another method runs the model; alpha does not matter to saliency-only


def test_view_bundles_the_pieces(explorer):
    v = explorer.view(1, "coverage", 5, theta=0.7)
    assert (v.index, v.method, v.budget, v.theta) == (1, "coverage", 5, 0.7)
    assert torch.equal(v.kept, explorer.kept(1, "coverage", 5))
    assert v.coverage == explorer.coverage(1, "coverage", 5, theta=0.7)
    assert v.answer == explorer.answer(1, "coverage", 5)
    assert v.correct == (v.answer.split(" ")[0].lower().strip(".") == TRUTHS[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"index": 3}, "index=3"),
        ({"index": -1}, "index=-1"),
        ({"method": "fastv"}, "method='fastv'"),
        ({"method": "nonsense"}, "nonsense"),
        ({"budget": 0}, "budget=0"),
        ({"budget": 17}, "budget=17"),
        ({"budget": 4.0}, "budget=4.0"),
        ({"alpha": -1.0}, "alpha=-1.0"),
        ({"alpha": float("nan")}, "alpha=nan"),
        ({"theta": 1.5}, "theta=1.5"),
        ({"theta": "high"}, "theta='high'"),
    ],
)
def test_bad_controls_raise_naming_the_value(explorer, kwargs, message):
    controls = {"index": 0, "method": "scope", "budget": 4, "alpha": 1.0, "theta": 0.9} | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        explorer.view(**controls)


def test_numpy_numbers_are_fine_controls(explorer):
    import numpy as np

    assert explorer.check(np.int64(1), "scope", np.int64(4), np.float32(0.5), np.float64(0.8)) == (
        1,
        "scope",
        4,
        0.5,
        pytest.approx(0.8),
    )


def test_bad_samples_raise(tiny):
    model, processor, samples = tiny
    with pytest.raises(ValueError, match="empty"):
        explore.Explorer(model, processor, [])
    with pytest.raises(ValueError, match="lacks \\['family'\\]"):
        explore.Explorer(model, processor, [{k: v for k, v in samples[0].items() if k != "family"}])


def test_static_grid_has_one_panel_per_question_and_setting(explorer):
    fig = explore.static_grid(explorer, [0, 2], ["none", "saliency", "scope"], [8, 4], title="t")
    # per question: the unpruned model once + 2 pruned methods x 2 budgets = 5 panels; 2 questions
    assert len(fig.axes) == 2 * (1 + 2 * 2)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("All tokens, 16 of 16\n")
    v = explorer.view(2, "scope", 4)
    assert titles[-1] == explore.panel_title(v, 16)
    assert f"“{v.answer}”" in titles[-1] and f"{100 * v.coverage:.0f}%" in titles[-1]
    assert "Q2: is there a red triangle ?" in fig.axes[5].get_ylabel().replace("\n", " ")
    plt.close(fig)
    fig = explore.static_grid(explorer, [1], ["coverage"], [4])  # no unpruned column
    assert len(fig.axes) == 1
    plt.close(fig)
    with pytest.raises(ValueError, match="budgets"):
        explore.static_grid(explorer, [1], ["scope"], [])


def test_gap_table_and_the_rule(tiny, explorer):
    table = explore.coverage_gap_table(explorer, budget=4, theta=0.9)
    assert list(table["index"]) == [0, 1, 2]
    for _, row in table.iterrows():
        i = row["index"]
        for m in ("saliency", "scope"):
            assert row[f"coverage_{m}"] == explorer.coverage(i, m, 4, theta=0.9)
            assert row[f"answer_{m}"] == _generate(*tiny[:2], tiny[2][i], method=m, budget=4)
        assert row["gap"] == pytest.approx(row["coverage_scope"] - row["coverage_saliency"])
    assert explore.pick_example(table) in {0, 1, 2}


def test_rule_prefers_a_contrast_then_the_largest_gap():
    table = pd.DataFrame(
        {
            "index": [0, 1, 2, 3, 4],
            "coverage_saliency": [0.1, 0.5, 0.3, 0.2, 0.05],
            "coverage_scope": [1.0, 1.0, 1.0, 0.9, 1.0],  # gaps 0.9, 0.5, 0.7, 0.7, 0.95
            "correct_saliency": [True, False, False, False, False],
            "correct_scope": [True, True, True, True, False],
        }
    )
    # 0 and 4 have larger gaps but no contrast; 2 and 3 tie at 0.7: the lower index wins
    assert explore.pick_example(table) == 2
    assert explore.pick_example(table.assign(correct_scope=False)) == 4  # no contrast: the largest gap
    # the other direction: saliency right where SCOPE is wrong (1 and 4), by saliency's gap over SCOPE
    flipped = table.assign(
        correct_saliency=[False, True, False, False, True], correct_scope=[True, False, True, True, False]
    )
    assert explore.pick_example(flipped, worse="scope", better="saliency") == 1  # -0.5 > -0.95
    with pytest.raises(ValueError, match="correct_scope"):
        explore.pick_example(table.drop(columns="correct_scope"))


def test_widget_needs_ipywidgets_and_says_how_to_get_it(explorer, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # as if it were not installed
    with pytest.raises(ImportError, match="notebooks"):
        explorer.widget()


def test_widget_controls_redraw(explorer):
    widgets = pytest.importorskip("ipywidgets")
    box = explorer.widget(indices=[0, 2], budget=4)
    controls = {c.description: c for row in box.children[:2] for c in row.children}
    assert set(controls) == {"image", "method", "budget", "α", "θ"}
    assert controls["budget"].max == 16 and controls["budget"].value == 4
    assert [v for _, v in controls["image"].options] == [0, 2]
    controls["method"].value = "saliency"
    assert controls["α"].disabled  # saliency-only takes no alpha
    controls["method"].value = "scope"
    assert not controls["α"].disabled
    assert isinstance(box.children[2], widgets.Output)
