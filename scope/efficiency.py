"""What pruning buys, counted and measured the same way for every method.

Two halves:

* **Counted** (:func:`flops_table`): the paper's models are built on the meta device from their published
  configs (``data/configs``; no weights, no memory) and every matmul of a prefill is counted with
  :class:`torch.utils.flop_counter.FlopCounterMode`: vision tower, the selection itself, projector, and the
  LLM layer by layer with the tokens alive in that layer. Pre-LLM methods (SCOPE, VisionZip, ...) feed K
  visual tokens to every layer; in-LLM methods (FastV, PDrop) feed all N to the first layers and fewer
  later, so they are counted with their real per-layer token counts and also shown as a layer-averaged
  token count. The selection's elementwise work, which FlopCounterMode does not see (it counts
  matmul / conv / attention only), is added from closed forms stated in :func:`selection_flops`.
* **Measured** (:func:`latency_table`): prefill latency, time-to-first-token, decode tokens/s, peak memory
  and the selection's own time on a real (small) model, with :class:`torch.utils.benchmark.Timer` on CPU
  and CUDA events on a GPU.

Conventions (stated once, used everywhere):

* A *prefill* is one image + a prompt of ``prompt_tokens`` text tokens (default 64: the LLaVA-1.5
  template ``USER: <image>\\n{question} ASSISTANT:`` with a one-line question is ~40-70 Llama tokens).
* The unpruned visual token count N is 576 for LLaVA-1.5 and 5 x 576 = 2880 for LLaVA-NeXT (base crop +
  2 x 2 grid, without unpadding and newline tokens: the paper's count).
* LLaVA-NeXT budgets are split evenly over the crops (floor(K / crops) each), as the reference code does.
* The logits of the prefill are computed for the last position only (what ``generate`` does).
* Attention FLOPs are dense (QK^T and AV over all pairs; FlopCounterMode does not halve causal attention).
* The vision tower is counted as transformers runs it: all 24 CLIP layers, though LLaVA reads layer -2.
* ``budget`` means what :func:`scope.patch` means: visual tokens per image entering the LLM (pre-LLM), or
  kept after the (first) drop layer (FastV, PDrop). The in-LLM methods' ranking (the last token's
  attention row, recomputed by :mod:`scope.patch.in_llm`) is counted as their selection cost.

``python -m scope.bench e2e`` prints both tables (:func:`main`).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from scope.paths import CONFIGS_DIR

__all__ = [
    "PAPER_CONFIGS",
    "PRE_LLM_METHODS",
    "IN_LLM_METHODS",
    "PROMPT_TOKENS",
    "load_config",
    "meta_model",
    "count_flops",
    "visual_layout",
    "token_schedule",
    "llm_flops",
    "llm_layer_flops_closed_form",
    "vision_flops",
    "projector_flops",
    "saliency_flops",
    "ranking_flops",
    "selection_flops",
    "selection_time",
    "prefill_flops",
    "flops_table",
    "measure",
    "latency_table",
    "default_model",
    "main",
]

PAPER_CONFIGS = ("llava-1.5-7b", "llava-v1.6-vicuna-7b", "llava-1.5-13b", "llava-v1.6-vicuna-13b")
PRE_LLM_METHODS = ("scope", "coverage", "saliency", "random", "uniform", "divprune", "visionzip")
IN_LLM_METHODS = ("fastv", "pdrop")
# methods shown by default: SCOPE, the strongest pre-LLM baselines and both in-LLM baselines
DEFAULT_METHODS = ("scope", "visionzip", "divprune", "random", "fastv", "pdrop")
PROMPT_TOKENS = 64
# budgets of the paper's tables: Table 1 (LLaVA-1.5) and Table 2 (LLaVA-NeXT)
PAPER_BUDGETS = {"llava": (192, 128, 64), "llava_next": (640, 320, 160)}


# --------------------------------------------------------------------------------------------------------
# configs and meta-device models
# --------------------------------------------------------------------------------------------------------


def load_config(name_or_path):
    """A transformers config: a name in ``data/configs`` (see :data:`PAPER_CONFIGS`), a folder, or a config."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(name_or_path, PretrainedConfig):
        return name_or_path
    path = Path(name_or_path)
    if not path.exists():
        path = CONFIGS_DIR / str(name_or_path)
    if not (path / "config.json").exists():
        known = sorted(p.name for p in CONFIGS_DIR.glob("*/config.json")) if CONFIGS_DIR.exists() else []
        known = [Path(k).parent.name for k in known] or list(PAPER_CONFIGS)
        raise ValueError(
            f"config {name_or_path!r} not found: give a folder with config.json or one of {known}"
        )
    return AutoConfig.from_pretrained(path)


_META_MODELS: dict[str, torch.nn.Module] = {}


def meta_model(config) -> torch.nn.Module:
    """The model of ``config`` (a config, name or folder) with every tensor on the meta device.

    Shapes only: a 13B model costs no memory and builds in about a second, and FlopCounterMode counts
    operations from shapes, so it counts a prefill of the real architecture without its weights. Built
    once per distinct config.
    """
    from transformers import AutoModelForImageTextToText

    config = load_config(config)
    key = config.to_json_string()
    if key not in _META_MODELS:
        with torch.device("meta"):
            _META_MODELS[key] = AutoModelForImageTextToText.from_config(config).eval()
    return _META_MODELS[key]


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` by FlopCounterMode (matmul, conv and attention kernels only)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def _family(config) -> str:
    return "llava_next" if getattr(config, "model_type", "") == "llava_next" else "llava"


def visual_layout(config) -> tuple[int, int]:
    """(crops, tokens per crop) of one image: (1, 576) for LLaVA-1.5, (5, 576) for LLaVA-NeXT."""
    v = config.vision_config
    per_crop = (v.image_size // v.patch_size) ** 2
    return (5 if _family(config) == "llava_next" else 1), per_crop


def _text_parts(model):
    """(decoder layers, rotary embedding, final norm, lm_head) of a LLaVA-style model."""
    lm = model.model.language_model
    return lm.layers, lm.rotary_emb, lm.norm, model.lm_head


# --------------------------------------------------------------------------------------------------------
# per-layer token counts
# --------------------------------------------------------------------------------------------------------


def token_schedule(method: str, budget: int | None, n_visual: int, n_layers: int, **options) -> list[int]:
    """Visual tokens alive in each of the ``n_layers`` LLM layers for one image of ``n_visual`` tokens.

    * ``"none"`` or ``budget=None`` (pre-LLM): N everywhere.
    * pre-LLM methods: ``budget`` everywhere (LLaVA-NeXT's per-crop split is applied by the caller).
    * ``"fastv"`` / ``"pdrop"``: exactly the schedule :mod:`scope.patch.in_llm` runs (so counted and
      measured numbers describe the same baseline): FastV keeps N in layers < ``layer`` (default 2) and
      ``budget`` after; PDrop keeps N until its first stage end (layer 8 of 32, scaled to the depth), then
      ``budget``, ``budget * ratio``, ``budget * ratio**2`` (ratio 0.5) at the later stage ends.
    """
    if method == "none" or (budget is None and method not in IN_LLM_METHODS):
        return [n_visual] * n_layers
    if budget is not None and not 1 <= budget <= n_visual:
        raise ValueError(f"budget must be in [1, {n_visual}], got {budget}")
    if method in PRE_LLM_METHODS:
        return [budget] * n_layers
    if method in IN_LLM_METHODS:
        from scope.patch.in_llm import schedule

        return [int(c) for c in schedule(method, budget, n_visual, n_layers, dict(options))]
    raise ValueError(f"unknown method {method!r}; choose 'none', one of {PRE_LLM_METHODS + IN_LLM_METHODS}")


# --------------------------------------------------------------------------------------------------------
# counted FLOPs
# --------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _layer_flops_cached(model_key: int, n_tokens: int) -> int:
    model = _LAYER_MODELS[model_key]
    layers, rotary, _, _ = _text_parts(model)
    hidden = model.config.text_config.hidden_size
    x = torch.empty(1, n_tokens, hidden, device="meta")
    pos = torch.arange(n_tokens, device="meta")[None]
    # attention_mask=None lets SDPA use is_causal; the model-level mask builder needs real data (.item())
    with torch.no_grad():
        emb = rotary(x, position_ids=pos)
    return count_flops(layers[0], x, attention_mask=None, position_embeddings=emb, position_ids=pos)


_LAYER_MODELS: dict[int, torch.nn.Module] = {}


def _layer_flops(model, n_tokens: int) -> int:
    """FLOPs of one decoder layer on ``n_tokens`` tokens (Llama layers are identical, so layer 0 stands in)."""
    _LAYER_MODELS[id(model)] = model
    return _layer_flops_cached(id(model), int(n_tokens))


def llm_flops(model, per_layer_tokens: Sequence[int]) -> int:
    """Prefill FLOPs of the language model when layer i sees ``per_layer_tokens[i]`` tokens (text included).

    Every layer is run on meta tensors under FlopCounterMode; the lm_head is counted for the last position.
    """
    layers, _, _, head = _text_parts(model)
    if len(per_layer_tokens) != len(layers):
        raise ValueError(f"per_layer_tokens has {len(per_layer_tokens)} entries for {len(layers)} layers")
    total = sum(_layer_flops(model, n) for n in per_layer_tokens)
    hidden = model.config.text_config.hidden_size
    return total + count_flops(head, torch.empty(1, 1, hidden, device="meta"))


def llm_layer_flops_closed_form(text_config, n_tokens: int) -> int:
    """One Llama layer on n tokens: 2 n (2 D^2 + 2 D D_kv + 3 D F) projections + 4 n^2 D attention."""
    d, f = text_config.hidden_size, text_config.intermediate_size
    heads = text_config.num_attention_heads
    d_kv = (getattr(text_config, "num_key_value_heads", None) or heads) * (d // heads)
    return 2 * n_tokens * (2 * d * d + 2 * d * d_kv + 3 * d * f) + 4 * n_tokens**2 * d


def vision_flops(model, crops: int = 1) -> int:
    """Vision tower on ``crops`` crops, as LLaVA runs it (all layers, hidden states kept)."""
    key = (id(model), crops)
    if key not in _VISION_FLOPS:
        v = model.config.vision_config
        pixels = torch.empty(crops, 3, v.image_size, v.image_size, device="meta")
        _VISION_FLOPS[key] = count_flops(model.model.vision_tower, pixels, output_hidden_states=True)
    return _VISION_FLOPS[key]


_VISION_FLOPS: dict[tuple[int, int], int] = {}


def projector_flops(model, n_tokens: int) -> int:
    """The multimodal projector on ``n_tokens`` features."""
    if n_tokens == 0:
        return 0
    x = torch.empty(1, n_tokens, model.config.vision_config.hidden_size, device="meta")
    return count_flops(model.model.multi_modal_projector, x)


def saliency_flops(model, crops: int = 1) -> int:
    """CLS attention of vision layer -2 recomputed from that layer's input: q for CLS, k for all tokens.

    An upper bound of what a saliency hook costs (a hook reading the tower's own keys costs ~0).
    """
    v = model.config.vision_config
    attn = model.model.vision_tower.encoder.layers[-2].self_attn
    h = torch.empty(crops, (v.image_size // v.patch_size) ** 2 + 1, v.hidden_size, device="meta")

    def cls_attention(h):
        heads, hd = v.num_attention_heads, v.hidden_size // v.num_attention_heads
        q = attn.q_proj(h[:, :1]).view(crops, 1, heads, hd).transpose(1, 2)
        k = attn.k_proj(h).view(crops, -1, heads, hd).transpose(1, 2)
        return (q @ k.transpose(-1, -2)).softmax(-1).sum(1)

    return count_flops(cls_attention, h)


def ranking_flops(model, n_tokens: int) -> int:
    """FastV / PDrop ranking on ``n_tokens`` tokens: ``scope.patch.in_llm.last_token_attention`` on meta.

    It recomputes the last token's query and every token's key with the layer's projections (2 D^2 +
    2 n D D_kv) and one attention row (2 n D): the in-LLM methods' counterpart of the selection cost.
    """
    from scope.patch.in_llm import last_token_attention

    layer = _text_parts(model)[0][0]
    x = torch.empty(1, n_tokens, model.config.text_config.hidden_size, device="meta")
    pos = torch.arange(n_tokens, device="meta")[None]
    with torch.no_grad():
        cos_sin = _text_parts(model)[1](x, position_ids=pos)
    valid = torch.ones(1, n_tokens, dtype=torch.bool, device="meta")
    return count_flops(last_token_attention, layer, x, cos_sin, valid)


def _elementwise_flops(method: str, n: int, k: int, d: int) -> int:
    """Closed form of a selection's elementwise work per crop (FlopCounterMode sees only its matmuls).

    * scope / coverage: row normalisation (3 n d) + K greedy steps, each scoring all n candidates against
      all n tokens: ``max(0, S_uv - c_u)`` summed over u is 3 n^2, then weighting, argmax and the
      coverage update (3 n): ``3 n d + K (3 n^2 + 3 n)``. This is the dense reference loop; the fast lazy
      greedy rescores only a few rows per step, so this is an upper bound for it.
    * divprune: normalisation + nearest-neighbour pass (n^2) + K steps of min-update and argmax (2 n).
    * visionzip: normalisation + one argmax over the contextual similarity and the merge mean (~3 n d).
    * saliency / random / uniform: a top-k or an index list, ~0.
    """
    if method in ("scope", "coverage"):
        return 3 * n * d + k * (3 * n * n + 3 * n)
    if method == "divprune":
        return 3 * n * d + n * n + k * 2 * n
    if method == "visionzip":
        return 6 * n * d
    return 0


@functools.lru_cache(maxsize=512)
def selection_flops(
    method: str, budget: int, crops: int = 1, n: int = 576, d: int = 1024, seed: int = 0
) -> dict:
    """FLOPs of one image's selection: ``scope.prune`` on random ``[crops, n, d]`` features of the real dims.

    ``budget`` is split evenly over the crops (floor(budget / crops) each). Returns ``{"counted": matmul
    FLOPs seen by FlopCounterMode, "elementwise": the closed form of :func:`_elementwise_flops` for all
    crops, "total": their sum}``. In-LLM methods have no separate selection (their ranking row is counted in
    :func:`prefill_flops`): zeros.
    """
    if method in IN_LLM_METHODS or method == "none":
        return {"counted": 0, "elementwise": 0, "total": 0}
    import scope

    per_crop = budget // crops
    if per_crop < 1:
        raise ValueError(f"budget {budget} is smaller than the {crops} crops it is split over")
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(crops, n, d, generator=gen)
    sal = torch.rand(crops, n, generator=gen).softmax(-1)
    counted = count_flops(scope.prune, feats, sal, budget=per_crop, method=method)
    elementwise = crops * _elementwise_flops(method, n, per_crop, d)
    return {"counted": counted, "elementwise": elementwise, "total": counted + elementwise}


def selection_time(
    method: str, budget: int, crops: int = 1, n: int = 576, d: int = 1024, min_run_time: float = 0.1
) -> float:
    """Milliseconds of ``scope.prune`` for one image at the real dims on this machine's CPU.

    Features drawn around cluster centres with skewed saliency (``scope.bench.synthetic_inputs``,
    "clip-like"), since the lazy greedy's speed depends on the data; budget split over crops as above.
    """
    import scope
    from scope.bench import synthetic_inputs

    feats, sal = synthetic_inputs(n, crops, dim=d)
    per_crop = budget // crops
    return 1e3 * _timed(lambda: scope.prune(feats, sal, per_crop, method), torch.device("cpu"), min_run_time)


def prefill_flops(
    config,
    method: str = "scope",
    budget: int | None = None,
    prompt_tokens: int = PROMPT_TOKENS,
    n_visual: int | None = None,
    **options,
) -> dict:
    """One row of the FLOP table: tokens and FLOPs of one prefill of ``config`` pruned by ``method``.

    Keys: visual tokens entering the LLM, the layer-averaged visual tokens, per-layer visual counts, and
    FLOPs of the vision tower, the saliency, the selection, the projector, the LLM, their total, and the
    selection's share of the total (``select_share``, saliency included); ``kv_cache_mb``: the KV cache the
    prefill leaves for decoding, in fp16 (the checkpoints' dtype). ``budget=None`` is the unpruned model.
    ``n_visual`` overrides the unpruned visual token count entering the LLM (default crops x 576; a real
    LLaVA-NeXT image adds unpadded grid rows and newline tokens); the vision tower still runs all crops.
    """
    config = load_config(config)
    if budget is None:
        method = "none"
    model = meta_model(config)
    crops, per_crop = visual_layout(config)
    n_visual = crops * per_crop if n_visual is None else int(n_visual)
    n_layers = config.text_config.num_hidden_layers
    if method != "none" and budget is not None and method in PRE_LLM_METHODS:
        kept = crops * (budget // crops)  # per-crop split: floor(K / crops) per crop
    else:
        kept = n_visual if budget is None or method == "none" else budget
    schedule = token_schedule(
        method, kept if method in PRE_LLM_METHODS else budget, n_visual, n_layers, **options
    )
    entering = n_visual if method in IN_LLM_METHODS or budget is None else kept
    llm = llm_flops(model, [prompt_tokens + s for s in schedule])
    if method in IN_LLM_METHODS:
        # their ranking: the last token's attention row, recomputed before every drop (counted separately
        # as the in-LLM methods' "selection")
        drops = [i for i in range(1, n_layers) if schedule[i] < schedule[i - 1]]
        rank = sum(ranking_flops(model, prompt_tokens + schedule[i - 1]) for i in drops)
    else:
        rank = 0
    uses_saliency = method in ("scope", "saliency", "visionzip")
    sal = saliency_flops(model, crops) if (uses_saliency and budget is not None) else 0
    if method in PRE_LLM_METHODS and budget is not None:
        sel = selection_flops(method, budget, crops, per_crop, config.vision_config.hidden_size)["total"]
    else:
        sel = rank
    vis = vision_flops(model, crops)
    proj = projector_flops(model, entering)
    total = vis + sal + sel + proj + llm
    t = config.text_config
    d_kv = (getattr(t, "num_key_value_heads", None) or t.num_attention_heads) * (
        t.hidden_size // t.num_attention_heads
    )
    kv_bytes = sum(2 * (prompt_tokens + n) * d_kv * 2 for n in schedule)  # K and V, fp16
    return {
        "model": getattr(config, "_name_or_path", "") or "",
        "method": method if budget is not None else "none",
        "budget": budget if budget is not None else n_visual,
        "prompt_tokens": prompt_tokens,
        "visual_in": entering,
        "visual_avg": sum(schedule) / n_layers,
        "per_layer": schedule,
        "vision_gflops": vis / 1e9,
        "saliency_gflops": sal / 1e9,
        "select_gflops": sel / 1e9,
        "projector_gflops": proj / 1e9,
        "llm_gflops": llm / 1e9,
        "total_gflops": total / 1e9,
        "select_share": (sal + sel) / total,
        "kv_cache_mb": kv_bytes / 2**20,
    }


def flops_table(
    configs: Sequence = PAPER_CONFIGS,
    budgets: Sequence[int] | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    prompt_tokens: int = PROMPT_TOKENS,
    time_selection: bool = False,
    progress: bool = False,
) -> pd.DataFrame:
    """Prefill FLOPs of each config (name, folder or config) x method x budget, plus the unpruned row.

    ``budgets=None`` uses the paper's budgets of each family (192/128/64 for LLaVA-1.5, 640/320/160 for
    LLaVA-NeXT). Columns: those of :func:`prefill_flops` plus ``flops_ratio`` (unpruned / pruned total),
    ``llm_ratio`` (the same for the LLM alone) and ``token_ratio`` (N / layer-averaged visual tokens);
    with ``time_selection``, ``select_ms_cpu``: :func:`selection_time` of pre-LLM methods at these dims.
    """
    from tqdm.auto import tqdm

    rows = []
    for cfg in configs:
        config = load_config(cfg)
        name = cfg if isinstance(cfg, str) else getattr(config, "_name_or_path", "model")
        own = budgets if budgets is not None else PAPER_BUDGETS[_family(config)]
        jobs = [("none", None)] + [(m, b) for b in own for m in methods]
        for method, budget in tqdm(jobs, desc=f"FLOPs {Path(str(name)).name}", disable=not progress):
            row = prefill_flops(config, method, budget, prompt_tokens)
            row["model"] = Path(str(name)).name
            if time_selection:
                row["select_ms_cpu"] = _cached_selection_time(method, budget, *visual_layout(config), config)
            rows.append(row)
    df = pd.DataFrame(rows)
    base = df[df.method == "none"].set_index("model")
    df["flops_ratio"] = df.model.map(base.total_gflops) / df.total_gflops
    df["llm_ratio"] = df.model.map(base.llm_gflops) / df.llm_gflops
    df["token_ratio"] = df.model.map(base.visual_avg) / df.visual_avg
    return df


@functools.lru_cache(maxsize=256)
def _selection_time_key(method: str, budget: int, crops: int, n: int, d: int) -> float:
    return selection_time(method, budget, crops, n, d)


def _cached_selection_time(method, budget, crops, n, config) -> float:
    if method not in PRE_LLM_METHODS or budget is None:
        return float("nan")
    return _selection_time_key(method, budget, crops, n, config.vision_config.hidden_size)


# --------------------------------------------------------------------------------------------------------
# measured on a real model
# --------------------------------------------------------------------------------------------------------


def _timed(fn: Callable, device: torch.device, min_run_time: float) -> float:
    """Seconds per call of ``fn()``: median of CUDA-event timings on a GPU; elsewhere the fastest block of
    torch.utils.benchmark.Timer's ``blocked_autorange`` (on a shared CPU the minimum is the reproducible
    statistic: other processes only ever add time)."""
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize(device)
        times, spent = [], 0.0
        while spent < min_run_time or len(times) < 3:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
            spent += times[-1]
        return float(torch.tensor(times).median())
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return float(min(timer.blocked_autorange(min_run_time=min_run_time).times))


def _peak_memory(fn: Callable, device: torch.device) -> float:
    """Peak bytes allocated by torch during ``fn()`` above what was allocated before it.

    CUDA: the caching allocator's statistics. CPU: the allocation timeline of the torch profiler
    (``profile_memory=True``); NaN when the profiler cannot give one.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]"
        )
    except Exception:  # private profiler API: keep the table even where it changes
        return float("nan")
    peak = level = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return float(peak)


def _tokens_per_layer(model, run: Callable) -> list[int]:
    """Tokens each LLM decoder layer computes on during ``run()`` (first call of each layer).

    Read at the layer's MLP input: in-LLM methods shorten the sequence inside a layer's wrapped forward,
    so the layer's own input can still be the longer one.
    """
    layers = model.model.language_model.layers
    seen: dict[int, int] = {}

    def hook(i):
        def pre(module, args):
            seen.setdefault(i, int(args[0].shape[1]))

        return pre

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return [seen.get(i, 0) for i in range(len(layers))]


def _vision_inputs(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (vision layer -2, CLS dropped) and CLS saliency (layer -2, summed over heads), per crop.

    What the patched model hands to ``scope.prune``; used to time the selection on real features.
    """
    pixels = inputs["pixel_values"]
    if pixels.dim() == 5:  # LLaVA-NeXT: [B, crops, 3, H, W] -> crops of the first image
        pixels = pixels[0]
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    layer = layer if isinstance(layer, int) else layer[-1]
    with torch.no_grad():
        hidden = tower(pixels.to(model.dtype), output_hidden_states=True).hidden_states
        attn_layer = tower.encoder.layers[layer]
        h = attn_layer.layer_norm1(hidden[layer - 1])
        attn = attn_layer.self_attn
        heads, hd = attn.num_heads, attn.head_dim
        q = attn.q_proj(h[:, :1]).view(h.shape[0], 1, heads, hd).transpose(1, 2)
        k = attn.k_proj(h).view(h.shape[0], -1, heads, hd).transpose(1, 2)
        sal = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1).sum(1)[:, 0, 1:]
    return hidden[layer][:, 1:].float(), sal.float()


def _make_image(size: int):
    """A procedural MiniLLaVA scene (what the embedded model was trained on), else a drawn test card."""
    try:
        from scope.mini.scenes import make_scene, render

        image = render(make_scene(0))
        image = image[0] if isinstance(image, tuple) else image
        return image.convert("RGB").resize((size, size))
    except Exception:
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (size, size), (200, 200, 190))
        draw = ImageDraw.Draw(image)
        for i in range(6):
            x, y = (i * 37) % size, (i * 61) % size
            draw.ellipse([x, y, x + size // 4, y + size // 4], fill=(40 * i % 255, 90, 200 - 30 * i))
        return image


def _make_inputs(model, processor, question: str):
    image_size = model.config.vision_config.image_size
    size = image_size * 2 if _family(model.config) == "llava_next" else image_size
    image = _make_image(size)
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}, {"type": "text", "text": question}]
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
    else:  # LLaVA-1.5's template
        prompt = f"USER: {getattr(processor, 'image_token', '<image>')}\n{question} ASSISTANT:"
    return processor(images=image, text=prompt, return_tensors="pt")


def measure(
    model,
    inputs,
    method: str = "none",
    budget: int | None = None,
    min_run_time: float = 0.2,
    decode_tokens: int = 16,
    memory: bool = True,
    **options,
) -> dict:
    """Measure one prefill of ``model`` on ``inputs`` pruned by ``method`` at ``budget`` (None: unpruned).

    Patches with ``scope.patch`` for the duration and unpatches after. Returns visual tokens per LLM layer
    (from forward hooks), prefill latency (``model(**inputs)``, logits of the last position) and
    time-to-first-token (``generate(max_new_tokens=1)``) in ms, decode tokens/s (``decode_tokens`` more
    tokens), the selection's own time in ms on this image's real features (pre-LLM methods; it is part
    of the pruned prefill) and the prefill's peak memory (MiB; NaN with ``memory=False``). ``options``
    go to ``scope.patch``.
    """
    import scope

    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    n_input = int(inputs["input_ids"].shape[1])
    image_id = model.config.image_token_id if hasattr(model.config, "image_token_id") else None
    n_placeholders = int((inputs["input_ids"] == image_id).sum()) if image_id is not None else 0
    n_text = n_input - n_placeholders
    pruned = method != "none" and budget is not None
    if pruned:
        scope.patch(model, method=method, budget=budget, **options)
    try:
        with torch.inference_mode():

            def prefill():
                return model(**inputs, use_cache=True, logits_to_keep=1)

            def first_token():
                return model.generate(**inputs, max_new_tokens=1, do_sample=False)

            def decode():
                return model.generate(
                    **inputs,
                    max_new_tokens=decode_tokens + 1,
                    min_new_tokens=decode_tokens + 1,
                    do_sample=False,
                )

            per_layer = _tokens_per_layer(model, prefill)
            prefill_s = _timed(prefill, device, min_run_time)
            ttft_s = _timed(first_token, device, min_run_time)
            decode_s = _timed(decode, device, min_run_time)
            peak = _peak_memory(prefill, device) if memory else float("nan")
    finally:
        if pruned:
            scope.unpatch(model)
    select_s = float("nan")
    if pruned and method in PRE_LLM_METHODS:
        feats, sal = _vision_inputs(model, inputs)
        crops = feats.shape[0]
        per_crop = max(1, budget // crops)
        select_s = _timed(
            lambda: scope.prune(feats, sal, budget=per_crop, method=method), device, min_run_time / 2
        )
    visual = [n - n_text for n in per_layer]
    return {
        "method": method if pruned else "none",
        "budget": budget if pruned else n_placeholders,
        "text_tokens": n_text,
        "visual_in": visual[0],
        "visual_avg": sum(visual) / len(visual),
        "per_layer": visual,
        "prefill_ms": prefill_s * 1e3,
        "ttft_ms": ttft_s * 1e3,
        "decode_tok_s": decode_tokens / max(decode_s - ttft_s, 1e-9),
        "select_ms": select_s * 1e3,
        "peak_mem_mb": peak / 2**20,
    }


def default_model():
    """(model, processor, label): the embedded MiniLLaVA, or a tiny ``scope.testing`` model when it is missing."""
    import scope
    from scope.paths import MINILLAVA_DIR

    if (MINILLAVA_DIR / "config.json").exists():
        model, processor = scope.load()
        return model.eval(), processor, f"MiniLLaVA ({MINILLAVA_DIR.name}, embedded)"
    from scope.testing import tiny_llava

    # 96 px / patch 4 -> 576 visual tokens, LLaVA-1.5's count, on a random-weight ~40k-parameter model
    model, processor = tiny_llava(image_size=96, patch_size=4)
    return model.eval(), processor, "scope.testing.tiny_llava 96px/p4 (random weights; MiniLLaVA missing)"


def _scaled_budgets(n_visual: int) -> tuple[int, ...]:
    # the paper's 192/128/64 of 576 (and 640/320/160 of 2880): the same fractions of this model's N
    fractions = (192 / 576, 128 / 576, 64 / 576)
    return tuple(max(1, round(f * n_visual)) for f in fractions)


def latency_table(
    model=None,
    processor=None,
    budgets: Sequence[int] | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    min_run_time: float = 0.2,
    decode_tokens: int = 16,
    question: str = "Is there a red circle in the image?",
    memory: bool = True,
    label: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Measured prefill / TTFT / decode / memory / selection time per method x budget, plus unpruned.

    ``model=None`` takes :func:`default_model`. ``budgets=None`` scales the paper's 192/128/64 of 576 to
    the model's N. Columns: those of :func:`measure` plus ``speedup`` (unpruned prefill / pruned prefill),
    ``token_ratio`` (N / layer-averaged visual tokens), ``select_share`` (selection / pruned prefill) and,
    counted for this model's own config as in :func:`prefill_flops`, ``total_gflops`` and ``flops_ratio``
    (what the speed-up would be if time followed FLOPs).
    """
    from tqdm.auto import tqdm

    if model is None:
        model, processor, label = default_model()
    label = label or type(model).__name__
    inputs = _make_inputs(model, processor, question)
    base = measure(model, inputs, "none", None, min_run_time, decode_tokens, memory)
    n_visual = base["visual_in"]
    budgets = tuple(budgets) if budgets is not None else _scaled_budgets(n_visual)
    rows = [base]
    jobs = [(m, b) for b in budgets for m in methods]
    for method, budget in tqdm(jobs, desc="latency", disable=not progress):
        rows.append(measure(model, inputs, method, budget, min_run_time, decode_tokens, memory))
    df = pd.DataFrame(rows)
    df.insert(0, "model", label)
    df["speedup"] = base["prefill_ms"] / df.prefill_ms
    df["token_ratio"] = base["visual_avg"] / df.visual_avg
    df["select_share"] = df.select_ms / df.prefill_ms
    df["total_gflops"] = [_counted_gflops(model.config, r) for r in df.itertuples()]
    df["flops_ratio"] = df.total_gflops.iloc[0] / df.total_gflops
    return df


def _counted_gflops(config, row) -> float:
    """FLOPs of a measured row's prefill, counted on the meta copy of the model (NaN if layouts differ)."""
    try:
        budget = None if row.method == "none" else int(row.budget)
        n_visual = int(row.visual_in) if row.method == "none" or row.method in IN_LLM_METHODS else None
        counted = prefill_flops(config, row.method, budget, int(row.text_tokens), n_visual)
    except Exception:  # e.g. a LLaVA-NeXT image whose crops are not the 5 the counter assumes
        return float("nan")
    if counted["visual_avg"] != row.visual_avg:
        return float("nan")
    return counted["total_gflops"]


# --------------------------------------------------------------------------------------------------------
# command line: python -m scope.bench e2e
# --------------------------------------------------------------------------------------------------------

_FLOP_COLUMNS = [
    "model", "method", "budget", "visual_in", "visual_avg", "vision_gflops", "select_gflops", "saliency_gflops",
    "llm_gflops", "total_gflops", "flops_ratio", "llm_ratio", "token_ratio", "select_share", "kv_cache_mb",
    "select_ms_cpu",
]  # fmt: skip
_LATENCY_COLUMNS = [
    "method", "budget", "visual_in", "visual_avg", "prefill_ms", "ttft_ms", "decode_tok_s", "select_ms",
    "peak_mem_mb", "speedup", "token_ratio", "flops_ratio", "select_share",
]  # fmt: skip


def _print(df: pd.DataFrame, columns: list[str]) -> None:
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.max_rows", 500):
        print(df[columns].to_string(index=False, float_format=lambda x: f"{x:.4g}"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scope.bench e2e``: the FLOP table of the paper's models and the measured table."""
    parser = argparse.ArgumentParser(prog="python -m scope.bench e2e", description=main.__doc__)
    parser.add_argument(
        "--configs", nargs="+", default=list(PAPER_CONFIGS), help="names in data/configs or folders"
    )
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument(
        "--budgets", nargs="+", type=int, default=None, help="default: the paper's per family"
    )
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    parser.add_argument(
        "--model", default=None, help="model folder for the measured table (default: embedded)"
    )
    parser.add_argument(
        "--latency-budgets", nargs="+", type=int, default=None, help="default: paper ratios x N"
    )
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timed measurement")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the measured table (default 1: on a shared CPU, more threads spin against other "
        "processes and scatter the timings)",
    )
    parser.add_argument("--skip-flops", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument(
        "--csv", default=None, help="write CSV: PATH gets the FLOP table, PATH with -latency the other"
    )
    args = parser.parse_args(argv)
    known = set(PRE_LLM_METHODS) | set(IN_LLM_METHODS)
    for m in args.methods:
        if m not in known:
            raise SystemExit(f"--methods: unknown method {m!r}; choose from {sorted(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if not args.skip_flops:
        flops = flops_table(
            args.configs, args.budgets, args.methods, args.prompt_tokens, time_selection=True, progress=True
        )
        print(
            f"\n# Prefill FLOPs counted on the meta device (FlopCounterMode): 1 image + {args.prompt_tokens} "
            "text tokens; LLaVA-NeXT N = 5 x 576 = 2880 split evenly over crops; select = scope.prune on "
            "random tensors of the real dims + elementwise closed form (dense greedy: an upper bound of the "
            "lazy one); select_share = (select + saliency) / total; kv_cache_mb in fp16; select_ms_cpu = "
            "scope.prune per image on this CPU at the real dims."
        )
        _print(flops, _FLOP_COLUMNS)
        if args.csv:
            flops.to_csv(args.csv, index=False)
    if not args.skip_latency:
        if args.model:
            import scope

            model, processor = scope.load(args.model)
            model, label = model.eval(), str(args.model)
        else:
            model, processor, label = default_model()
        lat = latency_table(
            model,
            processor,
            args.latency_budgets,
            args.methods,
            args.min_run_time,
            args.decode_tokens,
            label=label,
            progress=True,
        )
        device = next(model.parameters()).device
        print(
            f"\n# Measured on {lat.model.iloc[0]}, {device.type}, {torch.get_num_threads()} threads, batch 1, "
            f"fastest block of torch.utils.benchmark (median of CUDA events on GPU); decode = {args.decode_tokens} "
            "tokens; "
            "select_share = scope.prune time on this image's features / pruned prefill."
        )
        _print(lat, _LATENCY_COLUMNS)
        if args.csv:
            path = Path(args.csv)
            lat.to_csv(path.with_name(path.stem + "-latency" + path.suffix), index=False)
    print(f"\n({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
