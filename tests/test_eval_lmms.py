"""The optional lmms-eval plugin model ``scope_llava`` (skipped where lmms-eval is not installed)."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None


@pytest.mark.skipif(HAS_LMMS, reason="lmms-eval is installed")
def test_plugin_without_lmms_eval_says_how_to_install():
    with pytest.raises(ImportError, match=r"scope-pruning\[lmms\]"):
        importlib.import_module("scope.eval.lmms_plugin")


@pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed (optional extra)")
def test_plugin_answers_constructed_requests():
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.registry import get_model

    from scope.eval import lmms_plugin
    from scope.testing import tiny_images, tiny_llava

    assert get_model("scope_llava") is lmms_plugin.ScopeLlava
    assert lmms_plugin.manifest().model_id == "scope_llava"
    model, proc = tiny_llava(seed=0)
    lm = lmms_plugin.ScopeLlava(model=model, processor=proc, method="scope", budget=4, batch_size=2)
    assert model._scope.method == "scope" and model._scope.budget == 4
    docs = [{"image": im} for im in tiny_images(3)]
    lm.task_dict = {"fake": {"test": docs}}
    reqs = [
        Instance(
            request_type="generate_until",
            arguments=(
                f"Is there a dog {i}?",
                {"max_new_tokens": 3, "until": ["ASSISTANT:"]},
                lambda d: [d["image"]],
                i,
                "fake",
                "test",
            ),
            idx=0,
            metadata={"task": "fake", "doc_id": i, "repeats": 1},
        )
        for i in range(3)
    ]
    out = lm.generate_until(reqs)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    # the same answers as the runner gives one by one
    from scope.eval import build_prompt, generate_answers

    one = [
        generate_answers(
            model, proc, [build_prompt(proc, f"Is there a dog {i}?", 1)], [[docs[i]["image"]]], 3
        )[0][0]
        for i in range(3)
    ]
    assert out == [t.split("ASSISTANT:")[0].strip() for t in one]
    with pytest.raises(NotImplementedError):
        lm.loglikelihood(reqs)


@pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed (optional extra)")
def test_scorers_agree_with_lmms_eval_task_code(monkeypatch):
    """Our re-implementations give lmms-eval's numbers on random answers (POPE, MME, TextVQA, SQA, SEED,
    MMBench option matching, MMMU choice parsing)."""
    import random
    import sys
    import types

    import lmms_eval

    from scope.eval import get_task
    from scope.eval import metrics as M

    # import the task utils without lmms_eval.tasks.__init__ (it pulls in every metric library)
    pkg = types.ModuleType("lmms_eval.tasks")
    pkg.__path__ = [lmms_eval.__path__[0] + "/tasks"]
    monkeypatch.setitem(sys.modules, "lmms_eval.tasks", pkg)
    utils = {
        n: importlib.import_module(f"lmms_eval.tasks.{n}.utils")
        for n in ("pope", "mme", "textvqa", "scienceqa", "seedbench")
    }
    rng = random.Random(0)

    golds = [rng.choice(["yes", "no"]) for _ in range(300)]
    preds = [rng.choice(["Yes", "No", "yes", "no"]) for _ in range(300)]
    res = [
        utils["pope"].pope_process_results({"answer": g, "question_id": str(i)}, [p])["pope_f1_score"]
        for i, (g, p) in enumerate(zip(golds, preds))
    ]
    assert M.binary_metrics([M.parse_yes_no(p) for p in preds], golds)["f1"] == pytest.approx(
        100 * utils["pope"].pope_aggregate_f1_score(res)
    )

    docs, answers = [], []
    for c in M.MME_PERCEPTION + M.MME_COGNITION:
        for k in range(10):
            for gold in ("Yes", "No"):
                docs.append({"question_id": f"{c}/{k}.png", "category": c, "answer": gold})
                answers.append(rng.choice(["Yes", "No", "yes.", "No, it is not", "y", "maybe"]))
    per = [utils["mme"].mme_process_results(d, [a]) for d, a in zip(docs, answers)]
    task = get_task("mme")
    ours = task.aggregate([task.score(d, a) for d, a in zip(docs, answers)])
    for key in ("perception", "cognition"):
        ref = [v for r in per for k, v in r.items() if k == f"mme_{key}_score"]
        assert ours[key] == pytest.approx(utils["mme"].mme_aggregate_results(ref))

    words = [
        "Nokia",
        "nokia.",
        "the nokia",
        "two",
        "2",
        "coca-cola",
        "coca cola",
        "10,000",
        "10000",
        "dont",
        "don't",
        "Cat!",
    ]
    for _ in range(200):
        gts, p = [rng.choice(words) for _ in range(10)], rng.choice(words)
        ref = utils["textvqa"].textvqa_process_results({"answers": list(gts), "question_id": 1}, [p])[
            "exact_match"
        ]
        assert M.vqa_accuracy(p, gts) == pytest.approx(ref)

    for c in ["A", "B", "b", "B. whale", "The answer is B", "C.", "(B)", "b."]:
        assert (
            M.sqa_correct(c, "B")
            == utils["scienceqa"].sqa_process_results({"choices": ["x", "y", "z"], "answer": 1}, [c])[
                "exact_match"
            ]
        )
    for c in ["A", "A.", "a", "B) two", " C", "The answer is A"]:
        r = utils["seedbench"].seed_process_result(
            {"answer": "A", "data_type": "image", "question_id": "1"}, [c]
        )["seed_all"]
        assert M.seed_correct(c, "A") == utils["seedbench"].seed_aggregation_result([r])

    from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator

    ev, opts = MMBench_Evaluator(), {"A": "a dog", "B": "a cat", "C": "a bird", "D": "a fish"}
    for c in [
        "A",
        "B.",
        "(C)",
        "The answer is D",
        "A dog is here",
        "a cat",
        "a cat or a dog",
        "C) a bird",
        ":B",
        "B,",
        "A and B",
    ]:
        assert M.match_option(c, dict(opts)) == (ev.can_infer(c, dict(opts)) or None), c

    mmmu = importlib.import_module("lmms_eval.tasks._task_utils.mmmu_mcq_utils")
    options = ["triangle", "square", "pentagon", "circle"]
    index = {chr(65 + i): o for i, o in enumerate(options)}
    for c in ["(C)", "C", "B. square", "I think it is the pentagon shape here", "It is (B) or (D)", "A B"]:
        assert M.parse_mmmu_choice(c, options) == mmmu.parse_mmmu_multi_choice_response(
            c, list(index), index
        ), c
