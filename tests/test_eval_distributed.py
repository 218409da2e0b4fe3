"""``python -m scope.eval`` under torchrun with two CPU processes shards the questions and merges them (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from scope.eval import evaluate, read_jsonl
from scope.paths import MINILLAVA_DIR


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_two_cpu_processes_shard_the_embedded_model_run_and_merge(tmp_path):
    if not (MINILLAVA_DIR / "model.safetensors").exists():
        pytest.skip("the embedded MiniLLaVA is not built")
    out = tmp_path / "ddp"
    args = [
        "--method",
        "scope",
        "--budget",
        "64",
        "--tasks",
        "synthbench",
        "--limit",
        "6",
        "--batch-size",
        "1",
    ]
    args += ["--max-new-tokens", "4", "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        _free_port(),
    ]
    done = subprocess.run(
        [*run, "-m", "scope.eval", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    records = read_jsonl(out / "samples" / "synthbench.jsonl")
    assert [r["idx"] for r in records] == list(range(6)) and not list((out / "samples").glob("*.rank*"))
    # the same answers as one process gives
    import scope

    model, processor = scope.load(device="cpu")
    evaluate(model, processor, "synthbench", out_dir=tmp_path / "one", method="scope", budget=64, limit=6,
             batch_size=1, max_new_tokens=4, progress=False)  # fmt: skip
    single = read_jsonl(tmp_path / "one" / "samples" / "synthbench.jsonl")
    assert [r["prediction"] for r in records] == [r["prediction"] for r in single]
