"""The optional lmms-eval plugin model ``scope_llava`` (skipped where lmms-eval is not installed)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None


@pytest.mark.skipif(HAS_LMMS, reason="lmms-eval is installed")
def test_plugin_without_lmms_eval_says_how_to_install():
    with pytest.raises(ImportError, match=r"scope-pruning\[lmms\]"):
        importlib.import_module("scope.eval.lmms_plugin")


# --------------------------------------------------------------------------------------------------------
# the plugin against a stand-in for lmms-eval's base class (CI does not install lmms-eval)
# --------------------------------------------------------------------------------------------------------


class _FakeLmms:
    """What lmms_eval.api.model.lmms gives a model: single-process defaults, rank / world_size, task_dict."""

    is_simple = True

    def __init__(self) -> None:
        self._rank, self._world_size, self.task_dict = 0, 1, {}

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size


@pytest.fixture
def plugin(monkeypatch):
    """scope.eval.lmms_plugin imported against fake ``lmms_eval.api.model`` / ``lmms_eval.api.registry``."""
    registered = {}

    def register_model(*names):
        def deco(cls):
            registered.update(dict.fromkeys(names, cls))
            return cls

        return deco

    fakes = {
        "lmms_eval": types.ModuleType("lmms_eval"),
        "lmms_eval.api": types.ModuleType("lmms_eval.api"),
        "lmms_eval.api.model": types.SimpleNamespace(lmms=_FakeLmms),
        "lmms_eval.api.registry": types.SimpleNamespace(register_model=register_model),
    }
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "scope.eval.lmms_plugin", raising=False)
    module = importlib.import_module("scope.eval.lmms_plugin")
    assert registered == {"scope_llava": module.ScopeLlava}
    yield module
    sys.modules.pop("scope.eval.lmms_plugin", None)  # later imports see the real lmms-eval (or none)
    import scope.eval

    scope.eval.__dict__.pop("lmms_plugin", None)


@pytest.fixture
def fake_load(monkeypatch):
    """``scope.load.load`` replaced by a tiny LLaVA; records the arguments of each call."""
    from scope.testing import tiny_llava

    calls = []

    def load(model_id_or_path=None, method=None, budget=None, **kwargs):
        calls.append({"model_id_or_path": model_id_or_path, "method": method, "budget": budget, **kwargs})
        return tiny_llava(seed=0)

    monkeypatch.setattr(importlib.import_module("scope.load"), "load", load)
    return calls


def test_model_args_split_into_loading_keys_and_options(plugin):
    load_kw, options = plugin.split_model_args(
        {
            "attn_implementation": "eager",
            "device_map": "auto",
            "revision": 1234,
            "alpha": 0.5,
            "layers": "[2,3]",
        }
    )
    assert load_kw == {"attn_implementation": "eager", "device_map": "auto", "revision": "1234"}
    assert options == {"alpha": 0.5, "layers": [2, 3]}
    assert plugin.split_model_args({"combine": "add", "seed": "null"}) == (
        {},
        {"combine": "add", "seed": None},
    )
    assert (
        plugin.parse_dtype("float16") is torch.float16
        and plugin.parse_dtype("torch.bfloat16") is torch.bfloat16
    )
    assert plugin.parse_dtype("auto") == "auto" and plugin.parse_dtype(None) is None
    with pytest.raises(ValueError, match="dtype"):
        plugin.parse_dtype("half_precision")


def test_loading_keys_go_to_scope_load_and_options_to_the_patch(plugin, fake_load):
    # as lmms-eval passes them: model_args parsed by handle_arg_string, CLI batch_size / device added
    lm = plugin.ScopeLlava(
        pretrained="some/llava",
        method="scope",
        budget=4,
        dtype="float16",
        attn_implementation="eager",
        revision="main",
        alpha=0.5,
        batch_size="2",
        device="cpu",
    )
    assert fake_load == [
        {
            "model_id_or_path": "some/llava",
            "method": None,
            "budget": None,
            "device": "cpu",
            "dtype": torch.float16,
            "attn_implementation": "eager",
            "revision": "main",
        }
    ]
    state = lm.model._scope
    # a hub id defaults to the paper protocol: the authors' float16 selection arithmetic, the user's alpha
    assert (state.method, state.budget, state.options) == ("scope", 4, {"precision": "float16", "alpha": 0.5})
    assert lm.batch_size == 2 and lm.device == torch.device("cpu")
    # device_map: the model stays where from_pretrained put it
    plugin.ScopeLlava(method="none", device_map="cpu")
    assert fake_load[-1]["device_map"] == "cpu" and fake_load[-1]["model_id_or_path"] is None
    assert fake_load[-1]["device"] is None  # not moved after the device_map placed it


@pytest.mark.parametrize(
    "bad, match, before_loading",
    [
        ({"alhpa": 0.5}, r"unknown option.*alhpa", True),
        ({"alpha": -1}, r"alpha must be a finite number", True),
        ({"method": "scoop"}, r"unknown method 'scoop'", True),
        ({"method": "none", "alpha": 0.5}, r"unknown option", True),
        ({"method": "fastv", "layer": 99}, r"layer", False),  # against the loaded model's depth
        ({"budget": 0}, r"budget must be a positive int", False),
        ({"budget": "lots"}, r"budget must be a positive int", False),
        ({"keep_newlines": True}, r"LLaVA-NeXT", False),
    ],
)
def test_bad_selection_options_fail_when_the_model_is_built(plugin, fake_load, bad, match, before_loading):
    with pytest.raises(ValueError, match=match) as info:
        plugin.ScopeLlava(pretrained="some/llava", **{"method": "scope", "budget": 4, **bad})
    assert "scope_llava" in str(info.value)
    assert len(fake_load) == (0 if before_loading else 1)


def test_option_checks_leave_a_given_model_unpatched(plugin):
    from scope.patch import is_patched
    from scope.testing import tiny_llava

    model, proc = tiny_llava(seed=0)
    with pytest.raises(ValueError, match="keep_newlines"):
        plugin.ScopeLlava(model=model, processor=proc, method="scope", budget=4, keep_newlines=True)
    assert not is_patched(model)
    with pytest.raises(ValueError, match="only without model="):
        plugin.ScopeLlava(model=model, processor=proc, revision="main")


def test_protocols_paper_and_hf(plugin, fake_load):
    assert plugin.ScopeLlava(method="none", protocol="hf").protocol.name == "hf"
    assert plugin.ScopeLlava(method="none", protocol="paper").protocol.name == "paper"
    # defaults: a real checkpoint gets the paper's protocol, the embedded model (pretrained unset) its own
    assert plugin.ScopeLlava(pretrained="some/llava", method="none").protocol.name == "paper"
    assert plugin.ScopeLlava(method="none").protocol.name == "hf"
    with pytest.raises(ValueError, match=r"protocol='vllm' is unknown; choose from \['hf', 'paper'\]"):
        plugin.ScopeLlava(method="none", protocol="vllm")


def test_paper_protocol_requests(plugin, monkeypatch):
    """Under protocol=paper the plugin sends the vicuna_v1 prompt, square-padded images, and a SEED video
    question's first frame only."""
    from PIL import Image

    from scope.testing import tiny_llava

    model, proc = tiny_llava(seed=0)
    lm = plugin.ScopeLlava(model=model, processor=proc, method="none", protocol="paper", batch_size=2)
    seen = {}

    def fake_generate(model, processor, prompts, images, max_new_tokens):
        seen.update(prompts=prompts, images=images)
        return ["A"] * len(prompts), [None] * len(prompts)

    monkeypatch.setattr(plugin, "generate_answers", fake_generate)
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    frames = [Image.new("RGB", (16, 16), (0, 0, 255)), Image.new("RGB", (16, 16), (0, 255, 0))]
    lm.task_dict = {
        "seedbench": {
            "test": [{"data_type": "image", "image": [wide]}, {"data_type": "video", "image": frames}]
        }
    }
    gen = {"max_new_tokens": 2, "until": ["ASSISTANT:"]}
    reqs = [
        types.SimpleNamespace(args=("Q?", gen, lambda d: list(d["image"]), i, "seedbench", "test"))
        for i in range(2)
    ]
    assert lm.generate_until(reqs) == ["A", "A"]
    assert seen["prompts"][0] == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nQ? ASSISTANT:"
    )
    padded, video = seen["images"]
    assert padded[0].size == (40, 40) and padded[0].getpixel((0, 0)) == (122, 116, 104)  # CLIP mean x 255
    assert len(video) == 1 and video[0].getpixel((0, 0)) == (0, 0, 255)  # the first frame alone


def test_batch_size_auto(plugin, fake_load):
    assert plugin.parse_batch_size("auto") == plugin.AUTO_BATCH_SIZE == 8
    assert plugin.parse_batch_size("auto:4") == 8 and plugin.parse_batch_size("auto", max_batch_size=2) == 2
    assert plugin.parse_batch_size("16") == 16 and plugin.parse_batch_size(3) == 3
    for bad in ("big", "0", 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            plugin.parse_batch_size(bad)
    assert plugin.ScopeLlava(method="none", batch_size="auto").batch_size == 8


def test_device_rank_and_world_size(plugin, fake_load, monkeypatch):
    lm = plugin.ScopeLlava(method="scope", budget=4)
    assert (lm.rank, lm.world_size, lm.device) == (0, 1, torch.device("cpu"))
    lm._rank, lm._world_size = 3, 4  # what lmms-eval's evaluator does under several processes
    assert (lm.rank, lm.world_size) == (3, 4)

    runner = importlib.import_module("scope.eval.runner")
    state = types.SimpleNamespace(process_index=1, num_processes=2, device=torch.device("cpu"))
    monkeypatch.setattr(runner, "partial_state", lambda: state)
    lm = plugin.ScopeLlava(method="scope", budget=4, device="cpu")
    assert (lm.rank, lm.world_size, lm.device) == (1, 2, torch.device("cpu"))

    gpu1 = types.SimpleNamespace(process_index=1, num_processes=2, device=torch.device("cuda", 1))
    assert plugin.target_device(None, gpu1) == torch.device("cuda", 1)
    assert plugin.target_device("cuda", gpu1) == torch.device("cuda", 1)  # not every process on cuda:0
    assert plugin.target_device("cuda:0", gpu1) == torch.device("cuda", 0)  # explicit index: as asked
    assert plugin.target_device("cpu", gpu1) == torch.device("cpu")
    one = types.SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cuda", 0))
    assert plugin.target_device("cuda", one) == torch.device("cuda")


def test_generate_until_with_auto_batch(plugin):
    from scope.testing import tiny_images, tiny_llava

    model, proc = tiny_llava(seed=0)
    lm = plugin.ScopeLlava(model=model, processor=proc, method="scope", budget=4, batch_size="auto")
    docs = [{"image": im} for im in tiny_images(2)]
    lm.task_dict = {"fake": {"test": docs}}
    gen = {"max_new_tokens": 2, "until": ["ASSISTANT:"]}
    reqs = [
        types.SimpleNamespace(args=(f"Is there a dog {i}?", gen, lambda d: [d["image"]], i, "fake", "test"))
        for i in range(2)
    ]
    out = lm.generate_until(reqs)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


@pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed (optional extra)")
def test_plugin_answers_constructed_requests():
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.registry import get_model

    from scope.eval import lmms_plugin
    from scope.testing import tiny_images, tiny_llava

    assert get_model("scope_llava") is lmms_plugin.ScopeLlava
    assert lmms_plugin.manifest().model_id == "scope_llava"
    model, proc = tiny_llava(seed=0)
    lm = lmms_plugin.ScopeLlava(model=model, processor=proc, method="scope", budget=4, batch_size=2)
    assert model._scope.method == "scope" and model._scope.budget == 4
    docs = [{"image": im} for im in tiny_images(3)]
    lm.task_dict = {"fake": {"test": docs}}
    reqs = [
        Instance(
            request_type="generate_until",
            arguments=(
                f"Is there a dog {i}?",
                {"max_new_tokens": 3, "until": ["ASSISTANT:"]},
                lambda d: [d["image"]],
                i,
                "fake",
                "test",
            ),
            idx=0,
            metadata={"task": "fake", "doc_id": i, "repeats": 1},
        )
        for i in range(3)
    ]
    out = lm.generate_until(reqs)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    # the same answers as the runner gives one by one
    from scope.eval import build_prompt, generate_answers

    one = [
        generate_answers(
            model, proc, [build_prompt(proc, f"Is there a dog {i}?", 1)], [[docs[i]["image"]]], 3
        )[0][0]
        for i in range(3)
    ]
    assert out == [t.split("ASSISTANT:")[0].strip() for t in one]
    with pytest.raises(NotImplementedError):
        lm.loglikelihood(reqs)


@pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed (optional extra)")
def test_scorers_agree_with_lmms_eval_task_code(monkeypatch):
    """Our re-implementations give lmms-eval's numbers on random answers (POPE, MME, TextVQA, SQA, SEED,
    MMBench option matching, MMMU choice parsing)."""
    import random
    import sys
    import types

    import lmms_eval

    from scope.eval import get_task
    from scope.eval import metrics as M

    # import the task utils without lmms_eval.tasks.__init__ (it pulls in every metric library)
    pkg = types.ModuleType("lmms_eval.tasks")
    pkg.__path__ = [lmms_eval.__path__[0] + "/tasks"]
    monkeypatch.setitem(sys.modules, "lmms_eval.tasks", pkg)
    utils = {
        n: importlib.import_module(f"lmms_eval.tasks.{n}.utils")
        for n in ("pope", "mme", "textvqa", "scienceqa", "seedbench")
    }
    rng = random.Random(0)

    golds = [rng.choice(["yes", "no"]) for _ in range(300)]
    preds = [rng.choice(["Yes", "No", "yes", "no"]) for _ in range(300)]
    res = [
        utils["pope"].pope_process_results({"answer": g, "question_id": str(i)}, [p])["pope_f1_score"]
        for i, (g, p) in enumerate(zip(golds, preds))
    ]
    assert M.binary_metrics([M.parse_yes_no(p) for p in preds], golds)["f1"] == pytest.approx(
        100 * utils["pope"].pope_aggregate_f1_score(res)
    )

    docs, answers = [], []
    for c in M.MME_PERCEPTION + M.MME_COGNITION:
        for k in range(10):
            for gold in ("Yes", "No"):
                docs.append({"question_id": f"{c}/{k}.png", "category": c, "answer": gold})
                answers.append(rng.choice(["Yes", "No", "yes.", "No, it is not", "y", "maybe"]))
    per = [utils["mme"].mme_process_results(d, [a]) for d, a in zip(docs, answers)]
    task = get_task("mme")
    ours = task.aggregate([task.score(d, a) for d, a in zip(docs, answers)])
    for key in ("perception", "cognition"):
        ref = [v for r in per for k, v in r.items() if k == f"mme_{key}_score"]
        assert ours[key] == pytest.approx(utils["mme"].mme_aggregate_results(ref))

    words = [
        "Nokia",
        "nokia.",
        "the nokia",
        "two",
        "2",
        "coca-cola",
        "coca cola",
        "10,000",
        "10000",
        "dont",
        "don't",
        "Cat!",
    ]
    for _ in range(200):
        gts, p = [rng.choice(words) for _ in range(10)], rng.choice(words)
        ref = utils["textvqa"].textvqa_process_results({"answers": list(gts), "question_id": 1}, [p])[
            "exact_match"
        ]
        assert M.vqa_accuracy(p, gts) == pytest.approx(ref)

    for c in ["A", "B", "b", "B. whale", "The answer is B", "C.", "(B)", "b."]:
        assert (
            M.sqa_correct(c, "B")
            == utils["scienceqa"].sqa_process_results({"choices": ["x", "y", "z"], "answer": 1}, [c])[
                "exact_match"
            ]
        )
    for c in ["A", "A.", "a", "B) two", " C", "The answer is A"]:
        r = utils["seedbench"].seed_process_result(
            {"answer": "A", "data_type": "image", "question_id": "1"}, [c]
        )["seed_all"]
        assert M.seed_correct(c, "A") == utils["seedbench"].seed_aggregation_result([r])

    from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator

    ev, opts = MMBench_Evaluator(), {"A": "a dog", "B": "a cat", "C": "a bird", "D": "a fish"}
    for c in [
        "A",
        "B.",
        "(C)",
        "The answer is D",
        "A dog is here",
        "a cat",
        "a cat or a dog",
        "C) a bird",
        ":B",
        "B,",
        "A and B",
    ]:
        assert M.match_option(c, dict(opts)) == (ev.can_infer(c, dict(opts)) or None), c

    mmmu = importlib.import_module("lmms_eval.tasks._task_utils.mmmu_mcq_utils")
    options = ["triangle", "square", "pentagon", "circle"]
    index = {chr(65 + i): o for i, o in enumerate(options)}
    for c in ["(C)", "C", "B. square", "I think it is the pentagon shape here", "It is (B) or (D)", "A B"]:
        assert M.parse_mmmu_choice(c, options) == mmmu.parse_mmmu_multi_choice_response(
            c, list(index), index
        ), c


def test_qwen_model_share_budget_and_pixel_limits(plugin, monkeypatch):
    """A Qwen2-VL model under protocol=paper: the budget "0.25" is a share, the prompt is Qwen's own chat
    template, the pixel limits hold while generating (and not afterwards)."""
    from scope.protocol import pixel_limits
    from scope.testing import tiny_images, tiny_qwen2_vl

    model, proc = tiny_qwen2_vl(seed=0)
    lm = plugin.ScopeLlava(
        model=model, processor=proc, method="scope", budget="0.25", protocol="paper", batch_size=2,
        min_pixels="64", max_pixels="256",
    )  # fmt: skip
    assert (lm.budget, model._scope.budget, model._scope.options) == (0.25, 0.25, {})
    seen = {}
    real = plugin.generate_answers

    def spy(model, processor, prompts, images, max_new_tokens):
        seen.update(prompts=prompts, limits=pixel_limits(processor))
        texts, kept = real(model, processor, prompts, images, max_new_tokens)
        seen["kept"] = kept
        return texts, kept

    monkeypatch.setattr(plugin, "generate_answers", spy)
    docs = [{"image": im} for im in tiny_images(2)]
    lm.task_dict = {"pope": {"test": docs}}
    reqs = [
        types.SimpleNamespace(args=("Q?", {"max_new_tokens": 2}, lambda d: [d["image"]], i, "pope", "test"))
        for i in range(2)
    ]
    out = lm.generate_until(reqs)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert seen["prompts"] == ["USER: <|vision_start|><image><|vision_end|> Q? ASSISTANT:"] * 2
    assert seen["limits"] == {"min_pixels": 64, "max_pixels": 256}
    assert seen["kept"] == [1, 1]  # 32x32 px limited to 16x16: 4 merged tokens, a quarter of them
    assert pixel_limits(proc) == {"min_pixels": 256, "max_pixels": 4096}
    with pytest.raises(ValueError, match="native-resolution"):
        from scope.testing import tiny_llava

        llava, llava_proc = tiny_llava(seed=0)
        plugin.ScopeLlava(model=llava, processor=llava_proc, method="none", max_pixels=256)


def test_video_requests_send_eight_frames_to_video_llava(plugin, monkeypatch, tmp_path):
    """lmms-eval hands a video task one file path per request: the plugin decodes Video-LLaVA's 8 frames and
    sends them as videos= with the <video> prompt; an image model refuses such a request."""
    pytest.importorskip("av")
    from test_eval_video import write_grey_video

    from scope.testing import tiny_llava, tiny_video_llava

    path = tmp_path / "v_clip.mp4"
    write_grey_video(path, 20)
    model, proc = tiny_video_llava(seed=0)
    lm = plugin.ScopeLlava(model=model, processor=proc, method="scope", budget=16, protocol="hf")
    seen = {}

    def fake_generate(model, processor, prompts, images, max_new_tokens, videos=False):
        seen.update(prompts=prompts, images=images, videos=videos)
        return ["run"] * len(prompts), [None] * len(prompts)

    monkeypatch.setattr(plugin, "generate_answers", fake_generate)
    lm.task_dict = {"activitynetqa": {"test": [{"video_name": "clip"}]}}
    gen = {"max_new_tokens": 2, "until": ["ASSISTANT:"]}
    reqs = [
        types.SimpleNamespace(args=("what? Answer.", gen, lambda d: [str(path)], 0, "activitynetqa", "test"))
    ]
    assert lm.generate_until(reqs) == ["run"]
    assert seen["videos"] is True and seen["prompts"] == ["USER: <video>\nwhat? Answer. ASSISTANT:"]
    (frames,) = seen["images"]
    # 20 frames -> indices 0, 2, 5, 8, 10, 13, 16, 19: grey levels 10 x those (lossy codec: +-4)
    assert [float(np.asarray(f).mean()) for f in frames] == pytest.approx(
        [0, 20, 50, 80, 100, 130, 160, 190], abs=4
    )

    model, proc = tiny_llava(seed=0)
    lm = plugin.ScopeLlava(model=model, processor=proc, method="none", protocol="hf")
    lm.task_dict = {"activitynetqa": {"test": [{"video_name": "clip"}]}}
    with pytest.raises(ValueError, match=r"\['activitynetqa'\] send videos.*LlavaForConditionalGeneration"):
        lm.generate_until(reqs)
