"""scope.load: local checkpoints round-trip, clear and fast failures when weights are unreachable."""

from __future__ import annotations

import sys
import time

import pytest
import torch

import scope
from scope.patch import is_patched
from scope.testing import chat_prompt, tiny_images, tiny_llava, tiny_llava_next

load_module = sys.modules.get("scope.load") or __import__("scope.load", fromlist=["load"])


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    model, processor = tiny_llava(seed=6)
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor, path


@torch.no_grad()
def test_local_round_trip_patched(saved_llava):
    model, processor, path = saved_llava
    loaded, loaded_processor = scope.load(str(path), method="scope", budget=4)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded._scope.method == "scope" and loaded._scope.budget == 4
    inputs = processor(images=tiny_images(1), text=chat_prompt(processor, "what ?"), return_tensors="pt")
    again = loaded_processor(
        images=tiny_images(1), text=chat_prompt(processor, "what ?"), return_tensors="pt"
    )
    assert torch.equal(inputs.input_ids, again.input_ids)
    with scope.patch(model, method="scope", budget=4):
        torch.testing.assert_close(loaded(**again).logits, model(**inputs).logits, atol=0, rtol=0)
    plain, _ = scope.load(path)  # no method: unpatched
    assert not is_patched(plain)


def test_picks_next_class(tmp_path):
    model, processor = tiny_llava_next(seed=0, text_layers=1, vision_layers=2)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, _ = scope.load(tmp_path, method="scope", budget=9)
    assert type(loaded).__name__ == "LlavaNextForConditionalGeneration"


def test_missing_embedded_model_says_make_model(monkeypatch, tmp_path):
    monkeypatch.setattr(scope.paths, "MINILLAVA_DIR", tmp_path / "minillava")
    with pytest.raises(FileNotFoundError, match="make model"):
        scope.load()


def test_uncached_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        scope.load("no-such-org/no-such-llava-7b")
    assert time.perf_counter() - start < 2.0


def test_uncached_hub_id_unreachable_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused at once
    start = time.perf_counter()
    assert load_module.hub_reachable(timeout=1.0) is False
    with pytest.raises(ConnectionError, match="cannot be reached"):
        scope.load("no-such-org/no-such-llava-7b")
    assert time.perf_counter() - start < 5.0


def test_bad_paths_and_families(tmp_path):
    from transformers import LlamaConfig

    with pytest.raises(FileNotFoundError, match="no config.json"):
        scope.load(tmp_path)
    LlamaConfig(
        num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=2
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type='llama'"):
        scope.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        scope.load("./not/here")


def test_device_and_dtype(saved_llava):
    _, _, path = saved_llava
    model, _ = scope.load(path, device="auto", dtype="bfloat16")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert model.device.type == expected and model.dtype == torch.bfloat16
    assert load_module.resolve_device(None) is None
    with pytest.raises(ValueError, match="not a device"):
        scope.load(path, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            scope.load(path, device="cuda")
    with pytest.raises(ValueError, match="not a torch dtype"):
        scope.load(path, dtype="half-ish")
    with pytest.raises(ValueError, match="dtype once"):
        scope.load(path, dtype="float16", torch_dtype=torch.float32)
