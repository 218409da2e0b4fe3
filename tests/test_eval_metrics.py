"""Scorers against hand-computed values, and every task's prompt/score/aggregate on lmms-lab-schema fixtures."""

from __future__ import annotations

import pytest

from scope.eval import get_task
from scope.eval import metrics as M
from scope.eval.fixtures import FIXTURES, fixture, gqa_images
from scope.eval.tasks import GQAJoined, prepare


@pytest.mark.parametrize(
    "text,label",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        (" No", "no"),
        ("No, there is no dog.", "no"),
        ("There is no dog in the image.", "no"),
        ("The dog is not there", "no"),
        ("Yes, there is a dog. No cat though.", "yes"),  # only the first sentence counts
        ("I think yes", "yes"),
        ("Nope", "other"),
        ("", "other"),
    ],
)
def test_parse_yes_no(text, label):
    assert M.parse_yes_no(text) == label


@pytest.mark.parametrize(
    "text,label",
    [
        ("Yes", "yes"),
        ("no.", "no"),
        ("y", "yes"),
        ("N", "no"),
        ("x", "other"),
        ("Yes, it is", "yes"),
        ("Not at all", "no"),
        ("It is yes", "other"),
    ],
)
def test_parse_mme_answer(text, label):
    assert M.parse_mme_answer(text) == label


def test_binary_metrics_by_hand():
    golds = ["yes", "yes", "yes", "no", "no", "no"]
    preds = ["yes", "yes", "no", "yes", "no", "other"]
    m = M.binary_metrics(preds, golds)
    # TP 2, FP 1, positives 3 -> P 2/3, R 2/3, F1 2/3; correct 3/6; yes 3/6
    assert m["precision"] == pytest.approx(200 / 3) and m["recall"] == pytest.approx(200 / 3)
    assert (
        m["f1"] == pytest.approx(200 / 3)
        and m["accuracy"] == pytest.approx(50.0)
        and m["yes_ratio"] == pytest.approx(50.0)
    )
    assert M.binary_metrics(["no"] * 2, ["yes", "no"])["f1"] == 0.0
    with pytest.raises(ValueError, match="length"):
        M.binary_metrics(["yes"], [])


def test_mme_pairs_by_hand():
    items = [
        ("existence", "e/1.png", 1.0),
        ("existence", "e/1.png", 1.0),  # pair right: acc+ counts
        ("existence", "e/2.png", 1.0),
        ("existence", "e/2.png", 0.0),  # half right: acc only
        ("OCR", "o/1.png", 0.0),
        ("OCR", "o/1.png", 0.0),
        ("code_reasoning", "c/1.png", 1.0),
        ("code_reasoning", "c/1.png", 1.0),
    ]
    s = M.mme_scores(items)
    # existence: acc 3/4 = 75, acc+ 1/2 = 50 -> 125; OCR 0; code 200
    assert s["existence"] == pytest.approx(125.0) and s["OCR"] == 0.0 and s["code_reasoning"] == 200.0
    assert (
        s["perception"] == pytest.approx(125.0)
        and s["cognition"] == pytest.approx(200.0)
        and s["total"] == pytest.approx(325.0)
    )
    with pytest.raises(ValueError, match="unknown MME"):
        M.mme_scores([("poetry", "p.png", 1.0)])


@pytest.mark.parametrize(
    "raw,norm",
    [
        ("Nokia", "nokia"),
        ("The Nokia.", "nokia"),
        ("two", "2"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("coca-cola", "coca cola"),  # punctuation inside a word becomes a space
        ("yes - no", "yes no"),  # next to a space it goes
        ("What's up?", "what 's up"),
    ],
)
def test_vqa_normalisation(raw, norm):
    assert M.normalize_vqa_answer(raw) == norm


def test_vqa_accuracy_by_hand():
    gts = ["nokia"] * 2 + ["samsung"] * 8
    # each leave-one-out subset: 8 subsets keep 2 'nokia' (2/3), 2 keep one (1/3) -> (8*2/3 + 2*1/3)/10 = 0.6
    assert M.vqa_accuracy("Nokia.", gts) == pytest.approx(0.6)
    assert M.vqa_accuracy("samsung", gts) == pytest.approx(1.0)
    assert M.vqa_accuracy("apple", gts) == 0.0
    # 3 matches: 7 subsets keep 3 (1.0), 3 keep 2 (2/3) -> 0.9
    assert M.vqa_accuracy("ten", ["10"] * 3 + ["x"] * 7) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="answers"):
        M.vqa_accuracy("a", [])


def test_exact_match_gqa():
    assert M.exact_match("Yes.", "yes") == 1.0 and M.exact_match(" Woman ", "woman") == 1.0
    assert M.exact_match("the woman", "woman") == 0.0  # GQA keeps articles, unlike VQA


@pytest.mark.parametrize(
    "text,letter",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(C)", "C"),
        ("The answer is D", "D"),
        ("A dog is sitting there", None),
        ("A", "A"),
        ("B or C", None),
        ("Answer:C", None),
    ],
)
def test_parse_option_letter(text, letter):
    assert M.parse_option_letter(text) == letter


def test_match_option_falls_back_to_option_text():
    opts = {"A": "a dog", "B": "a cat", "C": "a bird"}
    assert M.match_option("It is a cat.", opts) == "B"
    assert M.match_option("a cat or a dog", opts) is None  # ambiguous -> unparsed -> wrong


def test_sqa_and_seed_rules():
    assert M.sqa_correct("B", "B") and M.sqa_correct("b", "B") and M.sqa_correct("B. whale", "B")
    assert not M.sqa_correct("The answer is B", "B") and not M.sqa_correct("C. frog", "B")
    assert (
        M.seed_correct("A) one", "A")
        and M.seed_correct("a", "A")
        and not M.seed_correct("The answer: A", "A")
    )


def test_mmmu_parsers():
    opts = ["triangle", "square", "pentagon", "circle"]
    assert M.parse_mmmu_choice("(C)", opts) == "C"
    assert M.parse_mmmu_choice("C", opts) == "C"
    assert M.parse_mmmu_choice("B. square", opts) == "B"
    assert M.parse_mmmu_choice("I think it is the pentagon shape here", opts) == "C"
    # no candidate: a seeded random letter, stable per question id
    picks = {M.parse_mmmu_choice("???", opts, seed_key="q1") for _ in range(3)}
    assert len(picks) == 1 and picks <= set("ABCD")
    assert M.mmmu_open_correct(M.parse_mmmu_open("The speed is 12.50 m/s."), "12.5") == 1.0
    assert M.mmmu_open_correct(M.parse_mmmu_open("so the answer is 1,200"), "1200") == 1.0
    assert M.mmmu_open_correct(M.parse_mmmu_open("It is blue."), "red") == 0.0


def _score_all(name, preds):
    task = get_task(name)
    docs = prepare(task, fixture(name), None)
    recs = []
    for i, (d, p) in enumerate(zip(docs, preds)):
        r = {"idx": i, "answer": task.target(d), **task.score(d, p)}
        r.setdefault(task.unit, i)
        recs.append(r)
    assert len(recs) == len(docs)
    return task, docs, recs, task.aggregate(recs)


def test_every_fixture_has_a_task_with_images_and_prompt():
    for name in FIXTURES:
        task = get_task(name)
        docs = prepare(task, fixture(name), None)
        for d in docs:
            assert task.images(d) and all(im.mode == "RGB" for im in task.images(d))
            assert task.prompt(d).strip() and task.target(d)


def test_pope_task_pooled_and_per_split():
    _, _, recs, m = _score_all("pope", ["Yes", "Yes", "yes.", "no", "Yes", "No"])
    # row 1 wrong (FP): pooled P 3/4 R 1 -> F1 6/7; adversarial P 1/2 R 1 -> 2/3
    assert m["f1"] == pytest.approx(600 / 7) and m["adversarial/f1"] == pytest.approx(200 / 3)
    assert m["popular/accuracy"] == 100.0 and m["random/f1"] == 100.0


def test_mme_task_prompt_and_pairs():
    task, docs, recs, m = _score_all("mme", ["Yes", "No", "Yes", "Yes", "No", "No"])
    assert "Please answer yes or no" not in task.prompt(docs[0]) and task.prompt(docs[0]).endswith(
        "single word or phrase."
    )
    # existence 200; OCR acc 50 acc+ 0 -> 50; code_reasoning acc 50 acc+ 0 -> 50
    assert (
        m["perception"] == pytest.approx(250.0)
        and m["cognition"] == pytest.approx(50.0)
        and m["total"] == pytest.approx(300.0)
    )
    assert recs[0]["pair"] == recs[1]["pair"] != recs[2]["pair"]


def test_mmbench_circular_and_prompt():
    task, docs, recs, m = _score_all("mmbench_en_dev", ["A", "B. summer", "B"])
    p0, p1 = task.prompt(docs[0]), task.prompt(docs[1])
    assert "D." not in p0 and p0.startswith("What is shown? There are several options:\nA. a dog")
    assert p1.startswith("Look at the trees. Which season")
    # question 0 right in the original, wrong in its circular copy (answer C) -> circular miss; q1 right
    assert [r["score"] for r in recs] == [1.0, 1.0, 0.0] and m["accuracy"] == pytest.approx(50.0)
    _, _, _, m2 = _score_all("mmbench_en_dev", ["a dog", "B", "C"])
    assert m2["accuracy"] == pytest.approx(100.0)


def test_sqa_seed_textvqa_gqa_mmmu_tasks():
    task, docs, _, m = _score_all("scienceqa_img", ["B", "B"])
    assert m["accuracy"] == 50.0 and task.prompt(docs[1]).startswith("Context: A girl moves a box.\n")
    task, docs, _, m = _score_all("seedbench", ["A", "B", "B"])
    # every question is kept: image rows A (right) and B for C (wrong); the video row B (right)
    assert len(docs) == 3 and m == {
        "seed_all": pytest.approx(200 / 3),
        "seed_image": 50.0,
        "seed_video": 100.0,
    }
    task, docs, _, m = _score_all("textvqa_val", ["nokia", "Ten"])
    # q2: 'Ten' -> '10' matches 'ten', '10' and '10.' (3 of 10; '1o' does not) -> 0.9
    assert m["accuracy"] == pytest.approx(100 * (1.0 + 0.9) / 2)
    _, _, _, m = _score_all("gqa", ["No", "the woman", "White."])
    assert m["accuracy"] == pytest.approx(200 / 3)
    task, docs, _, m = _score_all("mmmu_val", ["(C)", "The speed is 12.5 m/s"])
    assert len(task.images(docs[0])) == 2 and len(task.images(docs[1])) == 1
    assert m["accuracy"] == 100.0 and m["subject/Math"] == 100.0


def test_gqa_join_and_limit():
    q = fixture("gqa").remove_columns("image")
    joined = GQAJoined(q, gqa_images())
    assert len(joined) == 3 and joined[2]["image"].size == joined[0]["image"].size
    assert list(joined[1]["image"].getpixel((0, 0))) == list(fixture("gqa")[1]["image"].getpixel((0, 0)))
    assert len(prepare(get_task("pope"), fixture("pope"), 4)) == 4


def test_hub_loading_fails_clearly_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    with pytest.raises(RuntimeError, match="lmms-lab/POPE"):
        get_task("pope").load(limit=2)
