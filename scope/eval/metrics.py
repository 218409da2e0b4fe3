"""Answer parsing and scoring, written to give the same numbers as lmms-eval's task code.

Every function here is pure (strings and lists in, numbers out) so that it can be checked against
hand-computed values. Scores are reported in the paper's units: percentages for accuracies and F1, and
MME's summed "score" (each category is acc + acc+, out of 200).

Sources of the rules (read, re-implemented, not copied): lmms-eval's ``tasks/{gqa,pope,mme,mmbench,
scienceqa,textvqa,seedbench,mmmu}``, the VQA evaluation's answer normalisation, and MMMU's eval_utils.
"""

from __future__ import annotations

import random
import re
import string
from collections import defaultdict
from collections.abc import Iterable, Sequence

# ----------------------------------------------------------------------------------------------------------
# Exact match (GQA): lmms-eval's ``exact_match`` with ignore_case and ignore_punctuation.

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, target: str) -> float:
    """1.0 when prediction and target agree after lower-casing and deleting ASCII punctuation."""
    return float(
        prediction.strip().lower().translate(_PUNCT_TABLE) == target.strip().lower().translate(_PUNCT_TABLE)
    )


# ----------------------------------------------------------------------------------------------------------
# VQA answer normalisation (TextVQA, and SynthBench's normalised exact match).
# The steps of the official VQA evaluation: lower-case; drop "," and "?"; split "'s"; punctuation next to a
# space (or in a text holding a digit-comma-digit group) is deleted, elsewhere it becomes a space; periods
# not followed by a digit are deleted; number words become digits; articles go; common contractions get
# their apostrophe back.

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# The VQA list of contractions written without their apostrophe; built from the base words so that the
# table stays short. Only the forms that occur in practice for short answers are listed.
_CONTRACTIONS = {
    w.replace("'", ""): w
    for w in (
        "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he'll he's "
        "how'd how'll how's i'd i'll i'm i've isn't it'd it'll let's ma'am mightn't might've mustn't must've "
        "needn't o'clock shan't she'd she'll shouldn't should've that's there's they'd they'll they're "
        "they've wasn't we'd we'll we're we've weren't what'll what're what's what've when's where'd "
        "where's where've who'd who'll who's who've why'll why're why's won't would've wouldn't y'all "
        "you'd you'll you're you've"
    ).split()
}
_VQA_PUNCT = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")


def normalize_vqa_answer(text: str) -> str:
    """Normalise a VQA answer as the VQA / EvalAI evaluation does (see the module comment)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    drop_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        # decided on the text before any replacement, as the reference does
        out = out.replace(p, "" if (drop_all or p + " " in text or " " + p in text) else " ")
    out = _PERIOD_NOT_DECIMAL.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1]: mean over the 10 leave-one-out subsets of min(1, #matches / 3).

    With all human answers equal this is 1.0 for a match; an answer given by 2 of 10 humans scores 0.6
    (8 subsets hold both copies -> 2/3, 2 subsets hold one -> 1/3).
    """
    if not answers:
        raise ValueError(f"answers must be non-empty, got {answers!r}")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


# ----------------------------------------------------------------------------------------------------------
# Yes / no answers (POPE, MME, SynthBench existence).


def parse_yes_no(text: str) -> str:
    """Map a free-form answer to "yes", "no" or "other".

    The first sentence decides: its first word if that is yes/no; otherwise "no" if it contains "no" or
    "not" (LLaVA's POPE rule: "There is no dog." -> no), "yes" if it contains "yes", else "other".
    lmms-eval's POPE compares ``pred.lower().strip() == "yes"`` exactly, which gives the same labels for the
    one-word answers llava-hf models return with the short-answer prompt ("Yes", "No").
    """
    first = text.strip().lower().split(".")[0]
    words = first.translate(_PUNCT_TABLE).split()
    if not words:
        return "other"
    if words[0] in ("yes", "no"):
        return words[0]
    if "no" in words or "not" in words:
        return "no"
    if "yes" in words:
        return "yes"
    return "other"


def parse_mme_answer(text: str) -> str:
    """MME's rule (from Otter, used by lmms-eval): exact yes/no, "y"/"n", else yes/no in the first 4 chars."""
    t = text.lower().strip().replace(".", "")
    if t in ("yes", "no"):
        return t
    if len(t) == 1:
        return {"y": "yes", "n": "no"}.get(t, "other")
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def binary_metrics(preds: Iterable[str], golds: Iterable[str]) -> dict[str, float]:
    """POPE metrics in percent: accuracy, precision, recall, F1 and the share of "yes" predictions.

    Positives are gold "yes". A prediction that is neither yes nor no counts as wrong (a false negative on a
    "yes" question). lmms-eval leaves such answers out of recall; with parseable answers both agree.
    """
    preds, golds = list(preds), list(golds)
    if len(preds) != len(golds):
        raise ValueError(f"preds and golds differ in length: {len(preds)} vs {len(golds)}")
    n = len(golds)
    if n == 0:
        return {
            "accuracy": float("nan"),
            "precision": float("nan"),
            "recall": float("nan"),
            "f1": float("nan"),
            "yes_ratio": float("nan"),
        }
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, golds))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, golds))
    pos = sum(g == "yes" for g in golds)
    correct = sum(p == g for p, g in zip(preds, golds))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / pos if pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * correct / n,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * sum(p == "yes" for p in preds) / n,
    }


# ----------------------------------------------------------------------------------------------------------
# MME: two questions per image (one "yes", one "no"); per category score = acc + acc+ (both right), 0..200.

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(items: Iterable[tuple[str, str, float]]) -> dict[str, float]:
    """MME scores from (category, image id, correct) triples.

    Returns ``total`` (perception + cognition, 1862 for LLaVA-1.5 7B in the paper), ``perception``,
    ``cognition`` and every category. Per category: acc = % of questions right, acc+ = % of images with every
    question right, score = acc + acc+. An image with a single question (a --limit cut through a pair) counts
    as a pair of one.
    """
    by_cat: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for category, image_id, correct in items:
        by_cat[category][image_id].append(float(correct))
    out: dict[str, float] = {}
    for category, images in by_cat.items():
        acc = 100.0 * sum(sum(s) for s in images.values()) / sum(len(s) for s in images.values())
        acc_plus = 100.0 * sum(all(x == 1.0 for x in s) for s in images.values()) / len(images)
        out[category] = acc + acc_plus
    unknown = set(out) - set(MME_PERCEPTION) - set(MME_COGNITION)
    if unknown:
        raise ValueError(f"unknown MME categories: {sorted(unknown)}")
    out["perception"] = sum(out.get(c, 0.0) for c in MME_PERCEPTION)
    out["cognition"] = sum(out.get(c, 0.0) for c in MME_COGNITION)
    out["total"] = out["perception"] + out["cognition"]
    return out


# ----------------------------------------------------------------------------------------------------------
# Multiple choice.


def parse_option_letter(text: str, letters: str = "ABCDE") -> str | None:
    """MMBench's rule-based option matching (its evaluator's first stage, no GPT): a letter standing alone.

    Returns the letter when exactly one of ``letters`` appears as a whitespace-separated word, or, failing
    that, exactly one appears in one wrapping such as "B.", "(B)", "B)", ":B". A lone "A" in an answer of more
    than 3 words is read as the article, not an option. Otherwise None.
    """
    words = [w.strip() for w in text.split()]
    bare = [c for c in letters if c in words]
    if len(bare) == 1 and not ("A" in words and len(words) > 3):
        return bare[0]
    wrappings = [
        ("", "."),
        ("", ","),
        ("", ":"),
        ("", ")"),
        ("", ")."),
        ("(", ")"),
        ("(", ")."),
        (":", ""),
        (":", ","),
        (":", "."),
        (":", ")"),
        (":", ")."),
    ]
    for pre, post in wrappings:
        hits = [c for c in letters if pre + c + post in words]
        if len(hits) == 1:
            return hits[0]
    return None


def match_option(text: str, options: dict[str, str], letters: str = "ABCDE") -> str | None:
    """MMBench option matching: a letter (:func:`parse_option_letter`), else the one option whose text the
    answer contains (case-insensitive). None when it stays ambiguous (scored wrong; lmms-eval would ask GPT)."""
    letter = parse_option_letter(text, letters)
    if letter is not None:
        return letter
    low = text.lower()
    hits = [k for k, v in options.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def sqa_correct(prediction: str, target_letter: str) -> float:
    """ScienceQA as lmms-eval (after LLaVA): the whole answer is the letter, or it starts with "X." ."""
    pred = prediction.strip()
    if pred.lower() == target_letter.lower():
        return 1.0
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return float(pred[0].lower() == target_letter.lower())
    return 0.0


def seed_correct(prediction: str, answer: str) -> float:
    """SEED-Bench as lmms-eval: the first character of the stripped answer is the option letter."""
    pred = prediction.strip()
    pred = pred[:1] if len(pred) > 1 else pred
    return float(pred.lower() == answer.strip().lower())


# ----------------------------------------------------------------------------------------------------------
# MMMU (its official eval_utils, which lmms-eval uses).


def parse_mmmu_choice(response: str, options: Sequence[str], seed_key: str = "") -> str:
    """The option letter MMMU's parser reads from a response.

    Looks for "(B)", then "B " (inside spaces), then "B.", then (for answers longer than 5 words) an option's
    text; the last-mentioned candidate wins. With no candidate MMMU picks a random letter: here the random
    pick is seeded by ``seed_key`` (the question id) so that runs are reproducible.
    """
    letters = [chr(ord("A") + i) for i in range(len(options))]
    resp = response
    for ch in ",.!?;:'":
        resp = resp.strip(ch)
    resp = f" {resp} "
    cands = [c for c in letters if f"({c})" in resp]
    where = [resp.rfind(f"({c})") for c in cands]
    if not cands:
        cands = [c for c in letters if f"{c} " in resp]
        where = [resp.rfind(f" {c} ") for c in cands]
    if not cands:
        cands = [c for c in letters if f"{c}." in resp]
        where = [resp.rfind(f" {c} ") for c in cands]
    if not cands and len(resp.split()) > 5:
        cands = [c for c, o in zip(letters, options) if o.lower() in resp.lower()]
        where = [resp.lower().rfind(options[letters.index(c)].lower()) for c in cands]
    if not cands:
        return random.Random(seed_key).choice(letters)
    return cands[max(range(len(cands)), key=lambda i: (where[i], -i))] if len(cands) > 1 else cands[0]


_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCI = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def _mmmu_norm(s: str) -> list:
    s = s.strip()
    try:
        return [round(float(s.replace(",", "")), 2)]
    except ValueError:
        s = s.lower()
        return [" " + s, s + " "] if len(s) == 1 else [s]


def parse_mmmu_open(response: str) -> list:
    """Candidate answers MMMU reads from an open response: the tail after "is", "so", "answer", "=" ...
    of each sentence, plus every number in them, normalised (numbers -> rounded floats, text lower-case)."""
    resp = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", resp)
    keys = []
    for i, sent in enumerate(sentences):
        indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
        if i == len(sentences) - 1:
            indicators.append("=")
        tails = [sent.split(ind)[-1].strip() for ind in indicators if ind in sent]
        if tails:
            shortest = min(tails, key=len)
            if shortest not in (":", ",", ".", "!", "?", ";", "'"):
                keys.append(shortest)
    if not keys:
        keys = [resp]
    cands = list(keys)
    for k in keys:
        cands += _NUM_COMMAS.findall(k) + _NUM_SCI.findall(k) + _NUM_SIMPLE.findall(k)
    out = []
    for c in cands:
        for v in _mmmu_norm(c):
            if v not in out:
                out.append(v)
    return out


def mmmu_open_correct(candidates: list, answer: str | list[str]) -> float:
    """MMMU open-question rule: a text gold answer contained in a text candidate, or an equal number."""
    golds = answer if isinstance(answer, list) else [answer]
    norm = [v for g in golds for v in _mmmu_norm(str(g))]
    for c in candidates:
        if isinstance(c, str):
            if any(isinstance(g, str) and g in c for g in norm):
                return 1.0
        elif c in norm:
            return 1.0
    return 0.0


# ----------------------------------------------------------------------------------------------------------
# SynthBench.


def normalized_exact_match(prediction: str, answer: str) -> float:
    """1.0 when both agree after VQA normalisation (case, punctuation, articles, number words)."""
    return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(answer))
