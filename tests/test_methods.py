"""The method registry (scope.methods): one record per method, read by select, patch, efficiency and report."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import scope
from scope import efficiency, report, vis
from scope.methods import (
    IN_LLM,
    METHODS,
    NONE,
    PRE_LLM,
    Method,
    Option,
    from_paper_label,
    get_method,
    is_unpruned,
    names,
    register,
    unregister,
)
from scope.patch.llava import vision_features
from scope.testing import chat_prompt, tiny_images, tiny_llava


def _top_norm(features, saliency, budget, p=2.0):
    """Toy pre-LLM method: the K tokens of largest p-norm (ties to the lower index)."""
    score = features.norm(p=p, dim=-1)
    return score.sort(dim=-1, descending=True, stable=True).indices[..., :budget].sort(-1).values


@pytest.fixture
def toy():
    record = Method(
        "topnorm",
        PRE_LLM,
        "Top-norm",
        "TopNorm (toy)",
        fn=_top_norm,
        options={"p": Option(2.0, lambda x: isinstance(x, float) and x > 0, "a float > 0")},
        selection_flops=lambda n, k, d: 2 * n * d,
    )
    register(record)
    yield record
    unregister("topnorm")


def test_a_registered_toy_method_reaches_every_part_of_the_package(toy):
    assert "topnorm" in scope.METHODS and scope.METHODS["topnorm"] is toy
    feats = torch.randn(2, 36, 8, generator=torch.Generator().manual_seed(0))
    kept = scope.select(feats, None, 5, method="topnorm")
    assert torch.equal(kept, _top_norm(feats, None, 5))
    with pytest.raises(ValueError, match="option p must be a float > 0"):
        scope.select(feats, None, 5, method="topnorm", p=-1.0)
    # the patch: the LLM sees 5 tokens per image, picked by the toy function on the tower's features
    model, processor = tiny_llava(seed=0)
    inputs = processor(
        images=tiny_images(1), text=chat_prompt(processor, "what is this ?"), return_tensors="pt"
    )
    with scope.patch(model, "topnorm", 5), torch.no_grad():
        model(**inputs)
        assert model._scope.last["tokens_per_image"] == [5]
        tower_feats, _, _ = vision_features(model, inputs["pixel_values"])
        assert torch.equal(model._scope.last["indices"], _top_norm(tower_feats, None, 5))
    # FLOPs: five visual tokens in every LLM layer, and the closed form of its selection is counted
    config = efficiency.load_config("llava-1.5-7b")
    row = efficiency.prefill_flops(config, "topnorm", 64)
    assert row["per_layer"] == [64] * config.text_config.num_hidden_layers
    assert row["select_gflops"] == pytest.approx(2 * 576 * 1024 / 1e9)
    assert row["saliency_gflops"] == 0  # the record says it needs no saliency
    # report and figures print its labels
    assert report.paper_label("topnorm") == "TopNorm (toy)"
    assert vis.method_label("topnorm") == "Top-norm"
    assert from_paper_label("TopNorm (toy)") == "topnorm"


def test_unregistered_toy_is_gone():
    assert "topnorm" not in METHODS
    with pytest.raises(ValueError, match="unknown method 'topnorm'"):
        get_method("topnorm")


def test_register_refuses_a_taken_name_and_checks_the_record():
    with pytest.raises(ValueError, match="already registered"):
        register(Method("scope", PRE_LLM, "again", fn=_top_norm))
    with pytest.raises(ValueError, match="needs fn"):
        Method("nofn", PRE_LLM, "No fn")
    with pytest.raises(ValueError, match="stage"):
        Method("bad", "before", "Bad", fn=_top_norm)


@pytest.mark.parametrize("name", names(PRE_LLM))
def test_record_defaults_are_the_functions_defaults(name):
    record = get_method(name)
    params = inspect.signature(record.function).parameters
    for option, spec in record.options.items():
        assert params[option].default == spec.default, (name, option)
    assert set(record.options) == set(list(params)[3:]), "every keyword of the function is a declared option"


@pytest.mark.parametrize("alpha", [math.inf, -math.inf, math.nan, -0.5, "1", True])
def test_bad_alpha_is_refused_by_select_and_patch(alpha):
    feats, sal = torch.randn(1, 16, 4), torch.rand(1, 16)
    with pytest.raises(ValueError, match="alpha"):
        scope.select(feats, sal, 4, alpha=alpha)
    model, _ = tiny_llava(seed=0)
    with pytest.raises(ValueError, match="alpha"):
        scope.patch(model, "scope", 4, alpha=alpha)
    assert not scope.is_patched(model)


def test_unknown_options_fail_inside_patch_and_leave_the_model_unpatched():
    model, _ = tiny_llava(seed=0)
    for method, options in [("scope", {"bogus": 1}), ("fastv", {"ratio": 0.5}), ("none", {"alpha": 1.0})]:
        with pytest.raises(ValueError, match="option"):
            scope.patch(model, method, 4, **options)
        assert not scope.is_patched(model)
    with pytest.raises(ValueError, match="layer"):  # checked against this model's depth at patch time
        scope.patch(model, "fastv", 4, layer=99)
    assert not scope.is_patched(model)


def test_stages_aliases_and_unpruned():
    assert set(names(PRE_LLM)) >= {"scope", "coverage", "saliency", "random", "uniform", "divprune"}
    assert names(IN_LLM) == ["fastv", "pdrop", "sparsevlm"] and names(NONE) == ["none"]
    assert get_method("vanilla") is get_method("none") and is_unpruned("full") and is_unpruned(None)
    assert not is_unpruned("scope")
    assert get_method("scope").needs_saliency({}) and not get_method("scope").needs_saliency({"alpha": 0.0})
    assert not get_method("coverage").needs_saliency()


def test_tokens_per_layer_of_each_stage():
    n, layers = 576, 32
    assert get_method("none").tokens_per_layer(None, n, layers) == [n] * layers
    assert get_method("scope").tokens_per_layer(64, n, layers) == [64] * layers
    assert get_method("scope").tokens_per_layer(1000, n, layers) == [n] * layers
    assert get_method("fastv").tokens_per_layer(64, n, layers) == [n, n] + [64] * 30
    assert get_method("fastv").average_tokens(64, n, layers) == pytest.approx((2 * n + 30 * 64) / 32)


def test_figure_colours_and_markers_come_from_the_registry():
    colors = vis.method_colors(["scope", "none", "mystery"])
    assert colors["none"] == (0.0, 0.0, 0.0)
    assert colors["mystery"] not in {colors["scope"], colors["none"]}
    assert vis.method_markers(["scope", "pdrop"]) == {"scope": "o", "pdrop": ">"}


def test_paper_labels_map_to_our_names_and_unknown_methods_keep_the_papers_spelling():
    assert from_paper_label("PyramidDrop") == "pdrop" and from_paper_label("Vanilla 13B (CVPR'24)") == "none"
    assert from_paper_label("SparseVLM (ICML'25)") == "sparsevlm"
    assert from_paper_label("TokenMix (ICML'25)") == "TokenMix"  # a method we do not have
    assert vis.method_label(from_paper_label("TokenMix")) == "TokenMix"


def test_a_registered_name_wins_over_another_methods_alias():
    record = Method("vanilla", PRE_LLM, "Vanilla top-norm", fn=_top_norm)
    register(record, replace=True)
    try:
        assert get_method("vanilla") is record and get_method("none").name == "none"
    finally:
        unregister("vanilla")
    assert "vanilla" not in METHODS and get_method("vanilla").name == "none"  # the alias is back
