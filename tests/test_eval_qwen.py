"""``scope.eval`` on tiny (random) Qwen2-VL / Qwen2.5-VL models: the Qwen chat template under both protocols,
float budgets (shares) in configs and run names, pixel limits as run options, ``--show-prompts``."""

from __future__ import annotations

import json
import math

import pytest

from scope.eval import evaluate, generate_answers, read_jsonl, sweep
from scope.eval.fixtures import fixture
from scope.protocol import build_prompt, limited_pixels, pixel_limits, prepare_images, run_options
from scope.testing import chat_prompt, tiny_images, tiny_llava, tiny_qwen2_vl


@pytest.fixture(scope="module", params=["2", "2.5"])
def qwen(request):
    return tiny_qwen2_vl(seed=0, version=request.param)


def _tokens(processor, image) -> int:
    """Merged tokens of one image, read off the processor's own grid (t * h * w patches, 2x2 per token)."""
    grid = processor(images=[image], text=[chat_prompt(processor, "q")], return_tensors="pt")[
        "image_grid_thw"
    ]
    return int(grid.prod()) // 4


def test_both_protocols_send_the_qwen_chat_template(qwen):
    _, proc = qwen
    expected = "USER: <|vision_start|><image><|vision_end|> Is there a dog? ASSISTANT:"  # QWEN_CHAT_TEMPLATE
    assert build_prompt(proc, "Is there a dog?", 1, "paper") == expected
    assert build_prompt(proc, "Is there a dog?", 1, "hf") == expected
    wide = tiny_images(1, size=(48, 32))
    assert prepare_images(proc, wide, "paper")[0].size == (48, 32)  # no square padding for Qwen
    # LLaVA keeps the vicuna_v1 conversation under paper
    _, llava_proc = tiny_llava(seed=0)
    assert build_prompt(llava_proc, "Is there a dog?", 1, "paper").startswith("A chat between")


def test_paper_protocol_leaves_qwen_method_options_alone(qwen):
    model, _ = qwen
    assert run_options("paper", "divprune", 0.25, model) == {}  # LLaVA would get feature_space, float16
    assert run_options("paper", "scope", 0.25, model, {"alpha": 0.5}) == {"alpha": 0.5}


def test_evaluate_share_writes_results_and_config(qwen, tmp_path):
    model, proc = qwen
    ds = fixture("pope")
    n_img = _tokens(proc, ds[0]["image"])
    res = evaluate(
        model, proc, "pope", out_dir=tmp_path, method="scope", budget=0.25, protocol="paper",
        datasets={"pope": ds}, limit=3, batch_size=2, max_new_tokens=2, progress=False,
    )  # fmt: skip
    kept = max(1, math.floor(0.25 * n_img))  # 32x32 px: 16 merged tokens, 4 kept
    assert res["tasks"]["pope"]["n"] == 3 and res["tasks"]["pope"]["mean_kept_tokens"] == kept
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["method"], cfg["budget"], cfg["protocol"]) == ("scope", 0.25, "paper")
    assert cfg["pixels"] == {"min_pixels": 16 * 16, "max_pixels": 64 * 64}  # the processor's own limits
    recs = read_jsonl(tmp_path / "samples" / "pope.jsonl")
    assert [r["kept_tokens"] for r in recs] == [kept] * 3
    assert all(r["prompt"].startswith("USER: <|vision_start|><image><|vision_end|> ") for r in recs)
    assert json.loads((tmp_path / "results.json").read_text())["config"]["budget"] == 0.25
    assert not model.__dict__.get("_scope")  # unpatched afterwards


def test_pixel_limits_are_applied_recorded_and_restored(qwen, tmp_path):
    model, proc = qwen
    before = pixel_limits(proc)
    kw = dict(datasets={"pope": fixture("pope")}, limit=2, max_new_tokens=1, progress=False)
    res = evaluate(model, proc, "pope", out_dir=tmp_path, method="none", min_pixels=64, max_pixels=256, **kw)
    # smart_resize by hand: 32x32 = 1024 px > 256 -> scale by sqrt(1024 / 256) = 2 -> 16x16 px
    # -> 4x4 patches of 4 px -> 2x2 merged tokens
    assert res["tasks"]["pope"]["mean_kept_tokens"] == 4
    assert json.loads((tmp_path / "config.json").read_text())["pixels"] == {
        "min_pixels": 64,
        "max_pixels": 256,
    }
    assert pixel_limits(proc) == before  # the processor is as it was
    with pytest.raises(ValueError, match="pixels"):  # other limits: another run, refused
        evaluate(model, proc, "pope", out_dir=tmp_path, method="none", max_pixels=1024, **kw)


def test_bad_pixel_limits_are_named():
    _, proc = tiny_qwen2_vl(seed=0)
    with pytest.raises(ValueError, match="min_pixels=512 is larger than max_pixels=256"):
        with limited_pixels(proc, 512, 256):
            pass
    with pytest.raises(ValueError, match="max_pixels=-1"):
        with limited_pixels(proc, None, -1):
            pass
    _, llava_proc = tiny_llava(seed=0)
    with pytest.raises(ValueError, match="native-resolution"):
        with limited_pixels(llava_proc, None, 1024):
            pass


def test_sweep_names_shares(tmp_path):
    model, proc = tiny_qwen2_vl(seed=0)
    res = sweep(
        model, proc, "pope", out_root=tmp_path, methods=["scope", "divprune"], budgets=[0.25, 0.1],
        datasets={"pope": fixture("pope")}, limit=2, max_new_tokens=1, progress=False,
    )  # fmt: skip
    assert sorted(res) == ["divprune-0.1", "divprune-0.25", "none", "scope-0.1", "scope-0.25"]
    kept = {k: v["tasks"]["pope"]["mean_kept_tokens"] for k, v in res.items()}
    assert kept == {"none": 16, "scope-0.25": 4, "divprune-0.25": 4, "scope-0.1": 1, "divprune-0.1": 1}
    assert json.loads((tmp_path / "scope-0.1" / "config.json").read_text())["budget"] == 0.1


def test_generate_counts_each_images_own_share():
    model, proc = tiny_qwen2_vl(seed=0)
    images = [tiny_images(1, size=(32, 32))[0], tiny_images(1, size=(48, 32), seed=1)[0]]
    prompts = [build_prompt(proc, "what is this ?", 1)] * 2
    import scope

    with scope.patch(model, "scope", budget=0.25):
        texts, kept = generate_answers(model, proc, prompts, [[im] for im in images], 2)
        alone = [generate_answers(model, proc, [p], [[im]], 2)[0][0] for p, im in zip(prompts, images)]
    assert kept == [max(1, math.floor(0.25 * _tokens(proc, im))) for im in images] == [4, 6]
    assert texts == alone  # a left-padded batch answers as one question at a time


def test_show_prompts_prints_a_qwen_prompt(monkeypatch):
    import importlib

    from scope.eval.__main__ import fixture_datasets, parse_args, show_prompts

    _, proc = tiny_qwen2_vl(seed=0)
    monkeypatch.setattr(
        importlib.import_module("scope.load"), "load_processor", lambda model_id=None, **kw: proc
    )
    args = parse_args(
        ["--model", "Qwen/Qwen2-VL-7B-Instruct", "--tasks", "pope", "--fixtures", "--limit", "1"]
    )
    args.max_pixels = 256
    args.min_pixels = 64
    text = show_prompts(args, fixture_datasets("pope"))
    assert "protocol=paper" in text
    assert 'text: "USER: <|vision_start|><image><|vision_end|> Is there a' in text
    assert "image 1: 32x32 -> resized 16x16, patch grid 1x4x4 -> 4 merged tokens" in text
    assert "image tokens in the prompt: 4" in text
    assert pixel_limits(proc) == {"min_pixels": 256, "max_pixels": 4096}  # restored


@pytest.mark.parametrize(
    "text, expected", [("0.25,0.1", [0.25, 0.1]), ("64, 0.5", [64, 0.5]), ("1.0", [1.0]), ("8", [8])]
)
def test_cli_budgets_take_counts_and_shares(text, expected):
    from scope.eval.__main__ import parse_budgets

    got = parse_budgets(text)
    assert got == expected and [type(b) for b in got] == [type(b) for b in expected]


@pytest.mark.parametrize("text", ["many", "1.5", "-0.2", "0.0"])
def test_cli_refuses_bad_budgets(text):
    from scope.eval.__main__ import parse_budgets

    with pytest.raises(SystemExit, match="budget"):
        parse_budgets(text)
