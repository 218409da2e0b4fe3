"""The runner on a real (tiny, random) transformers LLaVA: chat prompts, pruning, token counts, batching."""

from __future__ import annotations

import json

import pytest

import scope
from scope.eval import build_prompt, evaluate, generate_answers, read_jsonl, sweep
from scope.eval.fixtures import fixture

testing = pytest.importorskip("scope.testing")


@pytest.fixture(scope="module")
def tiny():
    return testing.tiny_llava(seed=0)  # 16 visual tokens per image


def test_chat_template_prompt(tiny):
    _, proc = tiny
    p = build_prompt(proc, "Is there a dog?", 1)
    assert p == testing.chat_prompt(proc, "Is there a dog?", 1) and "<image>" in p


def test_pruned_and_unpruned_runs(tiny, tmp_path):
    model, proc = tiny
    ds = {"pope": fixture("pope"), "mme": fixture("mme")}
    kw = dict(datasets=ds, max_new_tokens=3, progress=False)
    full = evaluate(model, proc, "pope,mme", out_dir=tmp_path / "none", method="none", batch_size=3, **kw)
    pruned = evaluate(
        model, proc, "pope,mme", out_dir=tmp_path / "scope", method="scope", budget=4, batch_size=3, **kw
    )
    assert (
        full["tasks"]["pope"]["mean_kept_tokens"] == 16 and pruned["tasks"]["pope"]["mean_kept_tokens"] == 4
    )
    assert not model.__dict__.get("_scope")  # unpatched afterwards
    recs = read_jsonl(tmp_path / "scope" / "samples" / "mme.jsonl")
    assert len(recs) == 6 and all(r["kept_tokens"] == 4 for r in recs)
    cfg = json.loads((tmp_path / "scope" / "config.json").read_text())
    assert (cfg["method"], cfg["budget"], cfg["model_class"]) == ("scope", 4, "LlavaForConditionalGeneration")
    # batch size changes nothing (left padding, greedy)
    one = evaluate(model, proc, "pope", out_dir=tmp_path / "b1", method="scope", budget=4, batch_size=1, **kw)
    a = [r["prediction"] for r in read_jsonl(tmp_path / "b1" / "samples" / "pope.jsonl")]
    b = [r["prediction"] for r in read_jsonl(tmp_path / "scope" / "samples" / "pope.jsonl")]
    assert a == b and one["tasks"]["pope"]["metrics"] == pruned["tasks"]["pope"]["metrics"]


def test_sweep_directories(tiny, tmp_path):
    model, proc = tiny
    res = sweep(
        model,
        proc,
        "pope",
        out_root=tmp_path,
        methods=["random", "scope"],
        budgets=[8, 2],
        datasets={"pope": fixture("pope")},
        limit=2,
        max_new_tokens=2,
        progress=False,
    )
    assert sorted(res) == ["none", "random-2", "random-8", "scope-2", "scope-8"]
    assert {k: v["tasks"]["pope"]["mean_kept_tokens"] for k, v in res.items()} == {
        "none": 16,
        "random-2": 2,
        "random-8": 8,
        "scope-2": 2,
        "scope-8": 8,
    }


def test_in_llm_method_records_equivalent_tokens(tiny, tmp_path):
    model, proc = tiny
    res = evaluate(
        model,
        proc,
        "pope",
        out_dir=tmp_path,
        method="fastv",
        budget=4,
        datasets={"pope": fixture("pope")},
        limit=2,
        max_new_tokens=2,
        progress=False,
    )
    entry = res["tasks"]["pope"]
    # FastV feeds the LLM all 16 visual tokens and keeps 4 after layer 2 of 4: (16 + 16 + 4 + 4) / 4 = 10
    assert entry["mean_kept_tokens"] == 16 and entry["equivalent_tokens"] == pytest.approx(10.0)


def test_answers_are_only_the_new_tokens(tiny):
    # a patched model generates from the collapsed prompt but returns the original prompt in front
    model, proc = tiny
    prompt, images = build_prompt(proc, "Is there a dog?", 1), testing.tiny_images(1)
    inputs = proc(images=images, text=[prompt], return_tensors="pt")
    with scope.patch(model, method="scope", budget=4):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        texts, kept = generate_answers(model, proc, [prompt], [images], 4)
    assert texts == [
        proc.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    ]
    assert kept == [4]
