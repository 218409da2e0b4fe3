"""A short run of the MiniLLaVA training recipe gives the same weights as the code it was refactored from.

``tests/data/train_short_hashes.json`` holds the sha256 of every tensor after each stage of ``short_run``
(stage 1: the tower; stage 2: the whole MiniLLaVA; the NeXT stage: the whole MiniLLaVA-NeXT), produced by
the code before ``scope/mini/train.py`` was split by stage (commit bdaaddb). bf16 kernels differ between
torch versions and CPU instruction sets, so the hashes are compared only on the platform that wrote them.
Regenerate them (only for a change that is meant to change the weights) with
``python tests/test_mini_train.py --write``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HASHES = Path(__file__).parent / "data" / "train_short_hashes.json"


def _platform() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def _hashes(module: torch.nn.Module) -> dict[str, str]:
    return {
        k: hashlib.sha256(v.detach().float().contiguous().numpy().tobytes()).hexdigest()
        for k, v in sorted(module.state_dict().items())
    }


def short_run() -> dict[str, dict[str, str]]:
    """Every stage of ``make model`` for a few steps on a tiny model, with every option of the recipe on."""
    from scope.mini.features import extract_features, extract_next_features
    from scope.mini.lm import train_lm
    from scope.mini.model import build_config, build_model, build_tokenizer, build_vocab
    from scope.mini.next import build_next_processor, next_from_mini
    from scope.mini.sequences import Seq
    from scope.mini.targets import OPTIONAL_READOUTS, READOUTS, TARGET_HEADS
    from scope.mini.tower import train_tower

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = build_tokenizer(build_vocab(n_scenes=100))
        model = build_model(build_config(tok, vision_layers=3, vision_width=128, lm_layers=2, lm_width=64), 0)
        quiet = lambda *row: None  # noqa: E731
        train_tower(
            model, steps=4, batch=4, lr=1e-3, seed=0, log=quiet, window=6, zoom=0.5, probe_every=2,
            group=1.0, warmup=2, ink=1.0, pca=True,
        )  # fmt: skip
        out = {"tower": _hashes(model.model.vision_tower)}
        pool = np.arange(6)
        feats, masks = extract_features(model, pool, batch=6, with_masks=True)
        seq = Seq(tok)
        train_lm(
            model, seq, feats, pool, steps=4, batch=2, turns=4, lr=3e-3, seed=0, log=quiet,
            evaluate_fn=lambda: {}, eval_every=2, masks=masks, curriculum=2, curriculum_hold=1, ground=1.0,
            targets=tuple(TARGET_HEADS), readouts=(*READOUTS, *OPTIONAL_READOUTS),
            gap=100, schedule="wsd",
        )  # fmt: skip
        out["minillava"] = _hashes(model)
        nxt = next_from_mini(model.to(torch.bfloat16).float())  # as saved, then loaded for the NeXT stage
        pool = np.arange(2)
        feats, masks = extract_next_features(nxt, build_next_processor(tok), pool, 2, with_masks=True)
        train_lm(
            nxt, seq, feats, pool, steps=2, batch=2, turns=3, lr=1e-3, seed=0, log=quiet,
            evaluate_fn=lambda: {}, eval_every=1, masks=masks, ground=1.0,
        )  # fmt: skip
        out["next"] = _hashes(nxt)
    finally:
        torch.set_num_threads(threads)
    return out


def test_short_training_run_gives_the_weights_of_the_reference_code():
    expected = json.loads(HASHES.read_text())
    if expected["platform"] != _platform():
        pytest.skip(f"hashes written on {expected['platform']}, this is {_platform()}")
    got = short_run()
    for stage in ("tower", "minillava", "next"):
        assert got[stage].keys() == expected[stage].keys(), stage
        changed = [k for k in got[stage] if got[stage][k] != expected[stage][k]]
        assert not changed, f"{stage}: {len(changed)} tensors differ, e.g. {changed[:3]}"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    HASHES.parent.mkdir(exist_ok=True)
    doc = {
        "_comment": "sha256 of every tensor after each stage of tests/test_mini_train.py:short_run, written "
        "by `python tests/test_mini_train.py --write` with the code of commit bdaaddb (before "
        "scope/mini/train.py was split by stage); compared only on the same torch version and CPU capability",
        "platform": _platform(),
        **short_run(),
    }
    HASHES.write_text(json.dumps(doc, indent=1) + "\n")
