"""FLOP counts of the published Qwen2-VL / Qwen2.5-VL 7B configs (meta device, no weights)."""

from __future__ import annotations

import pytest

from scope.efficiency import llm_layer_flops_closed_form, load_config
from scope.efficiency_qwen import QWEN_CONFIGS, qwen_flops_table, qwen_prefill_flops, visual_tokens


def test_visual_tokens_by_hand():
    for name in QWEN_CONFIGS:
        # 640x480: 480 / 28 = 17.1 -> 476 px, 640 / 28 = 22.9 -> 644 px; 34 x 46 patches of 14 px; 2x2 merge
        assert visual_tokens(name) == {
            "resized": (644, 476),
            "grid_thw": (1, 34, 46),
            "patches": 1564,
            "tokens": 391,
        }
        assert visual_tokens(name, (448, 448))["tokens"] == 16 * 16
        assert visual_tokens(name, (20, 20))["resized"] == (56, 56)  # raised to min_pixels = 56 * 56
        big = visual_tokens(name, (8000, 6000))
        assert big["patches"] * 14 * 14 <= 12845056 < big["patches"] * 14 * 14 * 1.1  # capped near max_pixels
    with pytest.raises(ValueError, match="image_size"):
        visual_tokens(QWEN_CONFIGS[0], (0, 10))


@pytest.mark.parametrize("name", QWEN_CONFIGS)
def test_llm_and_vision_flops_match_closed_forms(name):
    config = load_config(name)
    t, v = config.text_config, config.vision_config
    row = qwen_prefill_flops(name, "divprune", 0.25)
    assert (row["visual_in"], row["visual_kept"]) == (391, 97)  # floor(0.25 * 391)
    n = 64 + 97
    llm = t.num_hidden_layers * llm_layer_flops_closed_form(t, n) + 2 * t.hidden_size * t.vocab_size
    assert row["llm_gflops"] * 1e9 == pytest.approx(llm, rel=1e-9)
    if name.startswith("qwen2-"):  # Qwen2-VL tower: LayerNorm ViT, MLP ratio 4, full attention everywhere
        p, d, out = 1564, v.embed_dim, v.hidden_size
        block = 2 * p * (4 * d * d + 2 * d * 4 * d) + 4 * p * p * d
        embed = 2 * p * 3 * 2 * 14 * 14 * d
        merger = 2 * (p // 4) * (4 * d) * (4 * d) + 2 * (p // 4) * (4 * d) * out
        assert row["vision_gflops"] * 1e9 == pytest.approx(v.depth * block + embed + merger, rel=1e-9)
    assert row["saliency_gflops"] == 0  # DivPrune reads no saliency


def test_table_ratios():
    df = qwen_flops_table(configs=QWEN_CONFIGS[:1], budgets=(0.25, 0.1), methods=("scope",))
    assert list(df.method) == ["none", "scope", "scope"]
    assert list(df.visual_kept) == [391, 97, 39]
    assert df.flops_ratio.iloc[0] == 1 and (df.flops_ratio.iloc[1:] > 1).all()
    assert df.saliency_gflops.iloc[1] > 0  # SCOPE recomputes the last block's attention
    assert df.total_gflops.is_monotonic_decreasing
