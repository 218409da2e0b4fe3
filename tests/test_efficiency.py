"""scope.efficiency: FLOP counts against closed forms, monotone in the budget, meta-device real configs."""

from __future__ import annotations

import resource

import pytest
import torch

from scope import bench
from scope import efficiency as E
from scope import latency as L
from scope.methods import IN_LLM, get_method

# FlopCounterMode counts matmuls only (no norms, softmax, rotary, activations); the closed forms below
# count the same matmuls, so they should agree exactly. 0.1% tolerance: a counter that missed one
# projection of one layer, or counted causal attention as half, would be off by far more.
TOL = 1e-3


@pytest.fixture(scope="module")
def small_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=64,
        patch_size=8,
    )
    text = LlamaConfig(
        hidden_size=96,
        intermediate_size=200,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=300,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=299)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def test_layer_flops_match_closed_form(small_config):
    model = E.meta_model(small_config)
    t = small_config.text_config
    for n in (1, 17, 64):
        counted = E.llm_flops(model, [n] * t.num_hidden_layers)
        closed = t.num_hidden_layers * E.llm_layer_flops_closed_form(t, n) + 2 * t.hidden_size * t.vocab_size
        assert counted == pytest.approx(closed, rel=TOL)


def test_llm_flops_match_two_params_tokens_plus_attention(small_config):
    # the usual estimate: 2 x (non-embedding weight matrices) x tokens + 4 x layers x n^2 x D for attention,
    # with the lm_head applied to the last position only (norm weights are not matmuls: left out)
    model = E.meta_model(small_config)
    t = small_config.text_config
    lm = model.model.language_model
    body = sum(p.numel() for name, p in lm.named_parameters() if "embed_tokens" not in name and p.dim() == 2)
    head = model.lm_head.weight.numel()
    for n in (8, 100):
        closed = 2 * body * n + 4 * t.num_hidden_layers * n * n * t.hidden_size + 2 * head
        assert E.llm_flops(model, [n] * t.num_hidden_layers) == pytest.approx(closed, rel=TOL)


def test_vision_flops_match_closed_form(small_config):
    model = E.meta_model(small_config)
    v = small_config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    tokens = patches + 1  # CLS
    d, f = v.hidden_size, v.intermediate_size
    per_layer = 2 * tokens * (4 * d * d + 2 * d * f) + 4 * tokens * tokens * d
    conv = 2 * patches * 3 * v.patch_size**2 * d
    for crops in (1, 5):
        closed = crops * (v.num_hidden_layers * per_layer + conv)
        assert E.vision_flops(model, crops) == pytest.approx(closed, rel=TOL)


def test_selection_counts_the_similarity_matmul():
    # FlopCounterMode sees SCOPE's N x N cosine similarity (2 N^2 d per crop); the greedy's elementwise work
    # comes from the stated closed form and grows with the budget
    n, d = 64, 32
    small = E.selection_flops("scope", 8, crops=2, n=n, d=d)
    large = E.selection_flops("scope", 32, crops=2, n=n, d=d)
    assert small["counted"] >= 2 * 2 * n * n * d
    assert large["elementwise"] > small["elementwise"] > 0
    assert small["total"] == small["counted"] + small["elementwise"]
    assert E.selection_flops("random", 8, crops=2, n=n, d=d)["total"] == 0


@pytest.mark.parametrize("method", ["scope", "visionzip", "random", "fastv", "pdrop"])
def test_pruning_reduces_counts_monotonically(small_config, method):
    full = E.prefill_flops(small_config, "none", None, prompt_tokens=16)
    n = full["visual_in"]
    rows = [E.prefill_flops(small_config, method, b, prompt_tokens=16) for b in (n // 2, n // 4, n // 8)]
    llm = [full["llm_gflops"]] + [r["llm_gflops"] for r in rows]
    avg = [full["visual_avg"]] + [r["visual_avg"] for r in rows]
    assert all(a > b for a, b in zip(llm, llm[1:])), llm
    assert all(a > b for a, b in zip(avg, avg[1:])), avg
    assert all(r["total_gflops"] < full["total_gflops"] for r in rows)
    if get_method(method).stage == IN_LLM:
        assert all(r["visual_in"] == n for r in rows)  # every visual token enters the LLM
    else:
        assert [r["visual_in"] for r in rows] == [n // 2, n // 4, n // 8]


def test_token_schedules():
    n, layers = 576, 32
    fastv = E.token_schedule("fastv", 64, n, layers)
    assert fastv[:2] == [n, n] and set(fastv[2:]) == {64}  # FastV: K = 2, R = budget
    assert E.token_schedule("scope", 64, n, layers) == [64] * layers
    assert E.token_schedule("none", None, n, layers) == [n] * layers
    for budget in (192, 128, 64):
        pdrop = E.token_schedule("pdrop", budget, n, layers)
        assert pdrop[:8] == [n] * 8 and pdrop[8] == budget  # first stage ends at layer 8 of 32
        assert all(a >= b for a, b in zip(pdrop, pdrop[1:]))
        assert budget < sum(pdrop) / layers < n
    # the paper's setting: stages end at 8/16/24, lambda 0.5
    assert E.token_schedule("pdrop", None, n, layers)[::8] == [576, 288, 144, 72]
    with pytest.raises(ValueError, match="budget"):
        E.token_schedule("scope", 0, n, layers)
    with pytest.raises(ValueError, match="method"):
        E.token_schedule("nope", 8, n, layers)


def test_real_7b_config_counts_on_meta_without_memory():
    before = _rss_mb()
    config = E.load_config("llava-1.5-7b")
    model = E.meta_model(config)
    params = sum(p.numel() for p in model.parameters())
    assert 6.9e9 < params < 7.2e9  # llava-1.5-7b: 7.06 B parameters
    assert all(p.device.type == "meta" for p in model.parameters())
    row = E.prefill_flops(config, "scope", 64)
    full = E.prefill_flops(config, "none", None)
    # 7B in fp16 would take 13 GiB; shapes only must stay far below that
    assert _rss_mb() - before < 1500
    # the LLM part against 2 x params x tokens (+ attention): 576 + 64 tokens through 6.5 B LLM parameters
    t = config.text_config
    tokens = 576 + E.PROMPT_TOKENS
    layer_params = 4 * t.hidden_size**2 + 3 * t.hidden_size * t.intermediate_size
    closed = t.num_hidden_layers * (2 * layer_params * tokens + 4 * tokens**2 * t.hidden_size)
    closed += 2 * t.hidden_size * t.vocab_size
    assert full["llm_gflops"] * 1e9 == pytest.approx(closed, rel=TOL)
    # the target of issue 7: SCOPE's own cost (selection + saliency) <= 5% of the pruned prefill
    assert row["select_share"] <= 0.05
    assert full["total_gflops"] / row["total_gflops"] > 3  # 576 -> 64 tokens


def test_llava_next_config_layout():
    config = E.load_config("llava-v1.6-vicuna-7b")
    assert E.visual_layout(config) == (5, 576)
    assert config.text_config.num_hidden_layers == 32 and config.vision_config.hidden_size == 1024


def test_bad_config_name():
    with pytest.raises(ValueError, match="not-a-model"):
        E.load_config("not-a-model")


def test_cpu_peak_memory_sees_an_allocation():
    def alloc():
        x = torch.ones(1024, 1024)  # 4 MiB
        return (x * 2).sum()

    peak = L.peak_memory(alloc, torch.device("cpu"))
    if peak != peak:  # NaN: this torch's profiler gives no memory timeline
        pytest.skip("torch profiler without memory events")
    assert peak >= 4 * 2**20


def test_measured_table_on_a_tiny_model():
    pytest.importorskip("scope.patch")
    from scope.testing import tiny_llava

    model, processor = tiny_llava(seed=0)  # 16 visual tokens, 4 LLM layers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads spin against the other tests on a shared 2-core box
    try:
        df = L.latency_table(
            model, processor, (8, 4), ("scope", "fastv"), min_run_time=0.01, decode_tokens=2, memory=False
        )
    finally:
        torch.set_num_threads(threads)
    assert len(df) == 1 + 2 * 2
    base = df[df.method == "none"].iloc[0]
    assert base.visual_in == 16 and base.per_layer == [16] * 4
    for _, row in df[df.method == "scope"].iterrows():
        assert row.visual_in == row.budget and row.per_layer == [row.budget] * 4
        assert row.select_ms > 0 and 0 < row.select_share
    for _, row in df[df.method == "fastv"].iterrows():
        # the measured per-layer counts are the schedule the FLOP table counts with
        assert row.per_layer == E.token_schedule("fastv", row.budget, 16, 4)
        assert row.visual_in == 16 and row.select_ms != row.select_ms  # NaN: no separate selection
    assert (df.prefill_ms > 0).all() and (df.ttft_ms > 0).all()
    assert (df.token_ratio >= 1).all()
    # every latency is a median of REPEATS timings, inside the fastest and slowest of them
    assert (df.repeats == L.REPEATS).all() and L.REPEATS >= 5
    for name in ("prefill_ms", "ttft_ms"):
        assert (df[f"{name}_lo"] <= df[name]).all() and (df[name] <= df[f"{name}_hi"]).all()
    assert (df.speedup_lo <= df.speedup).all() and (df.speedup <= df.speedup_hi).all()


def test_cli_prints_and_writes_csv(small_config, tmp_path, capsys):
    import pandas as pd

    small_config.save_pretrained(tmp_path / "small")
    out = tmp_path / "flops.csv"
    args = ["--configs", str(tmp_path / "small"), "--methods", "scope", "fastv", "--budgets", "32", "16"]
    assert bench.e2e([*args, "--skip-latency", "--prompt-tokens", "8", "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "select_share" in printed and "fastv" in printed
    table = pd.read_csv(out)
    assert list(table.method) == ["none", "scope", "fastv", "scope", "fastv"]
    assert (table.total_gflops.iloc[1:] < table.total_gflops.iloc[0]).all()
    with pytest.raises(SystemExit):
        bench.e2e(["--methods", "nope", "--skip-latency"])
