"""Faults a hostile but fair user tries: each test failed before its fix (issue 23's numbering in the names).

Silently wrong or mixed results first, then lost or blocked work, then errors that must come early and clear.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import types

import pytest
import torch

import scope
from scope.eval import evaluate, read_jsonl
from scope.eval.fixtures import fixture
from scope.eval.rundir import RunLock, checkpoint_fingerprint, logged_records, merge_task
from scope.testing import chat_prompt, tiny_images, tiny_llava, tiny_llava_next

N = 16  # visual tokens per image / crop of the tiny models


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava(seed=0)


def _eval(model, proc, out, tasks="pope", **kw):
    ds = {t: fixture(t) for t in tasks.split(",")}
    kw.setdefault("max_new_tokens", 2)
    return evaluate(model, proc, tasks, out_dir=out, datasets=ds, progress=False, **kw)


# ---------------------------------------------------------------------------------- silent wrong results


def test_01_overwrite_leaves_nothing_of_the_old_run(tiny, tmp_path):
    model, proc = tiny
    _eval(model, proc, tmp_path, "pope,mme", method="scope", budget=8)
    res = _eval(model, proc, tmp_path, "pope", method="random", budget=4, overwrite=True)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk["tasks"]) == set(res["tasks"]) == {"pope"}
    assert not (tmp_path / "samples" / "mme.jsonl").exists()
    assert json.loads((tmp_path / "config.json").read_text())["tasks"] == ["pope"]


@pytest.mark.parametrize("change", [{"dtype": torch.bfloat16}, {"batch_size": 2}])
def test_02_resume_refuses_another_dtype_or_batch_size(tmp_path, change):
    model, proc = tiny_llava(seed=0)
    _eval(model, proc, tmp_path, method="scope", budget=4, limit=2, batch_size=1)
    kw = dict(method="scope", budget=4, limit=2, batch_size=change.get("batch_size", 1))
    if "dtype" in change:
        model = model.to(change["dtype"])
    with pytest.raises(ValueError, match="dtype" if "dtype" in change else "batch_size"):
        _eval(model, proc, tmp_path, **kw)


def test_03_patched_generate_keeps_generation_config_max_length(tiny):
    model, proc = tiny
    inputs = proc(images=tiny_images(1), text=chat_prompt(proc, "what is this ?"), return_tensors="pt")
    prompt = inputs["input_ids"].shape[1]
    saved = (model.generation_config.max_length, model.generation_config.eos_token_id)
    model.generation_config.max_length, model.generation_config.eos_token_id = prompt + 3, None
    try:
        with torch.no_grad():
            plain = model.generate(**inputs, do_sample=False)
            with scope.patch(model, "scope", 4):
                pruned = model.generate(**inputs, do_sample=False)
    finally:
        model.generation_config.max_length, model.generation_config.eos_token_id = saved
    assert plain.shape[1] - prompt == 3 and pruned.shape[1] - prompt == 3


@torch.no_grad()
def test_04_random_in_a_patch_draws_per_image_not_per_call(tiny):
    model, proc = tiny
    images = tiny_images(3, seed=4)
    text = [chat_prompt(proc, "what is this ?")] * 3
    with scope.patch(model, "random", 5, seed=1):
        model(**proc(images=images, text=text, return_tensors="pt", padding=True))
        batched = model._scope.last["indices"]
        alone = []
        for image in images:
            model(**proc(images=[image], text=text[:1], return_tensors="pt"))
            alone.append(model._scope.last["indices"][0])
    assert all(torch.equal(batched[i], alone[i]) for i in range(3))  # batch equals single
    assert not torch.equal(alone[0], alone[1]) and not torch.equal(alone[1], alone[2])  # images differ
    with scope.patch(model, "random", 5, seed=2):
        model(**proc(images=images[:1], text=text[:1], return_tensors="pt"))
        assert not torch.equal(model._scope.last["indices"][0], alone[0])  # the seed matters


def test_05_bad_alpha_is_refused():
    feats, sal = torch.randn(1, 16, 4), torch.rand(1, 16)
    for alpha in (math.inf, math.nan, -1.0):
        with pytest.raises(ValueError, match="alpha"):
            scope.select(feats, sal, 8, alpha=alpha)


def test_06_fingerprint_covers_the_whole_file(tmp_path):
    weights = tmp_path / "model.safetensors"
    data = bytearray(os.urandom(5 << 20))
    weights.write_bytes(bytes(data))
    before = checkpoint_fingerprint(tmp_path)
    data[(5 << 20) // 2 : (5 << 20) // 2 + 100] = bytes(100)  # 100 bytes in the middle
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(1, 1))  # a different mtime: the cache must not hide the change
    assert checkpoint_fingerprint(tmp_path) != before


# ---------------------------------------------------------------------------------- lost or blocked work


def _hold_lock(path, ready, release):
    with RunLock(path):
        ready.set()
        release.wait(30)


def test_07_a_second_process_on_a_busy_run_directory_is_refused(tiny, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RuntimeError, match=f"in use by process {holder.pid}"):
            _eval(*tiny, tmp_path, method="scope", budget=4)
        assert not (tmp_path / "config.json").exists()
    finally:
        release.set()
        holder.join(30)
    _eval(*tiny, tmp_path, method="scope", budget=4, limit=1)  # free again once the holder is done


def test_07_stale_lock_of_a_dead_process_is_taken_over(tiny, tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 7}))
    _eval(*tiny, tmp_path, method="scope", budget=4, limit=1)
    assert not (tmp_path / ".lock").exists()


def test_07_merges_use_unique_temporary_files(tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "pope.rank0.jsonl").write_text('{"idx": 0}\n')
    stale = tmp_path / "samples" / "pope.jsonl.tmp"  # the old fixed name, left by another merge
    stale.write_text("garbage")
    assert [r["idx"] for r in merge_task(tmp_path, "pope")] == [0]
    assert stale.read_text() == "garbage" and not list((tmp_path / "samples").glob(".pope*.tmp"))


def test_08_a_bad_command_line_writes_nothing(tiny, tmp_path):
    model, proc = tiny
    with pytest.raises(ValueError, match="budget"):
        _eval(model, proc, tmp_path, method="scope", budget=0)
    assert not (tmp_path / "config.json").exists()
    _eval(model, proc, tmp_path, method="scope", budget=4, limit=1)  # the same folder works


def test_09_a_method_list_without_a_method_is_refused(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "scope.load", types.SimpleNamespace(load=lambda *a, **k: tiny_llava()))
    from scope.eval.__main__ import main

    with pytest.raises(SystemExit, match="names no method"):
        main(["--method", ",", "--out", str(tmp_path)])
    assert not (tmp_path / "config.json").exists()


def test_10_a_record_without_idx_is_reported_and_recomputed(tiny, tmp_path):
    model, proc = tiny
    _eval(model, proc, tmp_path, method="scope", budget=4)
    log = tmp_path / "samples" / "pope.jsonl"
    lines = log.read_text().splitlines()
    rec = json.loads(lines[2])
    del rec["idx"]
    lines[2] = json.dumps(rec)
    log.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"pope.jsonl:3 lacks \['idx'\]"):
        assert sorted(logged_records(tmp_path, "pope")) == [0, 1, 3, 4, 5]
    with pytest.warns(UserWarning):
        res = _eval(model, proc, tmp_path, method="scope", budget=4)
    assert res["tasks"]["pope"]["n"] == 6
    assert [r["idx"] for r in read_jsonl(log)] == list(range(6))


# ---------------------------------------------------------------------------------- clear errors, early


@torch.no_grad()
def test_13_next_budget_at_or_above_the_image_keeps_all_tokens():
    model, proc = tiny_llava_next(seed=0)
    inputs = proc(
        images=tiny_images(1, size=(64, 32)), text=chat_prompt(proc, "what ?"), return_tensors="pt"
    )  # 3 crops, 48 tokens before newlines
    ref = model(**inputs).logits
    for budget in (3 * N, 3 * N + 3, 2880):
        with scope.patch(model, "scope", budget):
            torch.testing.assert_close(model(**inputs).logits, ref, atol=1e-5, rtol=0)


def test_14_unknown_option_fails_in_patch_and_leaves_the_model_unpatched(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="bogus"):
        scope.patch(model, "scope", 4, bogus=1)
    assert not scope.is_patched(model)


def test_15_empty_batch_and_zero_width_features_are_refused():
    with pytest.raises(ValueError, match="B = 0"):
        scope.select(torch.randn(0, 9, 4), torch.rand(0, 9), 2)
    with pytest.raises(ValueError, match="d = 0"):
        scope.select(torch.randn(2, 9, 0), torch.rand(2, 9), 2)


def test_16_visionzip_refuses_nan_metric_and_fractional_counts():
    feats, sal = torch.randn(1, 16, 4), torch.rand(1, 16)
    metric = torch.randn(1, 16, 4)
    metric[0, 3, 1] = math.nan
    with pytest.raises(ValueError, match="metric contains NaN"):
        scope.select(feats, sal, 8, method="visionzip", metric=metric)
    with pytest.raises(ValueError, match="n_contextual"):
        scope.select(feats, sal, 8, method="visionzip", n_contextual=2.5)


def test_17_every_torch_load_in_the_package_loads_tensors_only():
    import ast
    from pathlib import Path

    calls = []
    for py in Path(scope.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            f = getattr(node, "func", None)
            if (
                isinstance(node, ast.Call)
                and getattr(f, "attr", "") == "load"
                and getattr(f.value, "id", "") == "torch"
            ):
                kw = {k.arg: k.value for k in node.keywords}
                calls.append(f"{py.name}:{node.lineno}")
                assert getattr(kw.get("weights_only"), "value", None) is True, calls[-1]
    assert calls, "the training module loads cached tensors with torch.load"


def test_18_a_trainable_tower_under_a_patch_is_refused(tiny):
    model, proc = tiny
    inputs = proc(images=tiny_images(1), text=chat_prompt(proc, "what ?"), return_tensors="pt")
    model.train()
    try:
        with scope.patch(model, "scope", 4):
            with pytest.raises(RuntimeError, match="without gradients"):
                model(**inputs)
            model.model.vision_tower.requires_grad_(False)
            model(**inputs).logits.sum().backward()  # the projector and LLM still train
            assert model.model.multi_modal_projector.linear_1.weight.grad is not None
    finally:
        model.eval()
        model.model.vision_tower.requires_grad_(True)
        model.zero_grad()


def test_load_error_for_a_local_folder_names_the_missing_file(tmp_path):
    model, proc = tiny_llava(seed=0)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks weights \(model.safetensors") as err:
        scope.load(str(tmp_path))
    assert "huggingface-cli" not in str(err.value)


def _two_runs(tiny, root):
    model, proc = tiny
    _eval(model, proc, root / "a", method="scope", budget=4)
    _eval(model, proc, root / "b", method="none")


def test_11_a_truncated_results_json_is_skipped_with_a_warning_naming_it(tiny, tmp_path):
    from scope import report

    _two_runs(tiny, tmp_path)
    broken = tmp_path / "a" / "results.json"
    broken.write_text(broken.read_text()[:40])
    with pytest.warns(UserWarning, match=str(broken)):
        long = report.results_long([tmp_path])
    assert set(long["run"]) == {"b"}
    with pytest.raises(ValueError, match=str(broken)):
        report.load_run(tmp_path / "a")


@pytest.mark.filterwarnings("ignore:.*is not a JSON object")
def test_12_missing_samples_mark_the_run_incomplete_and_n_counts_the_scored(tiny, tmp_path, capsys):
    from scope import report

    _two_runs(tiny, tmp_path)
    log = tmp_path / "a" / "samples" / "pope.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:4] + ["{not json}"]) + "\n")
    with pytest.warns(UserWarning, match="incomplete"):
        long = report.results_long([tmp_path / "a"], ci=True, n_boot=50)
    row = long.iloc[0]
    assert row["n"] == 4 and not row["complete"] and row["lo"] == row["lo"]  # interval kept (not NaN)
    from scope.eval import get_task

    logged = read_jsonl(log, require=("idx",))
    assert row["value"] == get_task("pope").aggregate(logged)[row["metric"]]  # the value of the same 4
    with pytest.warns(UserWarning):
        report.main([str(tmp_path), "--n-boot", "20"])
    assert "Incomplete runs" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- found in review


def test_a_sweep_with_method_options_runs_its_unpruned_model_without_them(tiny, tmp_path):
    from scope.eval import sweep

    model, proc = tiny
    ds = {"pope": fixture("pope")}
    runs = sweep(model, proc, "pope", out_root=tmp_path, methods=["scope"], budgets=[4], options={"alpha": 0.5},
                 datasets=ds, limit=2, max_new_tokens=2, progress=False)  # fmt: skip
    assert list(runs) == ["none", "scope-4"]
    assert json.loads((tmp_path / "none" / "config.json").read_text())["options"] == {}
    assert json.loads((tmp_path / "scope-4" / "config.json").read_text())["options"] == {"alpha": 0.5}


def test_numeric_option_values_of_any_type_are_accepted():
    import numpy as np

    feats, sal = torch.randn(1, 36, 8), torch.rand(1, 36)
    ref = scope.select(feats, sal, 4, alpha=0.5)
    for alpha in (np.float32(0.5), torch.tensor(0.5)):
        assert torch.equal(scope.select(feats, sal, 4, alpha=alpha), ref)
    seeded = scope.select(feats, sal, 4, method="random", seed=3)
    for seed in (3.0, np.int64(3), torch.tensor(3)):
        assert torch.equal(scope.select(feats, sal, 4, method="random", seed=seed), seeded)
    assert scope.select(feats, sal, 8, method="visionzip", n_contextual=2.0).shape == (1, 8)
    assert scope.select(feats, sal, 4, method="uniform", grid=torch.tensor([6, 6])).shape == (1, 4)
    for bad in (dict(alpha=True), dict(method="random", seed=2.5), dict(method="uniform", grid=(6, 0))):
        with pytest.raises(ValueError):
            scope.select(feats, sal, 4, **bad)


def test_the_greedy_functions_refuse_a_bad_alpha_too():
    feats, sal = torch.randn(1, 16, 4), torch.rand(1, 16)
    for fn in (scope.scope_greedy_fast, scope.scope_greedy_reference):
        with pytest.raises(ValueError, match="alpha"):
            fn(feats, sal, 4, alpha=math.nan)


def test_rescore_waits_its_turn_on_a_live_run(tiny, tmp_path):
    from scope.eval import rescore

    _eval(*tiny, tmp_path, method="scope", budget=4, limit=1)
    with RunLock(tmp_path):
        with pytest.raises(RuntimeError, match="in use"):
            rescore(tmp_path)
    assert rescore(tmp_path)["tasks"]["pope"]["n"] == 1


def test_aliases_are_recorded_and_reported_by_the_methods_name(tiny, tmp_path):
    from scope import report

    _eval(*tiny, tmp_path / "p", method="pyramiddrop", budget=4, limit=1)
    assert json.loads((tmp_path / "p" / "config.json").read_text())["method"] == "pdrop"
    assert report.method_label("pyramiddrop") == "PDrop"
    _eval(*tiny, tmp_path / "v", method="vanilla", limit=1)
    with pytest.raises(ValueError, match="method"):  # "vanilla" there is "none": another method than pdrop
        _eval(*tiny, tmp_path / "v", method="pdrop", budget=4, limit=1)


def test_a_truncated_results_json_does_not_block_a_resume(tiny, tmp_path):
    _eval(*tiny, tmp_path, method="scope", budget=4, limit=2)
    (tmp_path / "results.json").write_text('{"tasks": {"po')
    with pytest.warns(UserWarning, match="results.json is unreadable"):
        res = _eval(*tiny, tmp_path, method="scope", budget=4, limit=2)
    assert res["tasks"]["pope"]["n"] == 2
    assert json.loads((tmp_path / "results.json").read_text())["tasks"]["pope"]["n"] == 2


def test_an_empty_lock_file_left_by_a_crash_is_taken_over(tiny, tmp_path):
    (tmp_path / ".lock").write_text("")
    os.utime(tmp_path / ".lock", (1, 1))  # written long ago
    _eval(*tiny, tmp_path, method="scope", budget=4, limit=1)


def test_an_empty_budget_list_is_refused(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "scope.load", types.SimpleNamespace(load=lambda *a, **k: tiny_llava()))
    from scope.eval.__main__ import main

    with pytest.raises(SystemExit, match="names no budget"):
        main(["--budget", ",", "--out", str(tmp_path)])


def _rank_main(rank, world, init_file, out_dir, seed, queue):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world)
    )
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=init_file, ACCELERATE_USE_CPU="1")
    sys.path.insert(0, os.path.dirname(__file__))
    from test_eval_runner import CharProcessor, ScriptedModel

    try:
        evaluate(ScriptedModel({}), CharProcessor(), "pope", out_dir=out_dir, datasets={"pope": fixture("pope")},
                 seed=seed, progress=False)  # fmt: skip
        queue.put((rank, "ok"))
    except ValueError as err:
        queue.put((rank, f"ValueError: {err}"))


def test_a_refused_resume_is_raised_on_every_rank(tmp_path):
    import socket

    with socket.socket() as s:  # a free port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    ctx = multiprocessing.get_context("spawn")
    _eval(*tiny_llava(seed=0), tmp_path, method=None, seed=1)  # a run with seed 1 is there
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, tmp_path, 2, queue)) for r in range(2)]
    for p in procs:
        p.start()
    outcomes = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert all("another configuration" in outcomes[r] and "seed" in outcomes[r] for r in range(2)), outcomes
    # the same two processes on a fresh directory share one run: two ranks, every question once
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, tmp_path / "fresh", 2, queue)) for r in range(2)]
    for p in procs:
        p.start()
    assert dict(queue.get(timeout=120) for _ in procs) == {0: "ok", 1: "ok"}
    for p in procs:
        p.join(30)
    assert json.loads((tmp_path / "fresh" / "config.json").read_text())["world_size"] == 2
    assert [r["idx"] for r in read_jsonl(tmp_path / "fresh" / "samples" / "pope.jsonl")] == list(range(6))
