"""The runner's bookkeeping on a scripted stand-in model: JSONL logs, resume after a crash, rank sharding.

The stand-in answers from a table keyed by question text, so every score is known in advance; the real
tiny LLaVA path is covered in test_eval_model.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from scope.eval import evaluate, read_jsonl, rescore
from scope.eval.fixtures import fixture


class CharProcessor:
    """Character-level 'processor': ids are code points, 0 pads (left), no chat template."""

    image_token = "<image>"
    chat_template = None

    def __init__(self):
        self.tokenizer = self
        self.padding_side = "right"
        self.pad_token_id = 0
        self.seen_padding_sides = []

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True):
        self.seen_padding_sides.append(self.padding_side)
        n = max(len(t) for t in text)
        ids = torch.zeros(len(text), n, dtype=torch.long)
        for i, t in enumerate(text):
            ids[i, n - len(t) :] = torch.tensor([ord(c) for c in t])
        out = {"input_ids": ids, "attention_mask": (ids > 0).long()}
        if images:
            out["pixel_values"] = torch.zeros(len(images), 3, 2, 2)
        return out

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["".join(chr(int(c)) for c in row if int(c) > 0) for row in ids]


class ScriptedModel(torch.nn.Module):
    """Answers ``answers[question]`` (default "no"); raises after ``crash_after`` generate calls."""

    def __init__(self, answers: dict[str, str], crash_after: int | None = None):
        super().__init__()
        self.answers, self.crash_after, self.calls = answers, crash_after, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def generate(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        max_new_tokens=16,
        stopping_criteria=None,
        **kw,
    ):
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        texts = CharProcessor().batch_decode(input_ids)
        outs = []
        for t in texts:
            ans = next((a for q, a in self.answers.items() if q in t), "no")
            outs.append([ord(c) for c in ans[:max_new_tokens]])
        n = max(len(o) for o in outs)
        new = torch.zeros(len(outs), n, dtype=torch.long)
        for i, o in enumerate(outs):
            new[i, : len(o)] = torch.tensor(o)
        full = torch.cat([input_ids, new], 1)
        for step in range(n):  # transformers calls the stopping criteria once per new token
            for crit in stopping_criteria or []:
                crit(full[:, : input_ids.shape[1] + step + 1], None)
        return full


def _pope_answers(ds, wrong: set[int] = frozenset()):
    # right answers except at the rows in `wrong`; "Yes."/"No, ..." exercise the yes/no parser
    out = {}
    for i, row in enumerate(ds):
        right = row["answer"] == "yes"
        says_yes = right != (i in wrong)
        out[row["question"]] = "Yes." if says_yes else "No, there is not."
    return out


def _run(tmp_path, model, ds, **kw):
    return evaluate(
        model, CharProcessor(), "pope", out_dir=tmp_path, datasets={"pope": ds}, progress=False, **kw
    )


def test_logs_config_and_scores(tmp_path):
    ds = fixture("pope")
    res = _run(tmp_path, ScriptedModel(_pope_answers(ds, wrong={1})), ds, batch_size=4, seed=3)
    recs = read_jsonl(tmp_path / "samples" / "pope.jsonl")
    assert [r["idx"] for r in recs] == list(range(6))
    assert {"qid", "prompt", "prediction", "answer", "score", "kept_tokens"} <= set(recs[0])
    assert recs[0]["prompt"].startswith("USER: <image>\nIs there a dog") and recs[0]["prompt"].endswith(
        "ASSISTANT:"
    )
    assert [r["score"] for r in recs] == [1, 0, 1, 1, 1, 1]
    # row 1 (gold "no") answered yes: pooled precision 3/4, recall 1, F1 6/7
    m = res["tasks"]["pope"]["metrics"]
    assert m["f1"] == pytest.approx(100 * 6 / 7) and m["accuracy"] == pytest.approx(100 * 5 / 6)
    assert m["adversarial/f1"] == pytest.approx(100 * 2 / 3) and m["random/f1"] == pytest.approx(100.0)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["seed"] == 3 and cfg["model"] == "ScriptedModel" and "torch" in cfg["versions"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["tasks"]["pope"]["value"] == pytest.approx(100 * 6 / 7)
    assert not list((tmp_path / "samples").glob("*.rank*.jsonl"))


def test_resume_after_crash_loses_and_duplicates_nothing(tmp_path):
    ds = fixture("pope")
    answers = _pope_answers(ds, wrong={2, 5})
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "run", ScriptedModel(answers, crash_after=2), ds, batch_size=2)
    part = tmp_path / "run" / "samples" / "pope.rank0.jsonl"
    assert len(read_jsonl(part)) == 4  # two finished batches were flushed
    with part.open("a") as f:  # the process died in the middle of writing a line
        f.write('{"idx": 4, "qid": "trunc')
    model = ScriptedModel(answers)
    res = _run(tmp_path / "run", model, ds, batch_size=2)
    assert model.calls == 1  # only the last batch was asked again
    recs = read_jsonl(tmp_path / "run" / "samples" / "pope.jsonl")
    assert [r["idx"] for r in recs] == list(range(6))
    fresh = _run(tmp_path / "fresh", ScriptedModel(answers), ds, batch_size=2)
    assert res["tasks"]["pope"]["metrics"] == fresh["tasks"]["pope"]["metrics"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resumed"] == 1


def test_resume_refuses_another_configuration(tmp_path):
    ds = fixture("pope")
    _run(tmp_path, ScriptedModel({}), ds, limit=2)
    with pytest.raises(ValueError, match="limit"):
        _run(tmp_path, ScriptedModel({}), ds, limit=3)
    res = _run(tmp_path, ScriptedModel({}), ds, limit=3, overwrite=True)
    assert res["tasks"]["pope"]["n"] == 3


def test_simulated_ranks_shard_and_merge(tmp_path):
    ds = fixture("pope")
    answers = _pope_answers(ds, wrong={0, 3})
    models = [ScriptedModel(answers) for _ in range(3)]
    # rank 1 and 2 finish first and leave their rank files; rank 0 then merges everything
    for r in (2, 1):
        evaluate(
            models[r],
            CharProcessor(),
            "pope",
            out_dir=tmp_path / "ddp",
            datasets={"pope": ds},
            rank=r,
            world_size=3,
            batch_size=1,
            progress=False,
        )
    rank_files = sorted(p.name for p in (tmp_path / "ddp" / "samples").glob("*.jsonl"))
    assert rank_files == ["pope.rank1.jsonl", "pope.rank2.jsonl"]
    assert [r["idx"] for r in read_jsonl(tmp_path / "ddp" / "samples" / "pope.rank2.jsonl")] == [2, 5]
    res = evaluate(
        models[0],
        CharProcessor(),
        "pope",
        out_dir=tmp_path / "ddp",
        datasets={"pope": ds},
        rank=0,
        world_size=3,
        batch_size=1,
        progress=False,
    )
    assert [m.calls for m in models] == [2, 2, 2]
    assert [r["idx"] for r in read_jsonl(tmp_path / "ddp" / "samples" / "pope.jsonl")] == list(range(6))
    single = _run(tmp_path / "one", ScriptedModel(answers), ds)
    assert res["tasks"]["pope"]["metrics"] == single["tasks"]["pope"]["metrics"]
    assert rescore(tmp_path / "ddp")["tasks"]["pope"]["metrics"] == single["tasks"]["pope"]["metrics"]


def test_left_padding_and_restored_side(tmp_path):
    ds = fixture("pope")
    proc = CharProcessor()
    evaluate(
        ScriptedModel({}), proc, "pope", out_dir=tmp_path, datasets={"pope": ds}, batch_size=3, progress=False
    )
    assert set(proc.seen_padding_sides) == {"left"} and proc.padding_side == "right"


@pytest.mark.parametrize(
    "bad",
    [
        {"batch_size": 0},
        {"max_new_tokens": 0},
        {"rank": 2, "world_size": 2},
    ],
)
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        evaluate(
            ScriptedModel({}),
            CharProcessor(),
            "pope",
            out_dir=tmp_path,
            datasets={"pope": fixture("pope")},
            progress=False,
            **bad,
        )


def test_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="vqav2"):
        evaluate(ScriptedModel({}), CharProcessor(), "pope,vqav2", out_dir=tmp_path, progress=False)


def test_resume_refuses_fixture_answers_for_loaded_data(tmp_path):
    # a run on in-memory data (--fixtures) must not be resumed on the benchmark loaded from its source: the
    # loaded run would take the fixture answers for its first questions (the log is keyed by row index)
    fake, real = fixture("pope"), fixture("pope").map(lambda d: {"question": "Real: " + d["question"]})
    real.save_to_disk(str(tmp_path / "data" / "POPE"))
    _run(tmp_path / "run", ScriptedModel({}), fake)
    with pytest.raises(ValueError, match="pope"):
        evaluate(ScriptedModel({}), CharProcessor(), "pope", out_dir=tmp_path / "run",
                 data_dir=str(tmp_path / "data"), progress=False)  # fmt: skip
    res = evaluate(ScriptedModel({}), CharProcessor(), "pope", out_dir=tmp_path / "loaded",
                   data_dir=str(tmp_path / "data"), progress=False)  # fmt: skip
    assert res["tasks"]["pope"]["n"] == 6
    recs = read_jsonl(tmp_path / "loaded" / "samples" / "pope.jsonl")
    assert all(r["prompt"].startswith("USER: <image>\nReal: ") for r in recs)
    evaluate(
        ScriptedModel({}),
        CharProcessor(),
        "pope",
        out_dir=tmp_path / "loaded",
        data_dir=str(tmp_path / "data"),
        progress=False,
    )  # fmt: skip -- loaded again: resumes


def test_resume_refuses_a_dataset_that_changed_under_the_logged_indices(tmp_path):
    ds = fixture("pope")
    answers = _pope_answers(ds)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "run", ScriptedModel(answers, crash_after=1), ds, batch_size=2)
    logged = [r["qid"] for r in read_jsonl(tmp_path / "run" / "samples" / "pope.rank0.jsonl")]
    assert len(logged) == 2
    # the first row gone (a file missing from a local copy): every later question moves up one index
    shifted = ds.select(range(1, len(ds)))
    with pytest.raises(ValueError, match=rf"question 0 was '{logged[0]}'.*is '{shifted[0]['question_id']}'"):
        _run(tmp_path / "run", ScriptedModel(answers), shifted, batch_size=2)
    # the same data resumes
    res = _run(tmp_path / "run", ScriptedModel(answers), ds, batch_size=2)
    assert res["tasks"]["pope"]["n"] == len(ds)
