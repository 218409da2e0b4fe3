"""The shipped MiniLLaVA / MiniLLaVA-NeXT checkpoints load offline and answer held-out questions."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from scope.mini.synthbench import load_synthbench, score
from scope.paths import MINILLAVA_DIR, MINILLAVA_NEXT_DIR, REPO_ROOT

N_QUESTIONS = 24  # 4 per family: the balanced prefix of the held-out split


def _answers(path, image_size: int, n: int = N_QUESTIONS, split: str = "test") -> tuple[list[str], list]:
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    ds = load_synthbench(split, limit=n, image_size=image_size)
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
        )
        for q in ds["question"]
    ]
    out = []
    for i in range(0, n, 8):  # left-padded batches, as users run it
        enc = processor(
            images=ds["image"][i : i + 8], text=prompts[i : i + 8], return_tensors="pt", padding=True
        )
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=2, do_sample=False)
        out += processor.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out, ds


CHECKPOINTS = [(MINILLAVA_DIR, 192), (MINILLAVA_NEXT_DIR, 384)]


def _status(path) -> str:
    return json.loads((path / "results.json").read_text()).get("status", "trained")


@pytest.mark.parametrize("path,image_size", CHECKPOINTS, ids=["mini", "next"])
def test_checkpoint_loads_offline_and_answers_in_vocabulary(path, image_size):
    assert (path / "model.safetensors").exists(), f"{path} has no checkpoint: run `make model`"
    assert (path / "model.safetensors").stat().st_size <= 25 * 2**20
    card = (path / "README.md").read_text()
    assert "do not reproduce" in card
    preds, ds = _answers(path, image_size, n=8)
    vocab = set(AutoProcessor.from_pretrained(path).tokenizer.get_vocab())
    words = [p.split()[0] for p in preds if p.split()]
    assert len(preds) == 8 and words and all(w in vocab for w in words), preds


@pytest.mark.parametrize("path,image_size", CHECKPOINTS, ids=["mini", "next"])
def test_checkpoint_answers_held_out_questions(path, image_size):
    status = _status(path)
    if status.startswith("placeholder"):
        # the card and results.json say so in the open; the recipe is unfinished work of issue 4
        pytest.skip(f"{path.name}: {status}")
    preds, ds = _answers(path, image_size)
    acc = sum(score(p, a, f) for p, a, f in zip(preds, ds["answer"], ds["family"])) / len(preds)
    overall = json.loads((path / "results.json").read_text())["full"]["overall"]
    # Generation through the processor must agree with the card's measurement (24 questions: +-2.5 SD) and a
    # model that meets its targets must stay far above chance (~0.3) on this prefix.
    floor = overall - 0.25 if status != "trained" else max(0.75, overall - 0.25)
    assert acc >= floor, list(zip(ds["question"], preds, ds["answer"]))


def test_card_matches_results():
    results = json.loads((MINILLAVA_DIR / "results.json").read_text())
    card = (MINILLAVA_DIR / "README.md").read_text()
    assert f"{100 * results['full']['overall']:.1f}%" in card
    assert "do not reproduce" in card
    status = results.get("status", "trained")
    if status != "trained":
        assert f"Status: {status}" in card


def test_embedded_checkpoints_load_in_float32_unless_asked(tmp_path):
    """Stored in bf16, run in fp32 (CPU bf16 kernels differ between CPUs); a given dtype or a copy elsewhere
    keeps the usual behaviour (the stored dtype)."""
    import shutil

    import scope

    assert scope.load()[0].dtype == torch.float32
    assert scope.load(MINILLAVA_NEXT_DIR)[0].dtype == torch.float32
    assert scope.load(dtype=torch.bfloat16)[0].dtype == torch.bfloat16
    copy = tmp_path / "mini"
    shutil.copytree(MINILLAVA_DIR, copy)
    assert scope.load(copy)[0].dtype == torch.bfloat16


def test_next_resolves_fine_detail_that_mini_cannot():
    """What LLaVA-NeXT's grid crops buy: half-size digits and shapes (the detail split), through generate()."""
    correct = {}
    for path, image_size in CHECKPOINTS:
        preds, ds = _answers(path, image_size, n=12, split="detail")
        correct[path.name] = sum(score(p, a, f) for p, a, f in zip(preds, ds["answer"], ds["family"]))
    assert correct["minillava-next"] >= correct["minillava"] + 3, correct


def test_readme_status_quotes_the_checkpoints_results():
    """The README's Status says what the shipped checkpoints score as their results.json has it, and links the cards."""
    mini = json.loads((MINILLAVA_DIR / "results.json").read_text())
    nxt = json.loads((MINILLAVA_NEXT_DIR / "results.json").read_text())
    status = (REPO_ROOT / "README.md").read_text().split("> **Status")[1].split("\n\n")[0]
    for value in (
        mini["full"]["overall"],
        mini["random64"]["overall"],
        nxt["full"]["overall"],
        nxt["detail"]["overall"],
        mini["detail"]["overall"],
    ):
        assert f"{100 * value:.1f}%" in status, value
    assert "data/minillava/README.md" in status and "data/minillava-next/README.md" in status
