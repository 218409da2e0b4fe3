"""SynthBench: question families over procedural scenes, each mirroring a benchmark of the paper.

| family    | mirrors         | needs                                             | answer                  |
|-----------|-----------------|---------------------------------------------------|-------------------------|
| existence | POPE            | find one object (random/popular/adversarial neg.) | yes / no                |
| counting  | counting in MME | every instance, small ones too (coverage)         | 0-6                     |
| attribute | GQA             | colour or shape of a named object                 | colour / shape word     |
| spatial   | GQA relations   | positions of two objects                          | left/right, above/below |
| reading   | TextVQA         | the digit drawn on an object (fine detail; 1 in 5 | digit                   |
|           |                 | test questions: half-size "small text")           |                         |
| choice    | MMBench / SQA   | any of the above as A-D multiple choice           | A / B / C / D           |

The test split is fixed: scene seeds ``TEST_SEED_BASE + i``; training draws seeds from ``[0, TEST_SEED_BASE)``.
One reading question in five (subset ``"small"``, the others ``"large"``) asks about a "small text" scene
(seed ``SMALL_TEXT_SEED_BASE + i``): its digits are drawn at half size, 5-8 px tall in a 192 px view and
10-16 px at full resolution, so that reading them is what LLaVA-NeXT's high-resolution crops buy.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from scope.mini.scenes import (
    COLOR_WEIGHTS,
    COLORS,
    DIGITS,
    SHAPE_WEIGHTS,
    SHAPES,
    SMALL_TEXT_SEED_BASE,
    TINY_SEED_BASE,
    Obj,
    Scene,
    make_scene,
    render,
)

FAMILIES = ("existence", "counting", "attribute", "spatial", "reading", "choice")
POPE_SUBSETS = ("random", "popular", "adversarial")
READING_SUBSETS = ("large", "small")  # text size of a test reading question (see SMALL_TEXT_SEED_BASE)
SMALL_TEXT_EVERY = 5  # every 5th test reading question is about small text
DETAIL_FAMILIES = ("reading", "attribute", "counting")  # the "detail" split: fine detail only
TEST_SEED_BASE = 1_000_000_000
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = ("A", "B", "C", "D")
# Popularity of every colour/shape combination under the generator's sampling weights (POPE "popular").
_POPULARITY = sorted(
    ((float(cw * sw), c, s) for c, cw in zip(COLORS, COLOR_WEIGHTS) for s, sw in zip(SHAPES, SHAPE_WEIGHTS)),
    reverse=True,
)
POPULAR = [(c, s) for _, c, s in _POPULARITY[:8]]


def _plural(shape: str) -> str:
    return shape + "s"


def _qa(question: str, answer: str, family: str, subset: str = "", refs: list[int] | None = None) -> dict:
    """A question dict; ``refs`` = indices of the scene objects the answer depends on (training only)."""
    return {"question": question, "answer": answer, "family": family, "subset": subset, "refs": refs or []}


def _idx(scene: Scene, objs) -> list[int]:
    return [i for i, o in enumerate(scene.objects) if any(o is p for p in objs)]


def _existence(scene: Scene, rng: np.random.Generator, subset: str, positive: bool) -> dict:
    present = {(o.color, o.shape) for o in scene.objects}
    refs = []
    if positive:
        k = int(rng.integers(len(scene.objects)))
        o, refs = scene.objects[k], [k]
        c, s = o.color, o.shape
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        if subset == "popular":
            pool = [p for p in POPULAR if p not in present] or absent
        elif subset == "adversarial":  # shares colour or shape with something in the scene
            pool = [p for p in absent if any(p[0] == q[0] or p[1] == q[1] for q in present)] or absent
        else:
            pool = absent
        c, s = pool[int(rng.integers(len(pool)))]
    return _qa(
        f"Is there a {c} {s} in the image? Answer yes or no.",
        "yes" if positive else "no",
        "existence",
        subset,
        refs,
    )


def _unique(scene: Scene, key: str) -> list[Obj]:
    counts = Counter(getattr(o, key) for o in scene.objects)
    return [o for o in scene.objects if counts[getattr(o, key)] == 1]


def _counting(scene: Scene, rng: np.random.Generator) -> dict:
    if rng.random() < 0.6:
        s = str(rng.choice(SHAPES))
        refs = [i for i, o in enumerate(scene.objects) if o.shape == s]
        return _qa(f"How many {_plural(s)} are there in the image?", str(len(refs)), "counting", refs=refs)
    c = str(rng.choice(list(COLORS)))
    refs = [i for i, o in enumerate(scene.objects) if o.color == c]
    return _qa(f"How many {c} objects are there in the image?", str(len(refs)), "counting", refs=refs)


def _attribute_parts(scene: Scene, rng: np.random.Generator) -> tuple[str, str, list[str], list[int]]:
    """(question, answer, answer vocabulary, refs) about the colour or shape of a uniquely named object."""
    by_shape, by_color = _unique(scene, "shape"), _unique(scene, "color")
    if by_shape and (not by_color or rng.random() < 0.5):
        o = by_shape[int(rng.integers(len(by_shape)))]
        return f"What colour is the {o.shape}?", o.color, list(COLORS), _idx(scene, [o])
    o = by_color[int(rng.integers(len(by_color)))] if by_color else scene.objects[0]
    return f"What shape is the {o.color} object?", o.shape, list(SHAPES), _idx(scene, [o])


def _attribute(scene: Scene, rng: np.random.Generator) -> dict:
    q, a, _, refs = _attribute_parts(scene, rng)
    return _qa(q, a, "attribute", refs=refs)


def _spatial(scene: Scene, rng: np.random.Generator) -> dict | None:
    """GQA's two-way relation template: "Is the X to the left or to the right of the Y?" (or above/below).

    The answer word names the relation; an earlier yes/no form ("Is the X to the left of the Y?") was
    dropped: the toy LM never learnt to combine the relation word with the comparison (spatial stayed at
    chance), so SynthBench asks the form whose answer is the relation itself.
    """
    objs = scene.objects
    margin = 0.1 * 384
    for _ in range(30):
        i, j = (int(v) for v in rng.choice(len(objs), size=2, replace=False))
        a, b = objs[i], objs[j]
        horizontal = rng.random() < 0.5
        d = (a.x - b.x) if horizontal else (a.y - b.y)
        if abs(d) < margin:
            continue
        if horizontal:
            ans = "left" if d < 0 else "right"
            q = f"Is the {a.name} to the left or to the right of the {b.name}?"
        else:
            ans = "above" if d < 0 else "below"
            q = f"Is the {a.name} above or below the {b.name}?"
        return _qa(q, ans, "spatial", refs=[i, j])
    return None


def _reading(scene: Scene, rng: np.random.Generator) -> dict | None:
    glyphs = [o for o in scene.objects if o.glyph]
    if not glyphs:
        return None
    o = glyphs[int(rng.integers(len(glyphs)))]
    return _qa(f"What number is written on the {o.name}?", o.glyph, "reading", refs=_idx(scene, [o]))


def _choice(scene: Scene, rng: np.random.Generator) -> dict | None:
    kind = int(rng.integers(3))
    glyphs = [o for o in scene.objects if o.glyph]
    if kind == 0 and glyphs:
        o = glyphs[int(rng.integers(len(glyphs)))]
        q, a, vocab, refs = (
            f"Which number is written on the {o.name}?",
            o.glyph,
            list(DIGITS),
            _idx(scene, [o]),
        )
    elif kind == 1:
        s = str(rng.choice(SHAPES))
        refs = [i for i, o in enumerate(scene.objects) if o.shape == s]
        q, a, vocab = f"How many {_plural(s)} are there?", str(len(refs)), list("012345")
    else:
        q, a, vocab, refs = _attribute_parts(scene, rng)
    others = [v for v in vocab if v != a]
    options = [a] + [str(v) for v in rng.choice(others, size=3, replace=False)]
    options = [options[int(k)] for k in rng.permutation(4)]
    letter = LETTERS[options.index(a)]
    lines = "\n".join(f"{L}. {opt}" for L, opt in zip(LETTERS, options))
    return _qa(f"{q}\n{lines}\n{CHOICE_SUFFIX}", letter, "choice", refs=refs)


def make_question(
    scene: Scene, family: str, rng: np.random.Generator, subset: str = "", positive=None
) -> dict:
    """One question of ``family`` about ``scene`` (falls back to attribute when the family does not apply)."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {FAMILIES}")
    if family == "existence":
        subset = subset or str(rng.choice(POPE_SUBSETS))
        positive = bool(rng.random() < 0.5) if positive is None else positive
        return _existence(scene, rng, subset, positive)
    fn = {"counting": _counting, "attribute": _attribute, "spatial": _spatial, "reading": _reading}.get(
        family
    )
    qa = fn(scene, rng) if fn else _choice(scene, rng)
    return qa if qa is not None else _attribute(scene, rng)


def heldout_items(n_per_family: int = 80) -> list[dict]:
    """The fixed held-out list (without images): one scene per question, seeds from ``TEST_SEED_BASE``.

    Existence questions cycle through the POPE subsets with balanced yes/no; every ``SMALL_TEXT_EVERY``-th
    reading question (subset ``"small"``) is about a small-text scene, seed ``SMALL_TEXT_SEED_BASE + k``.
    """
    items = []
    k = 0
    for family in FAMILIES:
        for i in range(n_per_family):
            seed = TEST_SEED_BASE + k
            k += 1
            rng = np.random.default_rng([seed, 7])
            scene = make_scene(seed)
            if family == "existence":  # balanced subsets and yes/no, as POPE
                qa = make_question(scene, family, rng, POPE_SUBSETS[(i // 2) % 3], positive=i % 2 == 0)
            elif family == "reading":
                small = i % SMALL_TEXT_EVERY == SMALL_TEXT_EVERY - 1
                if small:
                    seed = SMALL_TEXT_SEED_BASE + k - 1
                    rng, scene = np.random.default_rng([seed, 7]), make_scene(seed)
                qa = make_question(scene, family, rng) | {"subset": READING_SUBSETS[small]}
            else:
                qa = make_question(scene, family, rng)
            items.append({"question_id": f"synthbench-{family}-{i:04d}", "seed": seed, **qa})
    return items


def detail_items(n_per_family: int = 80) -> list[dict]:
    """The fixed "detail" split: questions whose answer lies in fine detail only (without images).

    ``reading`` asks for a digit drawn at half size (small-text scenes, subset ``"small"``); ``attribute``
    and ``counting`` ask about small shapes drawn at half size (seeds from ``TINY_SEED_BASE``, subset
    ``"tiny"``), keeping only questions whose every referenced object is one of those tiny shapes (and, for
    counting, at least one). At 192 px these details span a patch or less; LLaVA-NeXT's full-resolution crops
    show them at the size the usual digits and small shapes have at 192 px.
    """
    items = []
    for family in DETAIL_FAMILIES:
        base = SMALL_TEXT_SEED_BASE + 100_000 if family == "reading" else TINY_SEED_BASE
        seed, i = base + 100_000 * DETAIL_FAMILIES.index(family), 0
        while i < n_per_family:
            scene, rng = make_scene(seed), np.random.default_rng([seed, 7])
            qa = make_question(scene, family, rng)
            objs = [scene.objects[r] for r in qa["refs"]]
            if qa["family"] == family and objs and (family == "reading" or not any(o.large for o in objs)):
                sub = "small" if family == "reading" else "tiny"
                items.append(
                    {"question_id": f"synthbench-detail-{family}-{i:04d}", "seed": seed, **qa}
                    | {"subset": sub}
                )
                i += 1
            seed += 1
    return items


def load_synthbench(split: str = "test", limit: int | None = None, seed: int = 0, image_size: int = 192):
    """SynthBench as a ``datasets.Dataset`` with columns question_id, image, question, answer, family, subset.

    ``split="test"`` is the fixed held-out set (480 questions, 80 per family; ``seed`` is ignored);
    ``split="detail"`` the fixed fine-detail set (``detail_items``: 240 questions on half-size digits and
    shapes, for what LLaVA-NeXT's resolution buys; ``seed`` is ignored);
    ``split="train"`` draws 480 questions from training scenes offset by ``seed``. ``limit`` keeps the first
    ``limit`` questions after an order-stable interleave of families, so small limits still cover all
    families. ``image_size`` is the side of the rendered image (384 keeps full resolution for LLaVA-NeXT).
    """
    import datasets

    if split not in ("test", "detail", "train"):
        raise ValueError(f"split={split!r} must be 'test', 'detail' or 'train'")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit!r} must be a positive int or None")
    if split == "test":
        items = heldout_items()
    elif split == "detail":
        items = detail_items()
    else:
        rng = np.random.default_rng(seed)
        items = []
        for i in range(480):
            sd = int(rng.integers(0, TEST_SEED_BASE))
            qa = make_question(make_scene(sd), FAMILIES[i % 6], np.random.default_rng([sd, 7]))
            items.append({"question_id": f"synthbench-train{seed}-{i:04d}", "seed": sd, **qa})
    # Interleave families (round-robin) so that limit=N is a balanced prefix.
    by_family = [[it for it in items if it["family"] == f] for f in FAMILIES]
    items = [fam[i] for i in range(max(map(len, by_family))) for fam in by_family if i < len(fam)]
    if limit is not None:
        items = items[:limit]
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "family": datasets.Value("string"),
            "subset": datasets.Value("string"),
        }
    )
    cols = {  # column order = features order
        k: [render(make_scene(it["seed"]), image_size) for it in items]
        if k == "image"
        else [it[k] for it in items]
        for k in features
    }
    return datasets.Dataset.from_dict(cols, features=features)


_WORD = re.compile(r"[a-z0-9]+")


def majority_baseline(items: list[dict]) -> dict[str, float]:
    """Accuracy of always giving each family's most frequent answer (per family and ``overall``)."""
    by_family: dict[str, list[str]] = {}
    for it in items:
        by_family.setdefault(it["family"], []).append(it["answer"])
    acc = {f: Counter(a).most_common(1)[0][1] / len(a) for f, a in by_family.items()}
    acc["overall"] = sum(acc[f] * len(a) for f, a in by_family.items()) / len(items)
    return acc


def normalize(text: str) -> str:
    """Lower-case first word of a prediction, punctuation stripped ("Yes." -> "yes", "B. red" -> "b")."""
    words = _WORD.findall(str(text).lower())
    return words[0] if words else ""


def score(prediction: str, answer: str, family: str) -> float:
    """Normalised exact match of the first word of ``prediction`` against ``answer`` (1.0 or 0.0)."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {FAMILIES}")
    return float(normalize(prediction) == normalize(answer))
