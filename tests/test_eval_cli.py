"""``python -m scope.eval`` end to end on SynthBench with a tiny random LLaVA standing in for scope.load()."""

from __future__ import annotations

import json
import sys
import types

import pytest

from scope.eval import read_jsonl

testing = pytest.importorskip("scope.testing")


@pytest.fixture
def fake_load(monkeypatch):
    calls = []

    def load(model_id_or_path=None, method=None, budget=None, **kw):
        calls.append((model_id_or_path, kw))
        return testing.tiny_llava(seed=0)

    monkeypatch.setitem(sys.modules, "scope.load", types.SimpleNamespace(load=load))
    return calls


def test_cli_run_on_synthbench(fake_load, tmp_path, capsys):
    from scope.eval.__main__ import main

    out = tmp_path / "run"
    argv = [
        "--method",
        "scope",
        "--budget",
        "4",
        "--tasks",
        "synthbench",
        "--limit",
        "6",
        "--batch-size",
        "3",
    ]
    argv += ["--max-new-tokens", "2", "--option", "alpha=0.5", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert fake_load == [(None, {"device": "cpu", "dtype": None})]  # no --model: the embedded default, on CPU
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["options"] == {"alpha": 0.5} and cfg["tasks"] == ["synthbench"] and cfg["limit"] == 6
    recs = read_jsonl(out / "samples" / "synthbench.jsonl")
    assert len(recs) == 6 and {r["family"] for r in recs} == {
        "existence",
        "counting",
        "attribute",
        "spatial",
        "reading",
        "choice",
    }
    assert all(r["kept_tokens"] == 4 for r in recs)
    res = json.loads((out / "results.json").read_text())["tasks"]["synthbench"]
    assert res["n"] == 6 and res["mean_kept_tokens"] == 4 and "existence/f1" in res["metrics"]
    assert "| synthbench | accuracy |" in capsys.readouterr().out
    # the same command again finds everything logged and generates nothing
    assert main(argv) == 0 and len(read_jsonl(out / "samples" / "synthbench.jsonl")) == 6


def test_cli_rejects_bad_budget_and_option(fake_load, tmp_path):
    from scope.eval.__main__ import main

    with pytest.raises(SystemExit, match="budget"):
        main(["--budget", "many", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main(["--option", "alpha", "--out", str(tmp_path)])
