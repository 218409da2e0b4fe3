"""Model cards for the shipped MiniLLaVA checkpoints, written from the measured results of a training run."""

from __future__ import annotations

import json
from pathlib import Path

from scope.mini.synthbench import FAMILIES

DISCLAIMER = (
    "**Results obtained with this model illustrate the SCOPE method on a toy model and a synthetic benchmark; "
    "they do not reproduce, and must not be compared with, the numbers of the SCOPE paper** (LLaVA-1.5 7B / "
    "LLaVA-NeXT 7B on GQA, MMBench, MME, POPE, ...)."
)


def _table(results: dict) -> str:
    rows = ["| family | all tokens | random 64 tokens |", "|---|---|---|"]
    for fam in (*FAMILIES, "overall"):
        full, r64 = results["full"].get(fam), results["random64"].get(fam)
        if full is None:
            continue
        rows.append(f"| {fam} | {100 * full:.1f}% | {100 * r64:.1f}% |")
    return "\n".join(rows)


def write_card(out_dir: Path, name: str, arch: str, recipe: str, results: dict) -> Path:
    """Write ``results.json`` and ``README.md`` (the model card) next to a checkpoint."""
    out_dir = Path(out_dir)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    size_mb = sum(p.stat().st_size for p in out_dir.glob("*.safetensors")) / 2**20
    text = f"""# {name}

{DISCLAIMER}

A real Hugging Face `{arch}` checkpoint, small enough to run on a laptop CPU, trained from scratch by
`python -m scope.mini.train` (`make model`) on procedurally generated scenes. It is the embedded default
model of `scope` (`scope.load()`), so that pruning changes real answers offline, without downloading weights.

## Architecture
{results.get("architecture", "")}

## Training data
SynthBench scenes (`scope.mini.scenes`): 2-3 large and 3-6 small coloured shapes (6 colours x 4 shapes, every
colour/shape combination at most once per scene) on a low-contrast textured background, digits drawn on 1-2
large shapes; rendered at 384 px and downsampled with Lanczos. Questions (`scope.mini.synthbench`): existence
(POPE-style random / popular / adversarial negatives), counting, attribute, spatial relation, reading a digit,
multiple choice A-D. Training scenes use seeds below 9e8; the validation curve uses seeds from 9e8 and the
held-out test split (`load_synthbench("test")`, 480 questions, 80 per family) seeds from 1e9.

## Recipe
{recipe}

## Measured accuracy on the SynthBench test split (480 questions)
First-token exact match (every answer is a single token), bf16 autocast on CPU. "random 64" keeps 64 of the
visual tokens uniformly at random (seed 0), in raster order.

{_table(results)}

- Share of the layer -2 CLS attention (summed over heads, over the patches) held by the top 10% of tokens:
  **{100 * results.get("cls_top10_share", float("nan")):.1f}%** (mean over {results.get("cls_images", 0)} test images;
  a uniform attention would give 10%).
- Training time: {results.get("train_minutes", float("nan")):.1f} min on {results.get("threads", 2)} CPU threads
  (wall clock of the run that produced this checkpoint; the machine may have been shared).
- Checkpoint: {size_mb:.1f} MB of safetensors ({results.get("dtype", "bfloat16")}).
- Accuracy over training time: `training_log.csv` (stage, step, seconds, metric, value).

## Limitations
Toy scale: a closed vocabulary of {results.get("vocab_size", "?")} words, one-word answers, one scene type. The
tokenizer is a word-level vocabulary, not Llama's. {DISCLAIMER}
"""
    path = out_dir / "README.md"
    path.write_text(text)
    return path
