"""The paper / hf protocols (scope.protocol): prompts, preprocessing, run identity, dataset sources, the CLI.

Expected values are written here independently: prompt strings typed out, padded and anyres pixels built by
hand with PIL as LLaVA's mm_utils does, dataset sources listed by hand.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import scope.eval.sources as sources_module
from scope.eval import evaluate, get_task
from scope.eval.fixtures import FIXTURES, fixture
from scope.protocol import HF, PAPER, applied, build_prompt, prepare_images, resolve_protocol
from scope.testing import tiny_images, tiny_llava, tiny_llava_next

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."

# (task, fixture row, question text under hf, question text under paper, images)
QUESTIONS = [
    ("gqa", 0, "Is it overcast?" + SHORT, None, 1),
    (
        "mmbench_en_dev",
        1,
        "Look at the trees. Which season is it? There are several options:\nA. winter\nB. summer\nC. autumn"
        "\nD. spring\n" + LETTER,
        None,
        1,
    ),
    ("mme", 0, "Is this question 0?" + SHORT, None, 1),
    ("pope", 0, "Is there a dog in the image?" + SHORT, None, 1),
    (
        "scienceqa_img",
        1,
        "Context: A girl moves a box.\nWhich force moves the box?\nA. push\nB. pull" + LETTER,
        None,
        1,
    ),
    (
        "textvqa_val",
        0,
        "What brand is this?" + SHORT,
        "What brand is this?\nReference OCR token: nokia, 3310" + SHORT,
        1,
    ),
    ("seedbench", 2, "What happens next?\nA. x\nB. y\nC. z\nD. w" + LETTER, None, 2),
    (
        "mmmu_val",
        0,
        "<image 1> and <image 2>: which shape has more sides?\nA. triangle\nB. square\nC. pentagon\nD. circle"
        "\n" + LETTER,
        None,
        2,
    ),
]


@pytest.mark.parametrize("name,row,hf_q,paper_q,n_hf", QUESTIONS)
def test_exact_prompts_of_every_task(name, row, hf_q, paper_q, n_hf):
    _, proc = tiny_llava(seed=0)
    doc = fixture(name)[row]
    paper_q = paper_q or hf_q
    hf_task, paper_task = get_task(name).under(HF), get_task(name).under(PAPER)
    hf_imgs, paper_imgs = hf_task.images(doc), paper_task.images(doc)
    assert len(hf_imgs) == n_hf
    n_paper = 1 if name == "seedbench" else n_hf  # a SEED video question: its first frame under paper
    assert len(paper_imgs) == n_paper
    # the tiny processor's chat template (the embedded models' own): one "<image>\n" per image
    expected_hf = "USER: " + "<image>\n" * n_hf + hf_q + " ASSISTANT:"
    assert build_prompt(proc, hf_task.prompt(doc), len(hf_imgs), HF) == expected_hf
    # vicuna_v1: image tokens joined by spaces, one newline, then the question
    expected_paper = SYSTEM + " USER: " + " ".join(["<image>"] * n_paper) + "\n" + paper_q + " ASSISTANT:"
    assert build_prompt(proc, paper_task.prompt(doc), len(paper_imgs), PAPER) == expected_paper


def test_textvqa_paper_prompt_typed_out():
    _, proc = tiny_llava(seed=0)
    task, doc = get_task("textvqa").under(PAPER), fixture("textvqa_val")[1]
    assert build_prompt(proc, task.prompt(doc), 1, "paper") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat number is on the "
        "jersey?\nReference OCR token: 10\nAnswer the question using a single word or phrase. ASSISTANT:"
    )
    # max new tokens: the authors' YAML lengths under paper, ours under hf
    assert (task.max_new_tokens, get_task("textvqa").under(HF).max_new_tokens) == (1024, 16)
    assert get_task("pope").under(PAPER).max_new_tokens == 128
    assert get_task("gqa").under(PAPER).max_new_tokens == 16


def _clip_like(proc):
    """A CLIP processor with the tiny processor's own settings (what LLaVA calls image_processor)."""
    from transformers import CLIPImageProcessorPil

    ip = proc.image_processor
    return CLIPImageProcessorPil(
        size={"shortest_edge": ip.size["shortest_edge"]},
        crop_size=dict(ip.crop_size),
        image_mean=list(ip.image_mean),
        image_std=list(ip.image_std),
    )


def test_llava15_paper_pixels_are_mean_padded_by_hand():
    _, proc = tiny_llava(seed=0)
    for image in [
        fixture("textvqa_val")[0]["image"].convert("RGB"),
        tiny_images(1, size=(48, 28), seed=3)[0],
    ]:
        w, h = image.size
        # by hand: a square canvas of the CLIP mean x 255 rounded down, the image centred vertically
        fill = np.array([int(0.48145466 * 255), int(0.4578275 * 255), int(0.40821073 * 255)], dtype=np.uint8)
        canvas = np.tile(fill, (w, w, 1))
        top = (w - h) // 2
        canvas[top : top + h] = np.asarray(image)
        expected = _clip_like(proc)(Image.fromarray(canvas), return_tensors="pt")["pixel_values"]
        text = build_prompt(proc, "what ?", 1, PAPER)
        got = proc(images=prepare_images(proc, [image], PAPER), text=[text], return_tensors="pt")
        assert torch.equal(got["pixel_values"], expected)
        # hf: the processor's own resize + centre crop, which differs
        own = proc(images=prepare_images(proc, [image], HF), text=[text], return_tensors="pt")
        assert not torch.equal(own["pixel_values"], expected)


def _original_anyres(image, crop, pinpoints):
    """LLaVA's process_anyres_image, written out: pinpoints read as (width, height), first best fit wins."""
    ow, oh = image.size
    best, best_eff, best_waste = None, 0, math.inf
    for width, height in pinpoints:
        scale = min(width / ow, height / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = width * height - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (width, height), eff, waste
    tw, th = best
    if tw / ow < th / oh:
        nw, nh = tw, min(math.ceil(oh * tw / ow), th)
    else:
        nw, nh = min(math.ceil(ow * th / oh), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    crops = [canvas.crop((x, y, x + crop, y + crop)) for y in range(0, th, crop) for x in range(0, tw, crop)]
    return best, [image.resize((crop, crop))] + crops


@pytest.mark.parametrize("size", [(24, 16), (40, 20), (20, 56)])
def test_llava_next_paper_pixels_follow_the_original_anyres(size):
    model, proc = tiny_llava_next(seed=0, text_layers=1, vision_layers=1)
    image = tiny_images(1, size=size, seed=5)[0]
    pinpoints = [list(p) for p in proc.image_processor.image_grid_pinpoints]
    grid, crops = _original_anyres(image, 32, pinpoints)
    clip = _clip_like(proc)
    expected = torch.stack([clip(c, return_tensors="pt")["pixel_values"][0] for c in crops])
    text = build_prompt(proc, "what ?", 1, PAPER)
    with applied(proc, model, PAPER):
        got = proc(images=prepare_images(proc, [image], PAPER), text=[text], return_tensors="pt")
        assert torch.equal(got["pixel_values"][0, : len(crops)], expected)
        # the model reads the same grid: a forward pass of these inputs runs (token counts agree)
        model(**got)
    assert proc.image_processor.image_grid_pinpoints == pinpoints  # restored after the block
    if size == (24, 16):  # smaller than a crop both ways: a tie, the original takes the tall 1x2 grid
        assert grid == (32, 64)
        own = proc(images=[image], text=[build_prompt(proc, "what ?", 1, HF)], return_tensors="pt")
        assert not torch.equal(own["pixel_values"][0, : len(crops)], expected)


def test_resolve_protocol_defaults():
    from scope.paths import MINILLAVA_DIR, MINILLAVA_NEXT_DIR

    assert resolve_protocol("llava-hf/llava-1.5-7b-hf") is PAPER
    assert resolve_protocol(MINILLAVA_DIR) is HF and resolve_protocol(MINILLAVA_NEXT_DIR) is HF
    assert resolve_protocol(None) is HF and resolve_protocol("") is HF
    assert resolve_protocol(MINILLAVA_DIR, "paper") is PAPER
    with pytest.raises(ValueError, match=r"protocol='orig' is unknown; choose from \['hf', 'paper'\]"):
        resolve_protocol(None, "orig")


def _run(tmp_path, protocol, name="run"):
    model, proc = tiny_llava(seed=0)
    return evaluate(
        model,
        proc,
        "pope",
        out_dir=tmp_path / name,
        method="none",
        limit=2,
        max_new_tokens=1,
        datasets={"pope": fixture("pope")},
        protocol=protocol,
        progress=False,
    )


def test_protocol_recorded_and_part_of_the_identity(tmp_path):
    _run(tmp_path, "paper")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["protocol"] == "paper"
    rec = json.loads((tmp_path / "run" / "samples" / "pope.jsonl").read_text().splitlines()[0])
    assert rec["prompt"].startswith(SYSTEM + " USER: <image>\nIs there a dog")
    with pytest.raises(ValueError, match=r"protocol: 'paper' there, 'hf' now"):
        _run(tmp_path, "hf")
    _run(tmp_path, "paper")  # the same protocol resumes
    # a run written before protocols existed (no "protocol" field) used the checkpoint's own inputs: hf
    _run(tmp_path, None, "old")
    path = tmp_path / "old" / "config.json"
    cfg = json.loads(path.read_text())
    assert cfg.pop("protocol") == "hf"  # the tiny model has no name: its own processor
    path.write_text(json.dumps(cfg))
    _run(tmp_path, "hf", "old")
    with pytest.raises(ValueError, match=r"protocol: 'hf' there, 'paper' now"):
        _run(tmp_path, "paper", "old")


def test_tables_name_the_protocol(tmp_path):
    from scope import report

    _run(tmp_path, "paper")
    long = report.results_long([tmp_path / "run"])
    assert set(long["protocol"]) == {"paper"}
    wide = report.paper_layout(long, ci=False)
    csv, md = report.save_table(wide, "t", source="tiny", figures_dir=tmp_path / "figs")
    assert "Source: tiny; protocol: paper; environment:" in md.read_text()
    _run(tmp_path, "hf", "other")
    with pytest.raises(ValueError, match="mixes runs of protocols"):
        report.paper_layout(report.results_long([tmp_path / "run", tmp_path / "other"]))
    assert report.column_name("seedbench", "seed_all") == "SEED"
    assert report.column_name("seedbench", "seed_image") == "SEED-I"


def test_dataset_sources_in_order_and_named_on_failure(monkeypatch, tmp_path):
    calls = []

    def fail(source, name, split):
        calls.append((source, name))
        raise ConnectionError("unreachable")

    monkeypatch.setattr(sources_module, "read_dataset", fail)
    monkeypatch.delenv("SCOPE_DATASETS_DIR", raising=False)
    with pytest.raises(RuntimeError) as err:
        get_task("gqa").load(limit=1)
    assert calls == [
        ("lmms-lab/GQA", "testdev_balanced_instructions"),
        ("lmms-lab-encoder/GQA", "testdev_balanced_instructions"),
    ]
    assert "lmms-lab/GQA (config 'testdev_balanced_instructions'): ConnectionError" in str(err.value)
    assert "lmms-lab-encoder/GQA" in str(err.value)
    calls.clear()
    monkeypatch.setenv("SCOPE_DATASETS_DIR", str(tmp_path))
    with pytest.raises(RuntimeError) as err:
        get_task("pope").load(limit=1)
    expected = [str(tmp_path / "POPE"), str(tmp_path / "lmms-lab" / "POPE")]
    expected += [str(tmp_path / "lmms-lab-encoder" / "POPE"), "lmms-lab/POPE", "lmms-lab-encoder/POPE"]
    assert [s for s, _ in calls] == expected
    assert all(s in str(err.value) for s in expected)

    def second_works(source, name, split):
        calls.append((source, name))
        if source != "lmms-lab-encoder/POPE":
            raise FileNotFoundError(source)
        return fixture("pope")

    calls.clear()
    monkeypatch.setattr(sources_module, "read_dataset", second_works)
    assert len(get_task("pope").load(limit=2)) == 2 and calls[-1][0] == "lmms-lab-encoder/POPE"


def test_local_copy_from_save_to_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    fixture("scienceqa_img").save_to_disk(str(tmp_path / "ScienceQA" / "ScienceQA-IMG"))
    docs = get_task("sqa").load(data_dir=str(tmp_path))
    assert len(docs) == 2 and docs[1]["question"] == "Which force moves the box?"


@pytest.fixture
def no_model_load(monkeypatch):
    """scope.load.load fails the test if called; load_processor gives the tiny processor."""
    load_module = importlib.import_module("scope.load")  # the package attribute scope.load is the function

    def load(*args, **kwargs):
        raise AssertionError("--show-prompts must not load model weights")

    monkeypatch.setattr(load_module, "load", load)
    monkeypatch.setattr(load_module, "load_processor", lambda model=None, **kw: tiny_llava(seed=0)[1])


def test_show_prompts_without_weights(no_model_load, capsys):
    from scope.eval.__main__ import main

    argv = ["--model", "some/llava", "--tasks", "textvqa", "--fixtures", "--show-prompts", "--limit", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "protocol=paper" in out
    text = json.dumps(
        SYSTEM
        + " USER: <image>\nWhat brand is this?\nReference OCR token: nokia, 3310"
        + SHORT
        + " ASSISTANT:"
    )
    assert f"  text: {text}\n" in out
    assert "  image 1: 48x32 -> padded 48x48 -> pixels 3x32x32 per crop\n" in out
    assert "image tokens in the prompt: 16\n" in out and "max new tokens: 1024" in out
    assert main([*argv, "--protocol", "hf"]) == 0
    out = capsys.readouterr().out
    assert "  text: " + json.dumps("USER: <image>\nWhat brand is this?" + SHORT + " ASSISTANT:") in out
    assert "  image 1: 48x32 -> pixels 3x32x32 per crop\n" in out


def test_show_prompts_embedded_processor_offline(monkeypatch, capsys):
    from scope.eval.__main__ import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(
        importlib.import_module("scope.load"), "load", lambda *a, **k: pytest.fail("weights loaded")
    )
    assert main(["--tasks", "seedbench", "--fixtures", "--show-prompts", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "protocol=hf" in out and out.count("[seedbench #") == 3
    assert "image 2: 32x32" in out  # the video question's second frame (hf: every frame)


def test_fixtures_run_every_task(monkeypatch, tmp_path):
    from scope.eval.__main__ import main

    calls = []

    def load(model_id_or_path=None, **kw):
        calls.append(model_id_or_path)
        return tiny_llava(seed=0)

    monkeypatch.setitem(sys.modules, "scope.load", types.SimpleNamespace(load=load))
    out = tmp_path / "run"
    image_tasks = [n for n in FIXTURES if not get_task(n).video]  # video QA: test_eval_video.py
    tasks = ",".join(image_tasks)
    argv = ["--tasks", tasks, "--fixtures", "--method", "none", "--max-new-tokens", "1", "--out", str(out)]
    assert main([*argv, "--no-progress", "--protocol", "paper"]) == 0
    res = json.loads((out / "results.json").read_text())["tasks"]
    assert set(res) == set(image_tasks) and res["seedbench"]["n"] == 3
    assert {"seed_all", "seed_image", "seed_video"} <= set(res["seedbench"]["metrics"])
    assert json.loads((out / "config.json").read_text())["protocol"] == "paper"


def test_scope_load_records_the_protocol(tmp_path):
    import scope
    from scope.load import load_processor

    model, proc = tiny_llava(seed=1)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    _, loaded = scope.load(str(tmp_path))
    assert loaded.scope_protocol == "paper"  # a local checkpoint outside data/: a real one
    _, loaded = scope.load(str(tmp_path), protocol="hf")
    assert loaded.scope_protocol == "hf"
    assert load_processor(str(tmp_path)).scope_protocol == "paper"
