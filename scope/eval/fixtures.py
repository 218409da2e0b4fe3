"""Tiny in-memory datasets in the lmms-lab schemas, for tests and offline smoke runs (no network).

Column names and types follow the lmms-lab datasets lmms-eval loads (POPE, MME, GQA, MMBench, ScienceQA,
textvqa, SEED-Bench, MMMU; the video QA tasks in the rows :mod:`scope.eval.video_tasks` reads, with their
frames already decoded), including every field the ``paper`` protocol reads (TextVQA's ``ocr_tokens``,
SEED's ``data_type`` and video frames); the contents are made up. Some images are not square, so that
padding and cropping differ. ``fixture(name)`` returns a ``datasets.Dataset``; ``python -m scope.eval
--fixtures`` runs any command on them.
"""

from __future__ import annotations

from typing import Any

from PIL import Image


def _img(i: int, size: int = 32, height: int | None = None) -> Image.Image:
    # a distinct flat colour per row, so images differ but cost nothing; ``height`` makes it non-square
    return Image.new("RGB", (size, height or size), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))


def _rows(cols: dict[str, list]) -> Any:
    import datasets

    return datasets.Dataset.from_dict(cols)


def pope() -> Any:
    """6 questions, two per negative-sampling split (adversarial, popular, random)."""
    cats = ["adversarial", "adversarial", "popular", "popular", "random", "random"]
    return _rows(
        {
            "id": [str(i) for i in range(6)],
            "question_id": [str(i % 2 + 1) for i in range(6)],  # repeats across splits, as in POPE
            "question": [
                f"Is there a {o} in the image?" for o in ["dog", "cat", "car", "tree", "cup", "bus"]
            ],
            "answer": ["yes", "no", "yes", "no", "yes", "no"],
            "image_source": [f"COCO_val2014_{i:012d}" for i in range(6)],
            "image": [_img(i) for i in range(6)],
            "category": cats,
        }
    )


def mme() -> Any:
    """Three images x two questions (one yes, one no): two perception categories and one cognition."""
    cats = ["existence", "existence", "OCR", "OCR", "code_reasoning", "code_reasoning"]
    return _rows(
        {
            "question_id": [f"{c}/{i // 2:04d}.png" for i, c in enumerate(cats)],
            "image": [_img(i // 2) for i in range(6)],
            "question": [f"Is this question {i}? Please answer yes or no." for i in range(6)],
            "answer": ["Yes", "No"] * 3,
            "category": cats,
        }
    )


def gqa() -> Any:
    """GQA testdev-balanced instructions with the image already joined in (the hub keeps it separate)."""
    return _rows(
        {
            "id": ["201307251", "201640614", "202225914"],
            "imageId": ["n161313", "n235859", "n161313"],
            "question": ["Is it overcast?", "Who is wearing the dress?", "What color is the car?"],
            "answer": ["no", "woman", "white"],
            "fullAnswer": ["No, it is clear.", "The woman is wearing a dress.", "The car is white."],
            "image": [_img(0), _img(1), _img(0)],
        }
    )


def gqa_images() -> Any:
    return _rows({"id": ["n161313", "n235859"], "image": [_img(0), _img(1)]})


def mmbench() -> Any:
    """Two questions; the first also has a circular copy (index + 1e6) with the options rotated."""
    return _rows(
        {
            "index": [0, 1, 1_000_000],
            "question": ["What is shown?", "Which season is it?", "What is shown?"],
            "hint": ["nan", "Look at the trees.", "nan"],
            "A": ["a dog", "winter", "a cat"],
            "B": ["a cat", "summer", "a bird"],
            "C": ["a bird", "autumn", "a dog"],
            "D": ["nan", "spring", "nan"],
            "answer": ["A", "B", "C"],
            "category": ["object_localization", "image_scene", "object_localization"],
            "image": [_img(0), _img(1), _img(0)],
            "source": ["x", "y", "x"],
            "L2-category": ["a", "b", "a"],
            "comment": ["nan"] * 3,
            "split": ["dev"] * 3,
        }
    )


def scienceqa() -> Any:
    return _rows(
        {
            "image": [_img(0), _img(1)],
            "question": ["Which is a mammal?", "Which force moves the box?"],
            "choices": [["frog", "whale", "trout"], ["push", "pull"]],
            "answer": [1, 0],
            "hint": ["", "A girl moves a box."],
            "task": ["closed choice"] * 2,
            "grade": ["grade3", "grade5"],
            "subject": ["natural science"] * 2,
            "topic": ["biology", "physics"],
            "category": ["Classification", "Forces"],
            "skill": ["x", "y"],
            "lecture": ["", ""],
            "solution": ["", ""],
        }
    )


def textvqa() -> Any:
    """Two questions with their OCR tokens; the first image is wide (48 x 32)."""
    return _rows(
        {
            "image_id": ["a", "b"],
            "question_id": [34602, 34603],
            "question": ["what brand is this?", "what number is on the jersey?"],
            "answers": [
                ["Nokia"] * 7 + ["nokia phone", "nokia", "unanswerable"],
                ["ten", "10", "1o", "10.", "23", "23", "23", "23", "23", "23"],
            ],
            "image": [_img(0, 48, 32), _img(1)],
            "image_width": [48, 32],
            "image_height": [32, 32],
            "set_name": ["val", "val"],
            "image_classes": [["phone"], ["person"]],
            "ocr_tokens": [["nokia", "3310"], ["10"]],
        }
    )


def seedbench() -> Any:
    """Two image questions (the first image tall, 24 x 40) and one video question with two frames."""
    return _rows(
        {
            "answer": ["A", "C", "B"],
            "choice_a": ["one", "red", "x"],
            "choice_b": ["two", "green", "y"],
            "choice_c": ["three", "blue", "z"],
            "choice_d": ["four", "black", "w"],
            "data_id": [["1.jpg"], ["2.jpg"], ["v.mp4"]],
            "data_type": ["image", "image", "video"],
            "question": ["How many cats?", "What colour is the sky?", "What happens next?"],
            "question_id": ["101", "102", "9001"],
            "question_type_id": [1, 2, 10],
            "image": [[_img(0, 24, 40)], [_img(1)], [_img(2), _img(3)]],
            "segment": [None, None, [0.0, 1.0]],
        }
    )


def mmmu() -> Any:
    """One multiple-choice question with two images, one open question."""
    return _rows(
        {
            "id": ["validation_Math_1", "validation_Physics_2"],
            "question": [
                "<image 1> and <image 2>: which shape has more sides?",
                "What is the speed in m/s? <image 1>",
            ],
            "options": ["['triangle', 'square', 'pentagon', 'circle']", "[]"],
            "explanation": ["", ""],
            "image_1": [_img(0), _img(1)],
            "image_2": [_img(2), None],
            "img_type": ["['Diagrams']", "['Plots']"],
            "answer": ["C", "12.5"],
            "topic_difficulty": ["Easy", "Medium"],
            "question_type": ["multiple-choice", "open"],
            "subfield": ["Geometry", "Mechanics"],
        }
    )


def _video_qa(seed: int) -> Any:
    """Three questions on synthetic clips (``scope.testing.tiny_video``: a bright rectangle moving right),
    frames already decoded: 8, 12 and 5 of them, so that sampling 8 keeps, thins and repeats frames."""
    from scope.testing import tiny_video

    counts = [8, 12, 5]
    return _rows(
        {
            "question_id": [f"v{seed}_{i}" for i in range(3)],
            "video_name": [f"clip{seed}_{i}" for i in range(3)],
            "question": ["what is moving?", "which way does the box move", "how many boxes are there?"],
            "answer": ["box", "right", "one"],
            "frames": [tiny_video(n, seed=seed + i) for i, n in enumerate(counts)],
        }
    )


def msvd_qa() -> Any:
    return _video_qa(0)


def msrvtt_qa() -> Any:
    return _video_qa(1)


def tgif_qa() -> Any:
    return _video_qa(2)


def activitynetqa() -> Any:
    return _video_qa(3)


FIXTURES = {
    "pope": pope,
    "mme": mme,
    "gqa": gqa,
    "mmbench_en_dev": mmbench,
    "scienceqa_img": scienceqa,
    "textvqa_val": textvqa,
    "seedbench": seedbench,
    "mmmu_val": mmmu,
    "msvd_qa": msvd_qa,
    "msrvtt_qa": msrvtt_qa,
    "tgif_qa": tgif_qa,
    "activitynetqa": activitynetqa,
}


def fixture(name: str) -> Any:
    """The fixture dataset of task ``name`` (a lmms-eval task name or an alias, e.g. "activitynet_qa")."""
    from scope.eval.tasks import ALIASES

    name = ALIASES.get(name.strip().lower(), name)
    if name not in FIXTURES:
        raise ValueError(f"name={name!r}: fixtures exist for {sorted(FIXTURES)}")
    return FIXTURES[name]()
