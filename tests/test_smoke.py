"""scripts/gpu_smoke.sh and python -m scope.smoke on the CPU: the line format, the exit status, and that a
broken method or a broken batch really prints FAIL and exits 1."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scope
from scope import smoke
from scope.eval.tasks import TASKS
from scope.methods import PRE_LLM, Method

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^(PASS|FAIL|SKIP) (tiny-llava|tiny-llava-next) (float32|float16|bfloat16) (sdpa|flash_attention_2) "
    r"b(1|4|1,4) (\S+): (.+)$"
)


def _checks(out: str) -> list[re.Match]:
    lines = out.strip().splitlines()
    assert lines[0].startswith("scope.smoke on cpu")
    assert re.fullmatch(r"\d+ checks: \d+ passed, \d+ failed, \d+ skipped in [\d.]+ s", lines[-1])
    matches = [LINE.match(line) for line in lines[1:-1]]
    assert all(matches), [line for line, m in zip(lines[1:-1], matches) if not m]
    return matches


def test_script_quick_on_cpu_passes_with_one_line_per_check():
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_smoke.sh"), "--device", "cpu", "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    matches = _checks(proc.stdout)
    assert not [m.group(0) for m in matches if m.group(1) == "FAIL"]
    for model in ("tiny-llava", "tiny-llava-next"):
        for method in smoke.QUICK_METHODS:
            mine = [
                m for m in matches if m.group(2) == model and m.group(6) == method and m.group(1) == "PASS"
            ]
            kinds = sorted((m.group(5), m.group(7).split(":")[0]) for m in mine)
            assert kinds == sorted(
                [("1", "shape"), ("1", "finite"), ("1", "tokens")]
                + [("4", "shape"), ("4", "finite"), ("4", "tokens"), ("4", "batch")]
            ), (model, method, kinds)
        skip = [m for m in matches if m.group(2) == model and m.group(4) == "flash_attention_2"]
        assert [m.group(1) for m in skip] == ["SKIP"] and "skipped: " in skip[0].group(7)
    batch = [m.group(7) for m in matches if m.group(7).startswith("batch:")]
    assert all("identical tokens" in b for b in batch)  # float32: exact


def _select_one_short(features, saliency, budget):
    """A broken selection: one token fewer than the budget."""
    return torch.arange(budget - 1, device=features.device).expand(features.shape[0], -1)


@pytest.fixture
def broken_method():
    scope.register(Method("broken_smoke", PRE_LLM, "Broken", fn=_select_one_short))
    yield "broken_smoke"
    scope.methods.unregister("broken_smoke")


def test_an_injected_fault_prints_fail_and_exits_1(broken_method, capsys):
    argv = ["--device", "cpu", "--methods", broken_method, "--models", "tiny-llava", "--attn", "sdpa"]
    assert smoke.main(argv) == 1
    matches = _checks(capsys.readouterr().out)
    status = {(m.group(5), m.group(7).split(":")[0]): m.group(1) for m in matches}
    assert status[("1", "tokens")] == status[("4", "tokens")] == "FAIL"
    assert status[("1", "shape")] == status[("4", "batch")] == "PASS"
    fails = [m.group(0) for m in matches if m.group(1) == "FAIL"]
    assert fails == [
        "FAIL tiny-llava float32 sdpa b1 broken_smoke: tokens: LLM saw [7] visual tokens, expected [8]",
        "FAIL tiny-llava float32 sdpa b4 broken_smoke: tokens: LLM saw [7, 7, 7, 7] visual tokens, expected "
        "[8, 8, 8, 8]",
    ]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_check_catches_forgotten_padding(monkeypatch, dtype):
    # a batching bug (padding dropped from the attention mask) must fail the batch-4 vs batch-1 comparison
    llava = importlib.import_module("scope.patch.llava")
    collapse = llava.collapse_placeholders

    def no_padding(*args, **kwargs):
        out = collapse(*args, **kwargs)
        if out["attention_mask"] is not None:
            out["attention_mask"] = torch.ones_like(out["attention_mask"])
        return out

    monkeypatch.setattr(llava, "collapse_placeholders", no_padding)
    checks = smoke.run_checks("cpu", ["tiny-llava"], [dtype], ["sdpa"], ["scope"], echo=None)
    status = {(c.case.batch, c.detail.split(":")[0]): c.status for c in checks}
    assert status[(4, "batch")] == "FAIL" and status[(1, "tokens")] == "PASS"


def _run(logits, sequences, indices, prompt_len):
    ids = torch.zeros(sequences.shape[0], prompt_len, dtype=torch.long)
    return smoke.Run({"input_ids": ids}, sequences, logits, {"indices": indices})


def test_half_precision_allows_tokens_to_part_at_a_near_tie_only():
    near = torch.tensor([[1.0, 0.999, 0.0]])  # top-2 gap 0.001 of the scale
    far = torch.tensor([[1.0, 0.5, 0.0]])
    idx = torch.tensor([[0, 2, 5]])
    for step1, ok_half in ((near, True), (far, False)):
        alone = _run([far, step1], torch.tensor([[7, 7, 0, 0]]), idx, 2)
        batch = _run([far.clone(), step1.clone()], torch.tensor([[7, 7, 0, 1]]), idx, 2)  # parts at step 1
        assert smoke.compare_row(batch, alone, 0, "bfloat16")[0] is ok_half
        assert smoke.compare_row(batch, alone, 0, "float32")[0] is False  # float32: tokens must be identical
    # a flipped selection near tie: allowed in half precision within the slack, never in float32
    alone = _run([far], torch.tensor([[7, 7, 0]]), torch.tensor([[0, 2, 5, 6, 8, 9, 10, 11]]), 2)
    flipped = _run([far], torch.tensor([[7, 7, 0]]), torch.tensor([[0, 2, 5, 6, 8, 9, 10, 12]]), 2)
    assert smoke.compare_row(flipped, alone, 0, "float16")[0] is True
    assert smoke.compare_row(flipped, alone, 0, "float32")[0] is False
    mixed = _run([far], torch.tensor([[7, 7, 0]]), torch.tensor([[1, 3, 4, 7, 13, 14, 15, 12]]), 2)
    assert smoke.compare_row(mixed, alone, 0, "float16")[0] is False  # most tokens differ: a bug


def test_gpu_hour_inputs_cover_the_runbook_and_the_fit_reproduces_table5():
    assert {t for job in smoke.runbook() for t in job.tasks} <= set(smoke.QUESTIONS)
    assert set(smoke.QUESTIONS) <= set(TASKS)
    rate, overhead = smoke.table5_fit(gpus=4)
    n = smoke.QUESTIONS["pope"]
    for method, budget in (("none", None), ("scope", 160)):
        wall = (smoke._flops("llava-v1.6-vicuna-7b", method, budget) * n / rate + overhead * n) / 4
        assert wall == pytest.approx(smoke.PAPER_TABLE5[method], rel=1e-9)
    assert 0 < overhead < 1 and 1e13 < rate < 1e15
