"""The benchmarks: how to load each one, what to ask, and how to score and aggregate the answers.

A :class:`Task` turns a dataset row ("doc", in lmms-eval's word) into a question text and its images, scores a
prediction into a per-sample record, and aggregates records into metrics. Aggregation only reads the
records the runner logs, so a result directory can always be re-scored (and bootstrapped) from its JSONL.

Real benchmarks come from the lmms-lab datasets on the Hugging Face hub, in the same schemas, splits and
prompts as lmms-eval's tasks of the same name. lmms-eval moved them from ``lmms-lab/<name>`` to
``lmms-lab-encoder/<name>``: both are tried, in that order, after any local copy under ``data_dir`` (or
``$SCOPE_DATASETS_DIR``; :mod:`scope.eval.sources`). Nothing is downloaded unless such a task is requested; when
no source loads, the error names every one tried. Tests pass small in-memory datasets in those schemas.

``Task.authors`` holds what the SCOPE authors' copy of lmms-eval sets differently (TextVQA's OCR tokens, the
first frame of SEED's video questions, the YAMLs' max new tokens); :meth:`Task.under` applies it for a
protocol that asks for it (``paper``, :mod:`scope.protocol`).

Where the scoring differs from lmms-eval (all documented in the functions of :mod:`scope.eval.metrics`):
- POPE / SynthBench existence: answers are parsed to yes / no (first word, else LLaVA's "no"/"not" rule);
  lmms-eval compares the lower-cased answer with "yes" exactly. Identical for one-word answers.
- MMBench: rule-based option matching only (a letter, else a unique option text); lmms-eval's dev metric
  asks GPT when the rules fail, here such answers count as wrong. CircularEval grouping as lmms-eval.
- MMMU: an unparseable multiple-choice answer gets MMMU's random letter, seeded by the question id.
- ``limit`` keeps the first N rows, as lmms-eval's ``--limit``: POPE's first rows are all "adversarial", and
  MME scores over cut pairs are not comparable with full-set scores.
- Video QA (MSVD, MSRVTT, TGIF, ActivityNet; Video-LLaVA): loading, frames, prompts and the named judge
  live in :mod:`scope.eval.video_tasks`; the default judge is an offline word match, not the paper's GPT.
- SEED-Bench: every question, as lmms-eval's ``seedbench``: ``seed_all`` (the paper's "SEED", e.g. 58.6 for
  LLaVA-1.5-7B), ``seed_image`` ("SEED-I") and ``seed_video``. Video questions carry frames: all of them under
  ``hf`` (lmms-eval's doc_to_visual), the first one under ``paper`` (the authors' lmms-eval llava model).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import scope.eval.metrics as M
from scope.eval import video_tasks
from scope.eval.sources import load_hub_dataset
from scope.eval.video_tasks import DEFAULT_JUDGE

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Task:
    """One benchmark.

    ``score(doc, prediction)`` returns a record fragment with at least ``score`` (per-sample correctness in
    [0, 1]) and whatever ``aggregate`` needs (categories, parsed labels, pair ids). ``unit`` names the record
    field that groups samples which must be resampled together in a bootstrap (MME pairs, MMBench circular
    copies); by default every sample is its own unit.
    """

    name: str
    hf_path: str | None
    hf_name: str | None
    split: str
    prompt: Callable[[dict], str]
    images: Callable[[dict], list]
    target: Callable[[dict], str]
    score: Callable[[dict, str], dict]
    aggregate: Callable[[list[dict]], dict[str, float]]
    qid: Callable[[dict], str]
    main: str = "accuracy"
    max_new_tokens: int = 16
    paper_column: str | None = None
    unit: str = "idx"
    loader: Callable[..., Any] | None = field(default=None, repr=False)
    # fields of this record that the authors' lmms-eval sets differently (applied by `under`)
    authors: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)
    # paper headers of metrics other than `main` (SEED-I for seed_image)
    metric_columns: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    video: bool = False  # images(doc) are one video's frames, given to the processor as videos=
    # the fields a judge sets (video QA: scorer and main metric; scope.eval.video_tasks), applied by `judged`
    judges: Callable[[str], dict[str, Any]] | None = field(
        default=None, repr=False, compare=False, hash=False
    )

    def load(
        self, limit: int | None = None, seed: int = 0, data_dir: str | None = None, **kwargs: Any
    ) -> Sequence[dict]:
        """The evaluation docs (first ``limit`` of them), from a local copy under ``data_dir``, the hub or a
        custom loader (:func:`load_hub_dataset`)."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit={limit!r} must be a positive int or None")
        if self.loader is not None:
            return self.loader(limit=limit, seed=seed, data_dir=data_dir, **kwargs)
        ds = load_hub_dataset(self.hf_path, self.hf_name, self.split, data_dir)
        return prepare(self, ds, limit, data_dir)

    def under(self, protocol: Any) -> Task:
        """This task as ``protocol`` runs it: with :attr:`authors` applied when the protocol asks for the
        authors' settings (``protocol.authors``, :mod:`scope.protocol`), else unchanged."""
        return replace(self, **self.authors) if getattr(protocol, "authors", False) and self.authors else self

    def judged(self, judge: str | None) -> Task:
        """This task scored by ``judge`` (video QA: one of :mod:`scope.eval.video_tasks`'s JUDGES; None:
        the default, "match"); tasks scored by rules alone come back unchanged."""
        return replace(self, **self.judges(judge or DEFAULT_JUDGE)) if self.judges is not None else self


def prepare(task: Task, ds, limit: int | None, data_dir: str | None = None):
    """The first ``limit`` rows, then GQA's image join (its images live in a separate config)."""
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if task.name == "gqa" and "image" not in ds.column_names:
        images = load_hub_dataset("lmms-lab/GQA", "testdev_balanced_images", "testdev", data_dir)
        ds = GQAJoined(ds, images)
    return ds


class GQAJoined(Sequence):
    """GQA questions with their images looked up by ``imageId`` in the separate images config (lazily:
    joining 12,578 rows eagerly would decode every image)."""

    def __init__(self, questions, images):
        self.questions, self.images = questions, images
        self._row = {iid: i for i, iid in enumerate(images["id"])}

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i):
        doc = dict(self.questions[i])
        doc["image"] = self.images[self._row[doc["imageId"]]]["image"]
        return doc


def _rgb(img) -> Any:
    return img.convert("RGB")


def _mean_pct(records: list[dict]) -> float:
    return 100.0 * sum(r["score"] for r in records) / len(records) if records else float("nan")


# ----------------------------------------------------------------------------------------------------------
# SynthBench (the embedded benchmark)


def _synth_score(doc: dict, pred: str) -> dict:
    fam = doc["family"]
    if fam == "existence":
        label = M.parse_yes_no(pred)
        return {
            "score": float(label == doc["answer"].strip().lower()),
            "label": label,
            "family": fam,
            "subset": doc["subset"],
        }
    if fam == "choice":
        letter = M.parse_option_letter(pred.strip(), "ABCD") or pred.strip()[:1].upper()
        return {
            "score": float(letter == doc["answer"].strip().upper()),
            "family": fam,
            "subset": doc["subset"],
        }
    return {"score": M.normalized_exact_match(pred, doc["answer"]), "family": fam, "subset": doc["subset"]}


def _synth_aggregate(records: list[dict]) -> dict[str, float]:
    out = {"accuracy": _mean_pct(records)}
    by_fam = defaultdict(list)
    for r in records:
        by_fam[r["family"]].append(r)
    for fam, rs in sorted(by_fam.items()):
        out[f"{fam}/accuracy"] = _mean_pct(rs)
        if fam != "existence":  # e.g. reading/large, reading/small: text size (existence: POPE, below)
            for sub in sorted({r["subset"] for r in rs if r["subset"]}):
                out[f"{fam}/{sub}/accuracy"] = _mean_pct([r for r in rs if r["subset"] == sub])
    ex = by_fam.get("existence", [])
    if ex:
        for k, v in M.binary_metrics([r["label"] for r in ex], [r["answer"].lower() for r in ex]).items():
            out[f"existence/{k}"] = v
        by_sub = defaultdict(list)
        for r in ex:
            by_sub[r["subset"]].append(r)
        for sub, rs in sorted(by_sub.items()):
            m = M.binary_metrics([r["label"] for r in rs], [r["answer"].lower() for r in rs])
            out[f"existence/{sub}/f1"], out[f"existence/{sub}/accuracy"] = m["f1"], m["accuracy"]
    return out


def _synth_loader(limit=None, seed=0, split="test", data_dir=None, **kw):  # rendered: no data_dir
    from scope.mini.synthbench import load_synthbench

    return load_synthbench(split=split, limit=limit, seed=seed, **kw)


# ----------------------------------------------------------------------------------------------------------
# POPE: F1 pooled over the three negative-sampling splits (lmms-eval "pope"), and per split.


def _pope_score(doc: dict, pred: str) -> dict:
    label = M.parse_yes_no(pred)
    return {
        "score": float(label == doc["answer"].strip().lower()),
        "label": label,
        "category": doc.get("category", ""),
    }


def _pope_aggregate(records: list[dict]) -> dict[str, float]:
    out = M.binary_metrics([r["label"] for r in records], [r["answer"].strip().lower() for r in records])
    by = defaultdict(list)
    for r in records:
        by[r["category"]].append(r)
    for cat, rs in sorted(by.items()):
        if cat:
            for k, v in M.binary_metrics(
                [r["label"] for r in rs], [r["answer"].strip().lower() for r in rs]
            ).items():
                out[f"{cat}/{k}"] = v
    return out


# ----------------------------------------------------------------------------------------------------------
# MME


def _mme_prompt(doc: dict) -> str:
    # lmms-eval drops MME's own " Please answer yes or no." and appends its short-answer instruction.
    return doc["question"].strip().replace(" Please answer yes or no.", "") + SHORT_ANSWER


def _mme_score(doc: dict, pred: str) -> dict:
    label = M.parse_mme_answer(pred)
    gold = doc["answer"].lower().strip().replace(".", "")
    return {
        "score": float(label == gold),
        "label": label,
        "category": doc["category"],
        "pair": doc["question_id"],
    }


def _mme_aggregate(records: list[dict]) -> dict[str, float]:
    s = M.mme_scores((r["category"], r["pair"], r["score"]) for r in records)
    out = {"total": s.pop("total"), "perception": s.pop("perception"), "cognition": s.pop("cognition")}
    out.update({f"category/{k}": v for k, v in sorted(s.items())})
    return out


# ----------------------------------------------------------------------------------------------------------
# MMBench (en dev): rule-based option matching, CircularEval over copies whose index differs by 1e6.


def _present(v) -> bool:
    return v is not None and str(v) != "nan" and str(v).strip() != ""


def _mmb_options(doc: dict) -> dict[str, str]:
    return {c: str(doc[c]) for c in "ABCDE" if c in doc and _present(doc[c])}


def _mmb_prompt(doc: dict) -> str:
    opts = "There are several options:\n" + "\n".join(f"{k}. {v}" for k, v in _mmb_options(doc).items())
    hint = doc.get("hint")
    q = f"{hint} {doc['question']} {opts}" if _present(hint) else f"{doc['question']} {opts}"
    return q + "\n" + OPTION_LETTER  # lmms-eval joins with a newline and its instruction starts with one


def _mmb_score(doc: dict, pred: str) -> dict:
    options = _mmb_options(doc)
    parsed = M.match_option(pred.strip(), options, letters="".join(options) or "ABCDE")
    return {
        "score": float(parsed == doc["answer"]),
        "parsed": parsed,
        "category": doc.get("category", ""),
        "group": int(doc["index"]) % 1_000_000,
    }


def _mmb_aggregate(records: list[dict]) -> dict[str, float]:
    # CircularEval: a question counts only if every circular copy of it is answered right.
    groups: dict[int, list[float]] = defaultdict(list)
    cats: dict[int, str] = {}
    for r in records:
        groups[r["group"]].append(r["score"])
        cats.setdefault(r["group"], r["category"])
    hit = {g: float(all(s == 1.0 for s in ss)) for g, ss in groups.items()}
    out = {"accuracy": 100.0 * sum(hit.values()) / len(hit) if hit else float("nan")}
    by_cat = defaultdict(list)
    for g, h in hit.items():
        by_cat[cats[g]].append(h)
    out.update({f"category/{c}": 100.0 * sum(h) / len(h) for c, h in sorted(by_cat.items()) if c})
    return out


# ----------------------------------------------------------------------------------------------------------
# ScienceQA-IMG


def _sqa_letter(doc: dict) -> str:
    return chr(ord("A") + int(doc["answer"]))


def _sqa_prompt(doc: dict) -> str:
    choices = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(doc["choices"]))
    context = f"Context: {doc['hint']}\n" if doc.get("hint") else ""
    return f"{context}{doc['question']}\n{choices}{OPTION_LETTER}"


# ----------------------------------------------------------------------------------------------------------
# TextVQA


def _textvqa_prompt(doc: dict) -> str:
    return doc["question"].capitalize() + SHORT_ANSWER


def _textvqa_ocr_prompt(doc: dict) -> str:
    # lmms-eval's textvqa_doc_to_text with ocr=True (the authors' template): the OCR line between the
    # question and the instruction
    ocr = f"\nReference OCR token: {', '.join(doc['ocr_tokens'])}"
    return doc["question"].capitalize() + ocr + SHORT_ANSWER


# ----------------------------------------------------------------------------------------------------------
# SEED-Bench (image and video questions)


def _seed_prompt(doc: dict) -> str:
    opts = "".join(f"\n{c}. {doc['choice_' + c.lower()]}" for c in "ABCD")
    return f"{doc['question']}{opts}{OPTION_LETTER}"


def _seed_images(doc: dict) -> list:
    imgs = doc["image"]
    return [_rgb(i) for i in (imgs if isinstance(imgs, list) else [imgs])]


def _seed_first_frame(doc: dict) -> list:
    # the authors' lmms-eval llava model answers a video question from its first frame alone
    imgs = _seed_images(doc)
    return imgs[:1] if doc.get("data_type") == "video" else imgs


def _seed_score(doc: dict, pred: str) -> dict:
    return {"score": M.seed_correct(pred, doc["answer"]), "data_type": doc.get("data_type", "image")}


def _seed_aggregate(records: list[dict]) -> dict[str, float]:
    # lmms-eval's seed_all / seed_image / seed_video (records logged before data_type was kept: image)
    out = {"seed_all": _mean_pct(records)}
    for kind in ("image", "video"):
        part = [r for r in records if r.get("data_type", "image") == kind]
        if part:
            out[f"seed_{kind}"] = _mean_pct(part)
    return out


# ----------------------------------------------------------------------------------------------------------
# MMMU (validation)

_MMMU_IMAGE_TAG = re.compile(r"<image (\d+)>")


def _mmmu_options(doc: dict) -> list[str]:
    opts = doc["options"]
    return list(ast.literal_eval(opts)) if isinstance(opts, str) else list(opts)


def _mmmu_prompt(doc: dict) -> str:
    if doc["question_type"] == "multiple-choice":
        opts = "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(_mmmu_options(doc)))
        return (
            f"{doc['question']}\n{opts}\n\nAnswer with the option's letter from the given choices directly."
        )
    return f"{doc['question']}\n\nAnswer the question using a single word or phrase."


def _mmmu_images(doc: dict) -> list:
    # the images the question (or its options) refers to, in tag order, as lmms-eval
    text = doc["question"] + " " + str(doc.get("options", ""))
    tags = sorted({int(n) for n in _MMMU_IMAGE_TAG.findall(text)})
    return [_rgb(doc[f"image_{n}"]) for n in tags if doc.get(f"image_{n}") is not None]


def _mmmu_subject(qid: str) -> str:
    m = re.match(r"^[^_]+_(.+?)_\d+$", qid)
    return m.group(1) if m else ""


def _mmmu_score(doc: dict, pred: str) -> dict:
    if doc["question_type"] == "multiple-choice":
        parsed = M.parse_mmmu_choice(pred, _mmmu_options(doc), seed_key=str(doc["id"]))
        answer = doc["answer"]
        ok = parsed in answer if isinstance(answer, list) else parsed == answer
        return {"score": float(ok), "parsed": parsed, "subject": _mmmu_subject(str(doc["id"]))}
    answer = doc["answer"]
    try:  # open answers are sometimes stored as the repr of a list
        answer = ast.literal_eval(answer) if isinstance(answer, str) and answer.startswith("[") else answer
    except (ValueError, SyntaxError):
        pass
    cands = M.parse_mmmu_open(pred)
    return {
        "score": M.mmmu_open_correct(cands, answer),
        "parsed": str(cands[:3]),
        "subject": _mmmu_subject(str(doc["id"])),
    }


def _mmmu_aggregate(records: list[dict]) -> dict[str, float]:
    # instance-level accuracy (MMMU's "Overall"), plus per subject
    out = {"accuracy": _mean_pct(records)}
    by = defaultdict(list)
    for r in records:
        by[r["subject"]].append(r)
    out.update({f"subject/{s}": _mean_pct(rs) for s, rs in sorted(by.items()) if s})
    return out


# ----------------------------------------------------------------------------------------------------------
# Registry


def _first_image(doc: dict) -> list:
    return [_rgb(doc["image"])] if doc.get("image") is not None else []


def _acc_aggregate(records: list[dict]) -> dict[str, float]:
    return {"accuracy": _mean_pct(records)}


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            name="synthbench",
            hf_path=None,
            hf_name=None,
            split="test",
            prompt=lambda d: d["question"],
            images=_first_image,
            target=lambda d: d["answer"],
            score=_synth_score,
            aggregate=_synth_aggregate,
            qid=lambda d: str(d["question_id"]),
            loader=_synth_loader,
        ),
        Task(
            name="gqa",
            hf_path="lmms-lab/GQA",
            hf_name="testdev_balanced_instructions",
            split="testdev",
            prompt=lambda d: d["question"] + SHORT_ANSWER,
            images=_first_image,
            target=lambda d: d["answer"],
            score=lambda d, p: {"score": M.exact_match(p, d["answer"])},
            aggregate=_acc_aggregate,
            qid=lambda d: str(d["id"]),
            paper_column="GQA",
        ),
        Task(
            name="mmbench_en_dev",
            hf_path="lmms-lab/MMBench",
            hf_name="en",
            split="dev",
            prompt=_mmb_prompt,
            images=_first_image,
            target=lambda d: d["answer"],
            score=_mmb_score,
            aggregate=_mmb_aggregate,
            qid=lambda d: str(d["index"]),
            paper_column="MMB",
            authors={"max_new_tokens": 1024},  # the authors' lmms-eval YAML
            unit="group",
        ),
        Task(
            name="mme",
            hf_path="lmms-lab/MME",
            hf_name=None,
            split="test",
            prompt=_mme_prompt,
            images=_first_image,
            target=lambda d: d["answer"],
            score=_mme_score,
            aggregate=_mme_aggregate,
            qid=lambda d: str(d["question_id"]),
            main="total",
            paper_column="MME",
            unit="pair",
        ),
        Task(
            name="pope",
            hf_path="lmms-lab/POPE",
            hf_name=None,
            split="test",
            prompt=lambda d: d["question"].strip() + SHORT_ANSWER,
            images=_first_image,
            target=lambda d: d["answer"],
            score=_pope_score,
            aggregate=_pope_aggregate,
            qid=lambda d: str(d["question_id"]),
            main="f1",
            paper_column="POPE",
            authors={"max_new_tokens": 128},  # the authors' lmms-eval YAML
        ),
        Task(
            name="scienceqa_img",
            hf_path="lmms-lab/ScienceQA",
            hf_name="ScienceQA-IMG",
            split="test",
            prompt=_sqa_prompt,
            images=_first_image,
            target=_sqa_letter,
            score=lambda d, p: {"score": M.sqa_correct(p, _sqa_letter(d))},
            aggregate=_acc_aggregate,
            qid=lambda d: str(d.get("id", "")),
            paper_column="SQA",
        ),
        Task(
            name="textvqa_val",
            hf_path="lmms-lab/textvqa",
            hf_name=None,
            split="validation",
            prompt=_textvqa_prompt,
            images=_first_image,
            target=lambda d: "|".join(d["answers"]),
            score=lambda d, p: {"score": M.vqa_accuracy(p, d["answers"])},
            aggregate=_acc_aggregate,
            qid=lambda d: str(d["question_id"]),
            paper_column="TextVQA",
            # the YAML sets no length: the llava model's default, 1024
            authors={"prompt": _textvqa_ocr_prompt, "max_new_tokens": 1024},
        ),
        Task(
            name="seedbench",
            hf_path="lmms-lab/SEED-Bench",
            hf_name=None,
            split="test",
            prompt=_seed_prompt,
            images=_seed_images,
            target=lambda d: d["answer"],
            score=_seed_score,
            aggregate=_seed_aggregate,
            qid=lambda d: str(d["question_id"]),
            main="seed_all",
            paper_column="SEED",
            metric_columns={"seed_image": "SEED-I"},
            authors={"images": _seed_first_frame, "max_new_tokens": 1024},  # as TextVQA
        ),
        Task(
            name="mmmu_val",
            hf_path="lmms-lab/MMMU",
            hf_name=None,
            split="validation",
            prompt=_mmmu_prompt,
            images=_mmmu_images,
            target=lambda d: str(d["answer"]),
            score=_mmmu_score,
            aggregate=_mmmu_aggregate,
            qid=lambda d: str(d["id"]),
            max_new_tokens=128,
            paper_column="MMMU",
        ),
    ]
}

TASKS.update({f["name"]: Task(**f) for f in video_tasks.task_fields()})  # MSVD, MSRVTT, TGIF, ActivityNet QA

# Accept the names people type as well as lmms-eval's.
ALIASES = {
    **video_tasks.ALIASES,
    "mmbench": "mmbench_en_dev",
    "mmb": "mmbench_en_dev",
    "sqa": "scienceqa_img",
    "scienceqa": "scienceqa_img",
    "textvqa": "textvqa_val",
    "seed": "seedbench",
    "mmmu": "mmmu_val",
}


def get_task(name: str) -> Task:
    """The :class:`Task` called ``name`` (lmms-eval task names, or the aliases in ``ALIASES``)."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in TASKS:
        raise ValueError(f"task={name!r} is unknown; choose from {sorted(TASKS)} (aliases {sorted(ALIASES)})")
    return TASKS[key]


def parse_tasks(tasks: str | Sequence[str]) -> list[Task]:
    """Tasks from a comma-separated string or a list of names, in order, without repeats."""
    names = [t for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if str(t).strip()]
    if not names:
        raise ValueError(f"tasks={tasks!r} names no task")
    out: list[Task] = []
    for n in names:
        t = get_task(str(n))
        if t not in out:
            out.append(t)
    return out
