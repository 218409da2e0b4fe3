"""scope.notebook: what the numbered notebooks share (paths, run groups, vision inputs, options, the detail sweep)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import scope
from scope import notebook
from scope.eval.rundir import checkpoint_fingerprint
from scope.methods import Method, Option, register, unregister
from scope.patch.llava import vision_features
from scope.paths import MINILLAVA_DIR, REPO_ROOT
from scope.testing import tiny_images, tiny_llava


def test_paths_and_model_names(tmp_path):
    assert notebook.repo_path(None, tmp_path) == tmp_path and notebook.repo_path("", tmp_path) == tmp_path
    assert notebook.repo_path("results/x", tmp_path) == REPO_ROOT / "results" / "x"  # from the repo root
    assert notebook.repo_path(tmp_path / "abs", Path("ignored")) == tmp_path / "abs"
    assert notebook.shown_path(REPO_ROOT / "figures" / "a.png") == "figures/a.png"
    assert notebook.shown_path(tmp_path) == str(tmp_path)  # outside the repository: as given
    assert notebook.model_name(None) == "MiniLLaVA (embedded, data/minillava)"
    assert notebook.model_name("/x/data/minillava-next/").startswith("MiniLLaVA-NeXT (embedded")
    assert notebook.model_name("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"


def test_run_groups_are_stable():
    fp = checkpoint_fingerprint(MINILLAVA_DIR)
    assert fp is not None and fp.startswith("sha256:") and len(fp) == 19
    assert notebook.run_group(None, "synthbench", 96, 0) == f"minillava_synthbench_limit96_seed0_{fp[7:]}"
    assert (  # a hub id is not a local folder: no fingerprint, the revision goes to config.json instead
        notebook.run_group("llava-hf/llava-1.5-7b-hf", "gqa,pope", None, 1)
        == "llava-1.5-7b-hf_gqa+pope_limitall_seed1"
    )
    # the default protocol (paper for a hub id, hf for the embedded model) adds nothing; the other is named
    assert (
        notebook.run_group("llava-hf/llava-1.5-7b-hf", "gqa", None, 1, "paper")
        == "llava-1.5-7b-hf_gqa_limitall_seed1"
    )
    assert (
        notebook.run_group("llava-hf/llava-1.5-7b-hf", "gqa", None, 1, "hf")
        == "llava-1.5-7b-hf_gqa_limitall_seed1_hf"
    )
    assert (
        notebook.run_group(None, "synthbench", 96, 0, "hf") == f"minillava_synthbench_limit96_seed0_{fp[7:]}"
    )
    assert notebook.run_group(None, "synthbench", 96, 0, "paper").endswith(f"_paper_{fp[7:]}")


def test_a_retrained_local_checkpoint_gets_a_new_fingerprint(tmp_path):
    assert checkpoint_fingerprint(tmp_path) is None  # no weights
    assert checkpoint_fingerprint("") is None  # an in-memory model's empty name_or_path
    (tmp_path / "model.safetensors").write_bytes(b"weights v1")
    first = checkpoint_fingerprint(tmp_path)
    assert first == checkpoint_fingerprint(tmp_path)  # stable
    (tmp_path / "model.safetensors").write_bytes(b"weights v2")
    assert checkpoint_fingerprint(tmp_path) != first
    assert notebook.run_group(str(tmp_path), "synthbench", None, 0).endswith(
        checkpoint_fingerprint(tmp_path)[7:]
    )


def test_vision_inputs_are_what_the_patch_selects_on_in_any_chunking():
    model, processor = tiny_llava(seed=0)
    images = tiny_images(5, seed=1)
    feats, sal, keys = notebook.vision_inputs(model, processor, images, chunk=2)
    pv = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = vision_features(model, pv)
    n_tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert feats.shape[:2] == sal.shape == keys.shape[:2] == (5, n_tokens)  # CLS dropped
    for got, want in zip((feats, sal, keys), ref):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    heads = model.config.vision_config.num_attention_heads
    assert (sal >= 0).all() and (
        sal.sum(-1) <= heads + 1e-4
    ).all()  # CLS rows of softmaxes, summed over heads
    with pytest.raises(ValueError, match="empty"):
        notebook.vision_inputs(model, processor, [])


def test_method_options_follow_the_registry():
    keys = torch.randn(1, 16, 4)
    assert notebook.method_options("visionzip", keys, seed=3) == {"metric": keys}  # its keys_option
    assert notebook.method_options("random", keys, seed=3) == {"seed": 3}
    assert notebook.method_options("scope", keys, seed=3) == {}
    assert notebook.method_options("visionzip", None) == {}  # no keys: the method's own default
    toy = Method(
        "keyed",
        "pre_llm",
        "Keyed (toy)",
        fn=lambda f, s, b, **o: None,
        options={"keys": Option(None), "seed": Option(0)},
        keys_option="keys",
    )
    register(toy)
    try:
        assert notebook.method_options("keyed", keys, seed=7) == {"keys": keys, "seed": 7}
    finally:
        unregister("keyed")
    # the options are accepted by the selection itself, and the seed reaches it
    feats, sal = torch.randn(1, 16, 8), torch.rand(1, 16)
    for m in ["visionzip", "random", "scope"]:
        kept = scope.select(feats, sal, 4, method=m, **notebook.method_options(m, keys, seed=1))
        assert kept.shape == (1, 4)
    options = notebook.method_options("random", seed=1)
    assert torch.equal(
        scope.select(feats, sal, 4, method="random", **options),
        scope.select(feats, sal, 4, method="random", seed=1),
    )
    with pytest.raises(ValueError, match="unknown method"):
        notebook.method_options("nonesuch", keys)


def _finished_run(root: Path, name: str, method: str, budget, n: int, value: float | None):
    (root / name / "samples").mkdir(parents=True)
    metrics = {} if value is None else {"accuracy": value, "counting/accuracy": value}
    res = {
        "main": "accuracy",
        "value": value,
        "metrics": metrics,
        "n": n,
        "mean_kept_tokens": 16 if n else None,
    }
    (root / name / "results.json").write_text(json.dumps({"tasks": {"synthbench": res}}))
    (root / name / "config.json").write_text(json.dumps({"model": "m", "method": method, "budget": budget}))
    recs = "".join(
        json.dumps({"idx": i, "family": "counting", "subset": "", "score": float(i < n * value / 100)}) + "\n"
        for i in range(n)
    )
    (root / name / "samples" / "synthbench.jsonl").write_text(recs)


def test_fine_detail_reuses_finished_runs_and_drops_empty_rows(tmp_path):
    _finished_run(tmp_path / "small", "none", "none", None, 4, 25.0)
    _finished_run(tmp_path / "big", "none", "none", None, 4, 75.0)
    _finished_run(tmp_path / "big", "scope-4", "scope", 4, 4, 50.0)
    _finished_run(tmp_path / "big", "random-4", "random", 4, 0, None)  # nothing answered: no value

    def no_load(checkpoint):
        raise AssertionError(f"finished runs must be read, not recomputed ({checkpoint})")

    groups = {"Small": ("ckpt/small", 32, []), "Big": ("ckpt/big", 64, ["scope", "random"])}
    fine = notebook.fine_detail(groups, 4, tmp_path, limit=4, n_boot=20, load=no_load)
    assert list(fine.group.unique()) == ["Small", "Big"]
    assert list(zip(fine.run, fine.column, fine.value)) == [
        ("none", "Count", 25.0),
        ("none", "Overall", 25.0),
        ("none", "Count", 75.0),
        ("none", "Overall", 75.0),
        ("scope-4", "Count", 50.0),
        ("scope-4", "Overall", 50.0),
    ]  # random-4 has no value: left out
    assert {"lo", "hi"} <= set(fine.columns) and (fine.lo <= fine.value).all()


def test_fine_detail_evaluates_missing_runs_once(tmp_path):
    loaded = []

    def load(checkpoint):
        loaded.append(checkpoint)
        return tiny_llava(seed=0)

    groups = {"Tiny, all tokens": ("ckpt/tiny", 32, []), "Tiny pruned": ("ckpt/tiny-b", 48, ["scope"])}
    fine = notebook.fine_detail(groups, 4, tmp_path, limit=2, n_boot=5, load=load)
    assert loaded == ["ckpt/tiny", "ckpt/tiny-b"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/*")) == [
        "tiny-b/none",
        "tiny-b/scope-4",
        "tiny/none",
    ]
    assert set(zip(fine.group, fine.run)) == {
        ("Tiny, all tokens", "none"),
        ("Tiny pruned", "none"),
        ("Tiny pruned", "scope-4"),
    }
    assert (fine.n == 2).all() and set(fine[fine.run == "scope-4"].budget) == {4}
    again = notebook.fine_detail(groups, 4, tmp_path, limit=2, n_boot=5, load=load)
    assert loaded == ["ckpt/tiny", "ckpt/tiny-b"] and again.equals(fine)  # the second time: read back


def test_question_limit_is_the_embedded_default_or_every_question_of_a_real_benchmark():
    from scope import notebook

    assert notebook.question_limit("auto", None, 192) == 192
    assert notebook.question_limit("auto", "llava-hf/llava-1.5-7b-hf", 192) is None
    assert notebook.question_limit(50, "x", 192) == 50 and notebook.question_limit(None, None, 192) is None
    for bad in (0, -3, "all", True, 2.5):
        with pytest.raises(ValueError, match="limit"):
            notebook.question_limit(bad, None, 192)
