"""Video question answering for Video-LLaVA (the paper's Table 3): MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA.

The pieces of the four tasks (loading, frames, prompts, scoring); :mod:`scope.eval.tasks` builds its
:class:`~scope.eval.tasks.Task` records from :func:`task_fields` and registers them under these names
(``activitynetqa`` as lmms-eval names it; lmms-eval ships no MSVD, MSRVTT or TGIF task).

How Table 3's numbers were measured. The paper copies its Video-LLaVA rows from VisionZip and SparseVLM,
which follow Video-LLaVA's own evaluation (PKU-YuanGroup/Video-LLaVA, ``videollava/eval/video/``): the
Video-ChatGPT question files (``test_q.json`` / ``test_a.json``), 8 frames per video sampled uniformly
(``np.linspace(0, n - 1, 8)`` cast to int), the ``llava_v1`` conversation with the frames in front of the
question, up to 1024 new tokens, and a GPT-3.5 judge (``gpt-3.5-turbo``) that answers each (question,
answer, prediction) with yes/no and a 0-5 score: accuracy = share judged "yes", score = mean score.

What runs here:

- frames: :func:`frame_indices` (the rule above) on the decoded video (PyAV, the ``video`` extra), or on
  frames a row carries already decoded (``frames``: the fixtures). No frame is flipped: the authors'
  transform flips a video horizontally with probability 0.5 even at test time.
- prompts: under ``paper`` the authors' raw question, the ``llava_v1`` conversation around ``<video>`` and
  1024 new tokens; under ``hf`` the checkpoint's chat template and lmms-eval's ``activitynetqa`` prompt
  ("?" and " Answer the question using a single word or phrase.", 64 new tokens), for all four tasks.
- scoring: a named judge, part of a run's identity (``evaluate(..., judge=)``, ``--judge``). ``match``
  (default, offline): the normalised answer occurs as whole words in the normalised prediction
  (:func:`match_correct`), metric ``match_acc``; it is *not* the paper's GPT accuracy, so its numbers are
  only comparable between our own runs (pruned vs unpruned). ``openai`` and ``openai_authors``: the
  authors' judge prompt and model through the ``openai`` package (``OPENAI_API_KEY``), metrics ``gpt_acc``
  (the paper's columns), ``gpt_score`` and ``gpt_unparsed`` (:class:`GPTJudge`). ``openai`` asks at
  temperature 0, so that a rerun judges the same answers (nearly) alike and pruned and unpruned runs differ
  by their answers, not by the judge's sampling; ``openai_authors`` sends no temperature, as the authors'
  script does (the API's default, 1).

Data (``data_dir`` or ``$SCOPE_DATASETS_DIR``), tried in this order, the error naming every place tried:

1. ``<dir>/<task>/test.jsonl``: one JSON object per line with ``question_id``, ``question``, ``answer`` and
   ``video`` (a path relative to ``<dir>/<task>/``);
2. Video-LLaVA's ``eval/GPT_Zero_Shot_QA`` folder as it is: ``<dir>/<Folder>/test_q.json`` and
   ``test_a.json`` (paired by position), videos in ``<Folder>/videos/`` (TGIF: also ``mp4/``) named
   ``<video_name>.<ext>`` (ActivityNet: ``v_<video_name>.<ext>``), Folder one of ``MSVD_Zero_Shot_QA``,
   ``MSRVTT_Zero_Shot_QA``, ``TGIF_Zero_Shot_QA``, ``Activitynet_Zero_Shot_QA``;
3. ActivityNet only: the questions of lmms-lab/ActivityNetQA (the hub, :mod:`scope.eval.sources`) with the
   videos in ``<dir>/ActivityNetQA/videos/`` or where lmms-eval unzips them (``$HF_HOME/activitynetqa/all_test``).

A row whose video file is missing is an error naming it; ``task_kwargs={"<task>": {"missing": "skip"}}``
leaves such rows out instead (what the authors' script does silently).
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scope.eval.metrics import normalize_vqa_answer
from scope.eval.sources import DATASETS_DIR_ENV, load_hub_dataset

FRAMES = 8  # frames per video, as Video-LLaVA samples them
VIDEO_MODEL_TYPES = ("video_llava",)  # model_type of the checkpoints the video tasks run on
DECODED_CACHE = 8  # videos whose decoded frames are kept (8 frames of a 720p video: about 22 MB)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
# Video-LLaVA's conversation.py, conv_llava_v1 (its video QA scripts' conv_mode): "human's", not "user's"
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SHORT_ANSWER = " Answer the question using a single word or phrase."  # lmms-eval activitynetqa post_prompt

MATCH, OPENAI, OPENAI_AUTHORS = "match", "openai", "openai_authors"
GPT_JUDGES = (OPENAI, OPENAI_AUTHORS)
JUDGES = (MATCH, *GPT_JUDGES)
DEFAULT_JUDGE = MATCH
JUDGE_MODEL = "gpt-3.5-turbo"  # Video-LLaVA's eval_video_qa.py
# the GPT judges' sampling temperature; None: not sent (the API's default, 1), as Video-LLaVA's script calls it
JUDGE_TEMPERATURE = {OPENAI: 0.0, OPENAI_AUTHORS: None}
JUDGE_ATTEMPTS = 3  # calls per answer before it is recorded unparsed (the authors retry without limit)
# the authors' judge prompt (Video-LLaVA eval_video_qa.py; lmms-eval's activitynetqa uses the same words)
JUDGE_SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and determine "
    "if they match meaningfully. Here's how you can accomplish the task:------##INSTRUCTIONS: - Focus on the "
    "meaningful match between the predicted answer and the correct answer.\n- Consider synonyms or paraphrases "
    "as valid matches.\n- Evaluate the correctness of the prediction compared to the answer."
)
JUDGE_USER = (
    "Please evaluate the following video-based question-answer pair:\n\nQuestion: {question}\nCorrect Answer: "
    "{answer}\nPredicted Answer: {prediction}\n\nProvide your evaluation only as a yes/no and score where the "
    "score is an integer value between 0 and 5, with 5 indicating the highest meaningful match. Please generate "
    "the response in the form of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' "
    "is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING.DO NOT PROVIDE ANY OTHER "
    "OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. For example, your response should "
    "look like this: {{'pred': 'yes', 'score': 4.8}}."
)


@dataclass(frozen=True)
class VideoQA:
    """Where one benchmark's questions and videos are found, and its column in the paper's Table 3."""

    name: str
    folder: str  # Video-LLaVA's GPT_Zero_Shot_QA sub-folder
    paper_column: str
    video_dirs: tuple[str, ...] = ("videos",)
    prefix: str = ""  # ActivityNet's files are v_<video_name>
    hub: tuple[str, str, str] | None = None  # (path, config, split) of lmms-lab's questions


SPECS = {
    s.name: s
    for s in (
        VideoQA("msvd_qa", "MSVD_Zero_Shot_QA", "MSVD"),
        VideoQA("msrvtt_qa", "MSRVTT_Zero_Shot_QA", "MSRVTT"),
        VideoQA("tgif_qa", "TGIF_Zero_Shot_QA", "TGIF", video_dirs=("videos", "mp4")),
        VideoQA(
            "activitynetqa",
            "Activitynet_Zero_Shot_QA",
            "ActivityNet",
            prefix="v_",
            hub=("lmms-lab/ActivityNetQA", "Generation", "test"),
        ),
    )
}
ALIASES = {"msvd": "msvd_qa", "msrvtt": "msrvtt_qa", "tgif": "tgif_qa", "activitynet_qa": "activitynetqa"}
ALIASES["activitynet"] = "activitynetqa"


# ----------------------------------------------------------------------------------------------------------
# frames


def frame_indices(n_total: int, n_frames: int = FRAMES) -> list[int]:
    """The frames Video-LLaVA reads of a video with ``n_total`` frames: ``n_frames`` evenly spaced from the
    first to the last, rounded down (``np.linspace(0, n_total - 1, n_frames, dtype=int)``, in integer
    arithmetic). A video shorter than ``n_frames`` repeats frames."""
    for name, v in (("n_total", n_total), ("n_frames", n_frames)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
    if n_frames == 1:
        return [0]
    return [i * (n_total - 1) // (n_frames - 1) for i in range(n_frames)]


def _av():
    try:
        import av
    except ImportError as err:
        raise ImportError(
            "decoding videos needs PyAV: pip install 'scope-pruning[video]' (or pip install av)"
        ) from err
    return av


def decode_frames(path: str | Path, n_frames: int = FRAMES) -> list:
    """``n_frames`` RGB PIL frames of the video at ``path`` (:func:`frame_indices` of its frame count), decoded
    with PyAV. The frame count is the container's when it states one, else the packets counted; a count
    that overstates what decodes is corrected by a second pass over the frames actually there.

    The last few videos' frames are kept (:data:`DECODED_CACHE` videos, keyed by path, size and modification
    time): a video's questions are consecutive in the benchmarks' files, so a run decodes each video once,
    not once per question."""
    _av()  # without PyAV, say how to install it before anything else
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video file {path}")
    stat = path.stat()
    return list(_decoded(str(path.resolve()), stat.st_size, stat.st_mtime_ns, n_frames))


@functools.lru_cache(maxsize=DECODED_CACHE)
def _decoded(path: str, size: int, mtime_ns: int, n_frames: int) -> tuple:
    """:func:`decode_frames` of one version of one file (``size`` and ``mtime_ns`` name the version)."""
    av = _av()
    with av.open(path) as container:
        stream = container.streams.video[0]
        total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
    frames, seen = _decode_at(av, path, frame_indices(max(total, 1), n_frames))
    if len(frames) < n_frames:  # fewer frames decoded than the container said: sample the real count
        frames, _ = _decode_at(av, path, frame_indices(seen, n_frames)) if seen else ([], 0)
    if len(frames) < n_frames:
        raise ValueError(f"could not decode {n_frames} frames of {path} (it has {seen})")
    return tuple(frames)


def _decode_at(av, path: str, wanted: Sequence[int]) -> tuple[list, int]:
    """(the frames at the indices ``wanted``, repeats kept, in order; frames decoded), decoding sequentially
    and stopping after the last index wanted."""
    out, last, seen = [], max(wanted), 0
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            seen = i + 1
            if i in wanted:
                out += [frame.to_image().convert("RGB")] * wanted.count(i)
            if i >= last:
                break
    return out, seen


def video_frames(doc: dict) -> list:
    """A row's :data:`FRAMES` frames: of ``doc["frames"]`` (already decoded) or of the file ``doc["video"]``,
    both by :func:`frame_indices`."""
    if doc.get("frames") is not None:
        frames = list(doc["frames"])
        return [frames[i].convert("RGB") for i in frame_indices(len(frames))]
    if doc.get("video") is None:
        raise ValueError(f"video QA row {doc.get('question_id')!r} has neither 'frames' nor 'video'")
    return decode_frames(doc["video"])


def is_video_path(visual: Any) -> bool:
    """Whether ``visual`` names a video file (a path ending in one of :data:`VIDEO_EXTENSIONS`)."""
    return isinstance(visual, (str, Path)) and str(visual).lower().endswith(VIDEO_EXTENSIONS)


def supports_video(model: Any) -> bool:
    """Whether ``model`` takes videos the way these tasks give them (Video-LLaVA: :data:`VIDEO_MODEL_TYPES`)."""
    return getattr(getattr(model, "config", None), "model_type", None) in VIDEO_MODEL_TYPES


# ----------------------------------------------------------------------------------------------------------
# prompts


def short_question(doc: dict) -> str:
    """lmms-eval's activitynetqa question: the question, a "?" if it lacks one, the short-answer line."""
    q = str(doc["question"]).strip()
    return (q if q.endswith("?") else q + "?") + SHORT_ANSWER


def authors_question(doc: dict) -> str:
    """The question as Video-LLaVA's script sends it: as written in the question file."""
    return str(doc["question"])


def video_prompt(processor: Any, question: str, protocol: Any) -> str:
    """The prompt for one video question: under ``paper`` (``protocol.authors``) Video-LLaVA's ``llava_v1``
    conversation, ``"<system> USER: <video>\\n<question> ASSISTANT:"``; otherwise the processor's chat
    template with one video before the question, or without one ``"USER: <video>\\n<question> ASSISTANT:"``
    (the llava-hf model card)."""
    token = getattr(processor, "video_token", "<video>")
    if getattr(protocol, "authors", False) or protocol == "paper":
        return f"{LLAVA_V1_SYSTEM} USER: {token}\n{question} ASSISTANT:"
    if getattr(processor, "chat_template", None):
        content = [{"type": "video"}, {"type": "text", "text": question}]
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
    return f"USER: {token}\n{question} ASSISTANT:"


def video_inputs(processor: Any, task: Any, doc: dict, protocol: Any, header: str) -> str:
    """What the model receives for one video question (``python -m scope.eval --show-prompts``), from the
    processor alone: the prompt JSON-quoted, the frames' sizes, the pixel tensor and the video tokens."""
    if getattr(processor, "video_processor", None) is None:
        raise ValueError(
            f"task {task.name!r} is video QA and processor {type(processor).__name__} takes no videos; the "
            "video tasks run on Video-LLaVA (e.g. --model LanguageBind/Video-LLaVA-7B-hf, or tiny-video-llava)"
        )
    frames = task.images(doc)
    text = video_prompt(processor, task.prompt(doc), protocol)
    inputs = processor(text=[text], videos=[frames], return_tensors="pt")
    token = getattr(processor, "video_token", "<video>")
    n_tokens = int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids(token)).sum())
    sizes = sorted({f"{f.size[0]}x{f.size[1]}" for f in frames})
    return "\n".join(
        [
            f"{header} qid={task.qid(doc)}",
            f"  text: {json.dumps(text, ensure_ascii=False)}",
            f"  video: {len(frames)} frames of {', '.join(sizes)} -> pixels "
            + "x".join(str(s) for s in inputs["pixel_values_videos"].shape[1:]),
            f"  video tokens in the prompt: {n_tokens}",
        ]
    )


# ----------------------------------------------------------------------------------------------------------
# judges


def check_judge(judge: str) -> str:
    """``judge`` if it is one of :data:`JUDGES`, else a ValueError naming it."""
    if judge not in JUDGES:
        raise ValueError(f"judge={judge!r} is unknown; choose from {list(JUDGES)}")
    return judge


def match_correct(prediction: str, answer: str) -> bool:
    """The offline judge: the answer's words occur, in order and next to each other, among the prediction's
    words, both normalised as VQA answers (:func:`scope.eval.metrics.normalize_vqa_answer`: lower case,
    punctuation and articles dropped, number words as digits). "man" is not matched inside "woman", and a
    paraphrase ("dancing" for "dance") is not matched at all: the GPT judge would accept it."""
    gold, pred = normalize_vqa_answer(answer).split(), normalize_vqa_answer(prediction).split()
    if not gold:
        return False
    return any(pred[i : i + len(gold)] == gold for i in range(len(pred) - len(gold) + 1))


def match_score(doc: dict, prediction: str) -> dict:
    ok = match_correct(prediction, str(doc["answer"]))
    return {"score": float(ok), "judge": MATCH}


def judge_messages(question: str, answer: str, prediction: str) -> list[dict[str, str]]:
    """The chat messages of the authors' GPT judge for one question."""
    user = JUDGE_USER.format(question=question, answer=answer, prediction=prediction)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_judgement(reply: str) -> tuple[str | None, float | None]:
    """(verdict, score) of a judge's reply, a Python dict string such as ``{'pred': 'yes', 'score': 4}``.

    The verdict is "yes" when ``pred`` contains "yes", else "no" when it contains "no" (Video-LLaVA's rule),
    else None, as it is for a reply that is not a dict: no verdict, which :class:`GPTJudge` asks again for. The
    score is ``score`` as a float, or None when it is missing or not a finite number; a verdict is kept
    whatever its score (``{'pred': 'yes', 'score': 'high'}`` is ("yes", None))."""
    try:
        parsed = ast.literal_eval(reply.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None, None
    if not isinstance(parsed, dict):
        return None, None
    pred = str(parsed.get("pred", "")).lower()
    verdict = "yes" if "yes" in pred else "no" if "no" in pred else None
    try:
        score = float(parsed.get("score"))
    except (TypeError, ValueError):
        score = None
    return verdict, score if score is not None and math.isfinite(score) else None


@functools.lru_cache(maxsize=1)
def openai_client() -> Any:
    """One ``openai.OpenAI()`` client per process (it reads ``OPENAI_API_KEY``); an ImportError says how to
    install the package."""
    try:
        import openai
    except ImportError as err:
        raise ImportError("judge='openai' needs the openai package: pip install openai") from err
    return openai.OpenAI()


@dataclass(frozen=True)
class GPTJudge:
    """The authors' GPT judge on one answer (``judge(doc, prediction)`` -> the record's judge fields).

    Each answer is asked up to ``attempts`` times: again at once while the reply gives no verdict
    (:func:`parse_judgement`), after ``backoff_s`` x 1, 2, 4... seconds when the call fails (network, rate
    limit, server). A call that still fails raises (the batch fails; a resumed run asks again); a reply
    that still gives no verdict is recorded with ``gpt_pred`` None, left out of ``gpt_acc`` and counted in
    ``gpt_unparsed``. ``temperature`` None sends none (the API's default), as the authors' script does."""

    name: str = OPENAI
    temperature: float | None = JUDGE_TEMPERATURE[OPENAI]
    model: str = JUDGE_MODEL
    attempts: int = JUDGE_ATTEMPTS
    backoff_s: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"attempts={self.attempts!r} must be a positive int")

    def __call__(self, doc: dict, prediction: str) -> dict:
        messages = judge_messages(str(doc["question"]), str(doc["answer"]), prediction)
        options = {} if self.temperature is None else {"temperature": self.temperature}
        text, verdict, score, attempt = "", None, None, 0
        while verdict is None and attempt < self.attempts:
            attempt += 1
            try:
                reply = openai_client().chat.completions.create(
                    model=self.model, messages=messages, **options
                )
            except Exception as err:  # any failure of the call (network, rate limit, server): retried
                if attempt == self.attempts:
                    raise RuntimeError(
                        f"the GPT judge failed {attempt} times on question {doc.get('question_id')!r}: {err}"
                    ) from err
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
                continue
            text = reply.choices[0].message.content or ""
            verdict, score = parse_judgement(text)
        return {
            "score": None if verdict is None else float(verdict == "yes"),
            "judge": self.name,
            "judge_model": self.model,
            "judge_temperature": self.temperature,
            "judge_reply": text,
            "judge_attempts": attempt,
            "gpt_pred": verdict,
            "gpt_score": score,
        }


def aggregate(records: list[dict]) -> dict[str, float]:
    """``match_acc`` (% matched) of records scored by the match judge; of the GPT-judged, as Video-LLaVA's
    script counts them: ``gpt_acc`` = 100 yes / (yes + no), ``gpt_score`` = mean score, each truncated to an
    int, and ``gpt_unparsed``, the records without a verdict (left out of ``gpt_acc``; those without a
    score are left out of ``gpt_score``)."""
    out: dict[str, float] = {}
    matched = [r for r in records if r.get("judge", MATCH) == MATCH]
    judged = [r for r in records if r.get("judge") in GPT_JUDGES]
    if matched:
        out["match_acc"] = 100.0 * sum(r["score"] for r in matched) / len(matched)
    if judged:
        verdicts = [r.get("gpt_pred") for r in judged]
        yes, no = verdicts.count("yes"), verdicts.count("no")
        scores = [int(r["gpt_score"]) for r in judged if r.get("gpt_score") is not None]
        if yes + no:
            out["gpt_acc"] = 100.0 * yes / (yes + no)
        if scores:
            out["gpt_score"] = sum(scores) / len(scores)
        out["gpt_unparsed"] = len(judged) - yes - no
    return out


def records_judge(records: Sequence[dict]) -> str | None:
    """The judge that scored ``records`` (their ``judge`` field), or None when they name none (rule-scored
    tasks; video runs logged before judges were recorded, which count as :data:`DEFAULT_JUDGE`). Records
    naming several judges are a ValueError naming them."""
    judges = {r.get("judge") for r in records} - {None}
    if len(judges) > 1:
        raise ValueError(f"the records were scored by several judges: {sorted(judges)}")
    return next(iter(judges), None)


def judge_fields(judge: str) -> dict[str, Any]:
    """The Task fields ``judge`` sets: the per-answer scorer and the headline metric."""
    if check_judge(judge) in GPT_JUDGES:
        return {"score": GPTJudge(judge, JUDGE_TEMPERATURE[judge]), "main": "gpt_acc"}
    return {"score": match_score, "main": "match_acc"}


# ----------------------------------------------------------------------------------------------------------
# loading


def _root(data_dir: str | None) -> Path | None:
    root = data_dir or os.environ.get(DATASETS_DIR_ENV)
    return Path(root).expanduser() if root else None


def _from_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            missing = [k for k in ("question", "answer", "video") if k not in row]
            if missing:
                raise ValueError(f"{path}:{n} lacks {missing}")
            video = path.parent / row["video"]
            rows.append({**row, "question_id": str(row.get("question_id", n - 1)), "video": str(video)})
    return rows


def _from_video_llava(folder: Path, spec: VideoQA) -> list[dict]:
    """Rows of Video-LLaVA's test_q.json / test_a.json (paired by position, as its script pairs them)."""
    questions = json.loads((folder / "test_q.json").read_text())
    answers = json.loads((folder / "test_a.json").read_text())
    if len(questions) != len(answers):
        raise ValueError(
            f"{folder}: {len(questions)} questions in test_q.json, {len(answers)} answers in test_a.json"
        )
    dirs = [folder / d for d in spec.video_dirs]
    return [_row(q, a, dirs, spec.prefix) for q, a in zip(questions, answers)]


def _row(q: dict, a: dict, dirs: Sequence[Path], prefix: str) -> dict:
    """One row from a question record ``q`` and its answer record ``a`` (Video-ChatGPT's files keep the
    question type with the answer, in test_a.json; the hub's rows hold both)."""
    name = str(q["video_name"])
    found = [d / f"{prefix}{name}{ext}" for d in dirs for ext in VIDEO_EXTENSIONS]
    video = next((p for p in found if p.exists()), None)
    row = {"question_id": str(q["question_id"]), "question": q["question"], "answer": str(a["answer"])}
    return {**row, "video_name": name, "video": None if video is None else str(video), "type": a.get("type")}


def _from_hub(spec: VideoQA, root: Path | None, data_dir: str | None) -> list[dict]:
    ds = load_hub_dataset(*spec.hub, data_dir)
    dirs = [root / spec.hub[0].split("/")[-1] / "videos"] if root else []
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "activitynetqa" / "all_test")
    return [_row(dict(q), dict(q), dirs, spec.prefix) for q in ds]


def load_video_qa(
    name: str, limit: int | None = None, seed: int = 0, data_dir: str | None = None, missing: str = "error"
) -> list[dict]:
    """The rows of video benchmark ``name`` (first ``limit``), each with ``question_id``, ``question``,
    ``answer`` and ``video`` (an absolute path), from the first source of the module docstring that exists.

    ``missing``: "error" (a row whose video file is missing raises, naming it) or "skip" (such rows are left
    out, with a warning counting them). ``seed`` is unused (the rows keep their order)."""
    if missing not in ("error", "skip"):
        raise ValueError(f"missing={missing!r} must be 'error' or 'skip'")
    spec, root = SPECS[name], _root(data_dir)
    tried: list[str] = []
    rows = None
    if root is not None:
        for path, read in (
            (root / name / "test.jsonl", _from_jsonl),
            (root / spec.folder, lambda p: _from_video_llava(p, spec)),
        ):
            if path.exists():
                rows = read(path)
                break
            tried.append(f"  {path}: not found")
    if rows is None and spec.hub is not None:
        try:
            rows = _from_hub(spec, root, data_dir)
        except RuntimeError as err:
            tried.append("  " + str(err).replace("\n", "\n  "))
    if rows is None:
        where = "no data_dir / $" + DATASETS_DIR_ENV + " given" if root is None else "\n".join(tried)
        raise FileNotFoundError(
            f"no copy of the video benchmark {name!r} was found ({where}). Lay it out as the "
            "scope.eval.video_tasks docstring says (or point --datasets-dir at Video-LLaVA's "
            "eval/GPT_Zero_Shot_QA folder)."
        )
    return _with_videos(name, rows, missing)[:limit]


def _with_videos(name: str, rows: list[dict], missing: str) -> list[dict]:
    absent = [r for r in rows if r["video"] is None or not Path(r["video"]).is_file()]
    if absent and missing == "error":
        first = ", ".join(repr(r.get("video") or r.get("video_name")) for r in absent[:3])
        raise FileNotFoundError(
            f"{name}: {len(absent)} of {len(rows)} rows have no video file (e.g. {first}); add the videos or pass "
            f"task_kwargs={{{name!r}: {{'missing': 'skip'}}}} to leave those rows out"
        )
    if absent:
        warnings.warn(
            f"{name}: left out {len(absent)} of {len(rows)} rows without a video file", stacklevel=3
        )
    gone = {id(r) for r in absent}
    return [r for r in rows if id(r) not in gone]


def task_fields() -> list[dict[str, Any]]:
    """The keyword arguments of the four video :class:`~scope.eval.tasks.Task` records (match judge)."""
    return [
        dict(
            name=s.name,
            hf_path=s.hub[0] if s.hub else None,
            hf_name=s.hub[1] if s.hub else None,
            split="test",
            prompt=short_question,
            images=video_frames,
            target=lambda d: str(d["answer"]),
            score=match_score,
            aggregate=aggregate,
            qid=lambda d: str(d["question_id"]),
            main="gpt_acc",  # the paper's metric names the column; `judged` sets the run's own
            max_new_tokens=64,  # lmms-eval activitynetqa
            paper_column=s.paper_column,
            loader=functools.partial(load_video_qa, s.name),
            authors={"prompt": authors_question, "max_new_tokens": 1024},  # Video-LLaVA's script
            video=True,
            judges=judge_fields,
        )
        for s in SPECS.values()
    ]
