"""Video QA in scope.eval (Video-LLaVA, Table 3): frame sampling, the judges, prompts, loading, and a run of the
tiny random Video-LLaVA on the fixture videos. Expected values are written by hand."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from scope.eval import evaluate, rescore
from scope.eval import video_tasks as V
from scope.eval.fixtures import fixture
from scope.eval.generate import build_prompt
from scope.eval.tasks import get_task
from scope.protocol import PAPER

QUESTION = "what is moving?"


# ----------------------------------------------------------------------------------------------------------
# frames


def test_frame_indices_by_hand():
    assert V.frame_indices(8) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert V.frame_indices(10) == [0, 1, 2, 3, 5, 6, 7, 9]  # 9/7 = 1.29 per step, rounded down
    assert V.frame_indices(100) == [0, 14, 28, 42, 56, 70, 84, 99]
    assert V.frame_indices(5) == [0, 0, 1, 1, 2, 2, 3, 4]  # shorter than 8: frames repeat
    assert V.frame_indices(1) == [0] * 8
    assert V.frame_indices(30, 4) == [0, 9, 19, 29] and V.frame_indices(7, 1) == [0]
    for n in range(1, 400):  # Video-LLaVA's own expression, computed independently
        assert V.frame_indices(n) == np.linspace(0, n - 1, 8, dtype=int).tolist()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n_total"):
            V.frame_indices(bad)


def test_fixture_frames_are_sampled_like_a_video():
    from scope.testing import tiny_video

    clip = tiny_video(12, seed=5)
    got = V.video_frames({"frames": clip})
    # 12 frames -> indices 0, 1, 3, 4, 6, 7, 9, 11
    assert [np.asarray(f).tobytes() for f in got] == [
        np.asarray(clip[i]).tobytes() for i in (0, 1, 3, 4, 6, 7, 9, 11)
    ]
    with pytest.raises(ValueError, match="neither 'frames' nor 'video'"):
        V.video_frames({"question_id": "q1"})


def write_grey_video(path, n: int, size: int = 32) -> None:
    """An mp4 of ``n`` flat grey frames, frame i at grey level 10 i."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 10 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_decode_a_video_file_with_pyav(tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    write_grey_video(path, 20)
    frames = V.decode_frames(path)
    assert len(frames) == 8 and frames[0].size == (32, 32) and frames[0].mode == "RGB"
    # 20 frames -> indices 0, 2, 5, 8, 10, 13, 16, 19 -> grey levels 10 x those (lossy codec: +-4)
    levels = [float(np.asarray(f).mean()) for f in frames]
    assert levels == pytest.approx([0, 20, 50, 80, 100, 130, 160, 190], abs=4)
    with pytest.raises(FileNotFoundError, match="no video file"):
        V.decode_frames(tmp_path / "missing.mp4")


def test_a_second_question_on_a_video_does_not_decode_it_again(tmp_path, monkeypatch):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    write_grey_video(path, 12)
    opened = []
    real_open = av.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(av, "open", counting_open)
    first = V.video_frames({"question_id": "q0", "video": str(path)})
    n_first = len(opened)
    assert n_first >= 1  # decoded once: the frame count, then the frames
    second = V.video_frames({"question_id": "q1", "video": str(path)})
    assert len(opened) == n_first  # not opened again
    assert [np.asarray(f).tobytes() for f in second] == [np.asarray(f).tobytes() for f in first]
    second.pop()  # the caller's list is its own: the kept frames stay whole
    assert len(V.decode_frames(path)) == 8 and len(opened) == n_first
    V.decode_frames(path, 4)  # another frame count decodes again
    assert len(opened) > n_first
    n_before = len(opened)
    write_grey_video(path, 20)  # a rewritten file decodes again
    assert len(V.decode_frames(path)) == 8 and len(opened) > n_before


def test_missing_pyav_is_a_clear_error(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(ImportError, match=r"scope-pruning\[video\]"):
        V.decode_frames(tmp_path / "x.mp4")


# ----------------------------------------------------------------------------------------------------------
# judges


def test_match_judge_by_hand():
    assert V.match_correct("A man is dancing.", "man")
    assert not V.match_correct("A woman is dancing.", "man")  # whole words only
    assert V.match_correct("There are two dogs", "2")  # number words as digits
    assert V.match_correct("playing guitar loudly", "Playing guitar")
    assert not V.match_correct("guitar playing", "playing guitar")  # in order
    assert not V.match_correct("he is dancing", "dance")  # no paraphrase: GPT would say yes
    assert not V.match_correct("", "man") and not V.match_correct("a man", "")
    assert V.match_score({"answer": "Man"}, "the man") == {"score": 1.0, "judge": "match"}


class FakeClient:
    """An ``openai.OpenAI`` stand-in: each call takes the next of ``replies`` (an exception is raised), or
    the reply ``replies(messages)`` gives."""

    def __init__(self, replies):
        self.replies, self.calls = replies if callable(replies) else list(replies), []
        self.chat = types.SimpleNamespace(completions=types.SimpleNamespace(create=self.create))

    def create(self, **kwargs):
        self.calls.append(kwargs)
        reply = self.replies(kwargs["messages"]) if callable(self.replies) else self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        message = types.SimpleNamespace(content=reply)
        return types.SimpleNamespace(choices=[types.SimpleNamespace(message=message)])


DOC = {"question_id": "v1_0", "question": "what is the man doing", "answer": "dance"}


def test_openai_judge_with_a_fake_client(monkeypatch):
    fake = FakeClient(["{'pred': 'yes', 'score': 4}"])
    monkeypatch.setattr(V, "openai_client", lambda: fake)
    rec = get_task("msvd_qa").judged("openai").score(DOC, "he is dancing")
    assert rec["gpt_pred"] == "yes" and rec["gpt_score"] == 4.0 and rec["score"] == 1.0
    assert rec["judge"] == "openai" and rec["judge_model"] == "gpt-3.5-turbo" and rec["judge_attempts"] == 1
    (call,) = fake.calls
    assert call["model"] == "gpt-3.5-turbo" and call["temperature"] == 0 and rec["judge_temperature"] == 0
    system, user = call["messages"]
    assert system["role"] == "system" and "evaluating the correctness" in system["content"]
    assert (
        "Question: what is the man doing\nCorrect Answer: dance\nPredicted Answer: he is dancing\n"
        in (user["content"])
    )
    assert user["content"].endswith("{'pred': 'yes', 'score': 4.8}.")

    # the authors' call: no temperature sent (the API's default, 1)
    fake = FakeClient(["{'pred': 'no', 'score': 1}"])
    monkeypatch.setattr(V, "openai_client", lambda: fake)
    rec = get_task("msvd_qa").judged("openai_authors").score(DOC, "he sleeps")
    assert "temperature" not in fake.calls[0] and rec["judge_temperature"] is None
    assert rec["judge"] == "openai_authors"
    assert (rec["gpt_pred"], rec["gpt_score"], rec["score"]) == ("no", 1.0, 0.0)


def test_openai_judge_asks_again_then_records_unparsed(monkeypatch):
    judge = V.GPTJudge(backoff_s=0.0)
    fake = FakeClient(["I think yes.", "{'pred': 'yes', 'score': 3}"])  # a second call parses
    monkeypatch.setattr(V, "openai_client", lambda: fake)
    rec = judge(DOC, "dancing")
    assert len(fake.calls) == 2 and rec["judge_attempts"] == 2
    assert (rec["gpt_pred"], rec["gpt_score"], rec["score"]) == ("yes", 3.0, 1.0)

    fake = FakeClient(["yes", "['yes', 5]", "{'score': 5}", "never asked"])  # three without a verdict
    monkeypatch.setattr(V, "openai_client", lambda: fake)
    rec = judge(DOC, "dancing")
    assert len(fake.calls) == 3 and rec["judge_attempts"] == 3
    assert (rec["gpt_pred"], rec["gpt_score"], rec["score"]) == (None, 5.0, None)
    assert rec["judge_reply"] == "{'score': 5}"

    # failed calls: backed off, 1 then 2 seconds, and asked again; a third failure raises, naming the question
    waits = []
    monkeypatch.setattr(V.time, "sleep", waits.append)
    fake = FakeClient([ConnectionError("reset"), TimeoutError("slow"), "{'pred': 'no', 'score': 0}"])
    monkeypatch.setattr(V, "openai_client", lambda: fake)
    rec = V.GPTJudge(backoff_s=1.0)(DOC, "sleeping")
    assert waits == [1.0, 2.0] and rec["judge_attempts"] == 3
    assert (rec["gpt_pred"], rec["gpt_score"]) == ("no", 0.0)
    fake = FakeClient([ConnectionError("down")] * 3)
    monkeypatch.setattr(V, "openai_client", lambda: fake)
    with pytest.raises(RuntimeError, match=r"failed 3 times on question 'v1_0': down"):
        V.GPTJudge(backoff_s=1.0)(DOC, "sleeping")
    assert len(fake.calls) == 3
    with pytest.raises(ValueError, match="attempts=0 must be a positive int"):
        V.GPTJudge(attempts=0)


def test_judge_replies_parse_and_aggregate_by_hand():
    assert V.parse_judgement("{'pred': 'no', 'score': 1}") == ("no", 1.0)
    assert V.parse_judgement(" {'pred': 'Yes', 'score': 4.8} ") == ("yes", 4.8)
    assert V.parse_judgement("{'pred': 'yes', 'score': 'high'}") == ("yes", None)  # the verdict is kept
    assert V.parse_judgement("{'pred': 'no', 'score': '2'}") == ("no", 2.0)
    assert V.parse_judgement("{'pred': 'maybe', 'score': 2}") == (None, 2.0)  # neither yes nor no
    assert V.parse_judgement("The answer is correct.") == (None, None)  # unparseable: no verdict
    assert V.parse_judgement("['yes', 5]") == (None, None)
    recs = [
        {"judge": "openai", "gpt_pred": "yes", "gpt_score": 4.8, "score": 1.0},
        {"judge": "openai", "gpt_pred": "no", "gpt_score": 1.0, "score": 0.0},
        {"judge": "openai", "gpt_pred": "yes", "gpt_score": 3.0, "score": 1.0},
        {"judge": "openai", "gpt_pred": "yes", "gpt_score": None, "score": 1.0},  # a score of 'high'
        {"judge": "openai", "gpt_pred": None, "gpt_score": None, "score": None},  # never parsed
    ]
    out = V.aggregate(recs)
    assert out["gpt_acc"] == pytest.approx(300 / 4)  # 3 yes of 4 verdicts; the unparsed one left out
    assert out["gpt_score"] == pytest.approx((4 + 1 + 3) / 3)  # each score truncated, as Video-LLaVA does
    assert out["gpt_unparsed"] == 1
    assert V.aggregate([{"judge": "match", "score": 1.0}, {"judge": "match", "score": 0.0}]) == {
        "match_acc": 50.0
    }
    with pytest.raises(ValueError, match="judge='gpt4' is unknown"):
        V.check_judge("gpt4")


def test_bootstrap_follows_the_records_judge():
    from scope.report import bootstrap_ci

    matched = [{"idx": i, "judge": "match", "score": 1.0} for i in range(4)]
    assert bootstrap_ci(matched, "msvd_qa", n_boot=20) == (100.0, 100.0)  # match_acc, not the task's gpt_acc
    judged = [{"idx": i, "judge": "openai", "gpt_pred": "no", "gpt_score": 1, "score": 0.0} for i in range(3)]
    assert bootstrap_ci(judged, "msvd_qa", n_boot=20) == (0.0, 0.0)  # gpt_acc
    with pytest.raises(ValueError, match=r"several judges: \['match', 'openai'\]"):
        bootstrap_ci(matched + judged, "msvd_qa", n_boot=20)


# ----------------------------------------------------------------------------------------------------------
# prompts


def test_prompts_under_paper_and_hf():
    from scope.testing import tiny_video_llava

    _, processor = tiny_video_llava()
    assert build_prompt(processor, QUESTION, 1, "paper", video=True) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: <video>\nwhat is moving? "
        "ASSISTANT:"
    )
    assert (
        build_prompt(processor, QUESTION, 1, "hf", video=True) == "USER: <video>\nwhat is moving? ASSISTANT:"
    )
    task = get_task("activitynet_qa")
    doc = {"question": "what is the man doing"}
    assert task.name == "activitynetqa" and task.max_new_tokens == 64
    assert task.prompt(doc) == "what is the man doing? Answer the question using a single word or phrase."
    assert get_task("msvd").prompt({"question": QUESTION}) == (
        "what is moving? Answer the question using a single word or phrase."
    )
    authors = task.under(PAPER)
    assert authors.prompt(doc) == "what is the man doing" and authors.max_new_tokens == 1024


def test_judged_tasks_name_their_metric():
    task = get_task("tgif_qa")
    assert task.main == "gpt_acc" and task.paper_column == "TGIF"
    assert task.judged("match").main == "match_acc" and task.judged(None).main == "match_acc"
    assert task.judged("openai").main == "gpt_acc"
    assert get_task("pope").judged("openai") is get_task("pope")  # rule-scored tasks: unchanged
    from scope.report import column_name

    assert column_name("tgif_qa", "match_acc") == "TGIF match_acc"  # never the paper's GPT column
    assert column_name("tgif_qa", "gpt_acc") == "TGIF"


# ----------------------------------------------------------------------------------------------------------
# loading


def test_load_local_layouts(tmp_path):
    pytest.importorskip("av")
    jsonl = tmp_path / "msvd_qa"
    jsonl.mkdir()
    write_grey_video(jsonl / "a.mp4", 3)
    rows = [{"question_id": "q1", "question": "who?", "answer": "man", "video": "a.mp4"}]
    (jsonl / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (got,) = V.load_video_qa("msvd_qa", data_dir=str(tmp_path))
    assert got["video"] == str(jsonl / "a.mp4") and got["answer"] == "man"

    folder = tmp_path / "Activitynet_Zero_Shot_QA"
    (folder / "videos").mkdir(parents=True)
    write_grey_video(folder / "videos" / "v_abc.mp4", 3)
    qs = [{"video_name": "abc", "question": "what", "question_id": "v_abc_0"}]
    qs.append({"video_name": "gone", "question": "who", "question_id": "v_gone_0"})
    (folder / "test_q.json").write_text(json.dumps(qs))
    (folder / "test_a.json").write_text(
        json.dumps([{"answer": "run", "type": 0}, {"answer": "man", "type": 1}])
    )
    with pytest.raises(FileNotFoundError, match=r"1 of 2 rows have no video file.*'missing': 'skip'"):
        V.load_video_qa("activitynetqa", data_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="left out 1 of 2"):
        rows = V.load_video_qa("activitynetqa", data_dir=str(tmp_path), missing="skip")
    assert [(r["question_id"], r["answer"], r["video"], r["type"]) for r in rows] == [
        ("v_abc_0", "run", str(folder / "videos" / "v_abc.mp4"), 0)  # the type is test_a.json's
    ]


def test_no_copy_names_every_place_tried(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        V.load_video_qa("tgif_qa", data_dir=str(tmp_path))
    assert str(tmp_path / "tgif_qa" / "test.jsonl") in str(err.value)
    assert str(tmp_path / "TGIF_Zero_Shot_QA") in str(err.value)
    with pytest.raises(ValueError, match="missing='maybe'"):
        V.load_video_qa("tgif_qa", data_dir=str(tmp_path), missing="maybe")


# ----------------------------------------------------------------------------------------------------------
# runs


@pytest.fixture(scope="module")
def tiny():
    from scope.testing import tiny_video_llava

    return tiny_video_llava(seed=0)


def test_evaluate_tiny_video_llava_records_the_judge_and_resumes(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    kw = dict(method="scope", budget=40, batch_size=2, max_new_tokens=3, progress=False)
    data = {"msvd_qa": fixture("msvd_qa")}
    res = evaluate(model, processor, "msvd_qa", out_dir=tmp_path, datasets=data, **kw)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["judge"] == "match"
    entry = json.loads((tmp_path / "results.json").read_text())["tasks"]["msvd_qa"]
    assert entry["main"] == "match_acc" and entry["n"] == 3
    assert entry["mean_kept_tokens"] == 40  # 8 frames x 5 tokens (CLS + 4 patches)
    recs = [json.loads(line) for line in (tmp_path / "samples" / "msvd_qa.jsonl").read_text().splitlines()]
    assert all(r["prompt"].startswith("USER: <video>\n") and r["judge"] == "match" for r in recs)
    # single-word answers: a match is the answer among the prediction's lower-cased words ("one" also as 1)
    words = [r["prediction"].lower().replace("one", "1").split() for r in recs]
    hand = [float(r["answer"].replace("one", "1") in w) for r, w in zip(recs, words)]
    assert entry["value"] == pytest.approx(100 * sum(hand) / 3)

    import scope.eval.runner as runner

    monkeypatch.setattr(runner, "generate_answers", lambda *a, **k: pytest.fail("a finished run recomputed"))
    again = evaluate(model, processor, "msvd_qa", out_dir=tmp_path, datasets=data, **kw)
    assert again["tasks"]["msvd_qa"]["value"] == res["tasks"]["msvd_qa"]["value"]
    assert rescore(tmp_path)["tasks"]["msvd_qa"]["main"] == "match_acc"
    with pytest.raises(ValueError, match="judge: 'match' there, 'openai' now"):
        evaluate(model, processor, "msvd_qa", out_dir=tmp_path, datasets=data, judge="openai", **kw)


# the fixture's questions (answers box, right, one) and answers written for them: the first alone matches
KNOWN_ANSWERS = {"what is moving": "A red box.", "which way does": "left", "how many boxes": "two boxes"}


def known_answers(model, processor, prompts, images, max_new_tokens, videos=False):
    """A stand-in for the runner's generate step: the answer written for each prompt's question."""
    assert videos and all(len(v) == 8 for v in images)  # each question's video: its 8 sampled frames
    preds = [next(a for q, a in KNOWN_ANSWERS.items() if q in p) for p in prompts]
    return preds, [40] * len(prompts)


def test_known_answers_score_by_hand(tiny, tmp_path, monkeypatch):
    import scope.eval.runner as runner

    model, processor = tiny
    monkeypatch.setattr(runner, "generate_answers", known_answers)
    kw = dict(batch_size=2, progress=False, datasets={"msvd_qa": fixture("msvd_qa")})
    res = evaluate(model, processor, "msvd_qa", out_dir=tmp_path / "match", **kw)
    entry = res["tasks"]["msvd_qa"]
    assert entry["main"] == "match_acc" and entry["n"] == 3
    # "A red box." holds "box"; "left" and "two boxes" hold neither "right" nor "one"
    assert entry["value"] == pytest.approx(100 / 3)

    # the GPT judge through the run: yes, no, and a reply that never parses (asked 3 times)
    def reply(messages):
        said = messages[1]["content"].split("Predicted Answer: ")[1]
        return {"A": "{'pred': 'yes', 'score': 5}", "l": "{'pred': 'no', 'score': 1}"}.get(said[0], "unsure")

    fake = FakeClient(reply)
    monkeypatch.setattr(V, "openai_client", lambda: fake)
    res = evaluate(model, processor, "msvd_qa", out_dir=tmp_path / "gpt", judge="openai", **kw)
    entry = res["tasks"]["msvd_qa"]
    assert entry["main"] == "gpt_acc" and entry["value"] == pytest.approx(50.0)  # 1 yes, 1 no; 1 unparsed
    assert entry["metrics"]["gpt_unparsed"] == 1 and entry["metrics"]["gpt_score"] == pytest.approx(3.0)
    assert len(fake.calls) == 1 + 1 + 3


def test_video_task_on_an_image_model_is_refused(tmp_path):
    from scope.testing import tiny_llava

    model, processor = tiny_llava(seed=0)
    with pytest.raises(ValueError, match=r"\['tgif_qa'\] are video QA.*LlavaForConditionalGeneration"):
        evaluate(model, processor, "pope,tgif_qa", out_dir=tmp_path, datasets={"tgif_qa": fixture("tgif_qa")})
    assert not (tmp_path / "config.json").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="judge='gpt' is unknown"):
        evaluate(model, processor, "pope", out_dir=tmp_path, judge="gpt")


def test_cli_show_prompts_on_the_tiny_video_model(capsys):
    from scope.eval.__main__ import main

    assert (
        main(
            ["--model", "tiny-video-llava", "--fixtures", "--tasks", "tgif", "--show-prompts", "--limit", "1"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        '"USER: <video>\\nwhat is moving? Answer the question using a single word or phrase. ASSISTANT:"'
        in out
    )
    assert "video: 8 frames of 32x32" in out and "video tokens in the prompt: 136" in out
