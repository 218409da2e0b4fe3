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


def test_openai_judge_with_a_fake_client(monkeypatch):
    calls = []

    def create(**kwargs):
        calls.append(kwargs)
        content = "{'pred': 'yes', 'score': 4}"
        return types.SimpleNamespace(
            choices=[types.SimpleNamespace(message=types.SimpleNamespace(content=content))]
        )

    fake = types.SimpleNamespace(chat=types.SimpleNamespace(completions=types.SimpleNamespace(create=create)))
    monkeypatch.setattr(V, "openai_client", lambda: fake)
    rec = V.openai_score({"question": "what is the man doing", "answer": "dance"}, "he is dancing")
    assert rec["gpt_pred"] == "yes" and rec["gpt_score"] == 4.0 and rec["score"] == 1.0
    assert rec["judge"] == "openai" and rec["judge_model"] == "gpt-3.5-turbo"
    (call,) = calls
    assert call["model"] == "gpt-3.5-turbo" and call["temperature"] == 0
    system, user = call["messages"]
    assert system["role"] == "system" and "evaluating the correctness" in system["content"]
    assert (
        "Question: what is the man doing\nCorrect Answer: dance\nPredicted Answer: he is dancing\n"
        in (user["content"])
    )
    assert user["content"].endswith("{'pred': 'yes', 'score': 4.8}.")


def test_judge_replies_parse_and_aggregate_by_hand():
    assert V.parse_judgement("{'pred': 'no', 'score': 1}") == ("no", 1.0)
    assert V.parse_judgement(" {'pred': 'Yes', 'score': 4.8} ") == ("yes", 4.8)
    assert V.parse_judgement("The answer is correct.") == ("no", 0.0)  # unparseable: no, 0
    assert V.parse_judgement("['yes', 5]") == ("no", 0.0)
    recs = [
        {"judge": "openai", "gpt_pred": "yes", "gpt_score": 4.8, "score": 1.0},
        {"judge": "openai", "gpt_pred": "no", "gpt_score": 1.0, "score": 0.0},
        {"judge": "openai", "gpt_pred": "yes", "gpt_score": 3.0, "score": 1.0},
    ]
    out = V.aggregate(recs)
    assert out["gpt_acc"] == pytest.approx(200 / 3)
    assert out["gpt_score"] == pytest.approx((4 + 1 + 3) / 3)  # each score truncated, as Video-LLaVA does
    assert V.aggregate([{"judge": "match", "score": 1.0}, {"judge": "match", "score": 0.0}]) == {
        "match_acc": 50.0
    }
    with pytest.raises(ValueError, match="judge='gpt4' is unknown"):
        V.check_judge("gpt4")


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
    assert [(r["question_id"], r["answer"], r["video"]) for r in rows] == [
        ("v_abc_0", "run", str(folder / "videos" / "v_abc.mp4"))
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
