"""What pruning buys, counted the same way for every method (the measured half: :mod:`scope.latency`).

* **Counted** (:func:`flops_table`): the paper's models are built on the meta device from their published
  configs (``data/configs``; no weights, no memory) and every matmul of a prefill is counted with
  :class:`torch.utils.flop_counter.FlopCounterMode`: vision tower, the selection itself, projector, and the
  LLM layer by layer with the tokens alive in that layer. Pre-LLM methods (SCOPE, VisionZip, ...) feed K
  visual tokens to every layer; in-LLM methods (FastV, PDrop) feed all N to the first layers and fewer
  later, so they are counted with their real per-layer token counts and also shown as a layer-averaged
  token count. The selection's elementwise work, which FlopCounterMode does not see (it counts
  matmul / conv / attention only), is added from the closed form in each method's registry record (:mod:`scope.methods`).

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

``python -m scope.bench e2e`` prints this table and the measured one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from scope.methods import COMPARED, IN_LLM, NONE, PRE_LLM, UNPRUNED, get_method
from scope.paths import CONFIGS_DIR

__all__ = [
    "PAPER_CONFIGS",
    "PAPER_BUDGETS",
    "DEFAULT_METHODS",
    "PROMPT_TOKENS",
    "load_config",
    "gflops_fields",
    "kv_cache_mb",
    "meta_model",
    "count_flops",
    "family",
    "visual_layout",
    "token_schedule",
    "llm_flops",
    "llm_layer_flops_closed_form",
    "vision_flops",
    "projector_flops",
    "saliency_flops",
    "ranking_flops",
    "selection_flops",
    "prefill_flops",
    "flops_table",
]

PAPER_CONFIGS = ("llava-1.5-7b", "llava-v1.6-vicuna-7b", "llava-1.5-13b", "llava-v1.6-vicuna-13b")
DEFAULT_METHODS = COMPARED  # SCOPE, the strongest pre-LLM baselines and both in-LLM baselines
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


def family(config) -> str:
    """ "llava_next" or "llava": how the config's images become visual tokens."""
    return "llava_next" if getattr(config, "model_type", "") == "llava_next" else "llava"


def visual_layout(config) -> tuple[int, int]:
    """(crops, tokens per crop) of one image: (1, 576) for LLaVA-1.5, (5, 576) for LLaVA-NeXT."""
    v = config.vision_config
    per_crop = (v.image_size // v.patch_size) ** 2
    return (5 if family(config) == "llava_next" else 1), per_crop


def _text_parts(model):
    """(decoder layers, rotary embedding, final norm, lm_head) of a LLaVA-style model."""
    lm = model.model.language_model
    return lm.layers, lm.rotary_emb, lm.norm, model.lm_head


# --------------------------------------------------------------------------------------------------------
# per-layer token counts
# --------------------------------------------------------------------------------------------------------


def token_schedule(method: str, budget: int | None, n_visual: int, n_layers: int, **options) -> list[int]:
    """Visual tokens alive in each of the ``n_layers`` LLM layers for one image of ``n_visual`` tokens.

    The method record's ``tokens_per_layer``: the unpruned model (or a pre-LLM method without a budget)
    keeps N everywhere; pre-LLM methods ``budget`` everywhere (LLaVA-NeXT's per-crop split is applied by
    the caller); in-LLM methods exactly the schedule :mod:`scope.patch.in_llm` runs, so counted and
    measured numbers describe the same baseline (FastV: N in layers < ``layer``, then ``budget``; PDrop: N
    until its first stage end, then ``budget``, ``budget * ratio``, ...).
    """
    record = get_method(method)
    if record.stage != NONE and budget is not None and not 1 <= budget <= n_visual:
        raise ValueError(f"budget must be in [1, {n_visual}], got {budget}")
    return [int(c) for c in record.tokens_per_layer(budget, n_visual, n_layers, options)]


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


@functools.lru_cache(maxsize=512)
def selection_flops(
    method: str, budget: int, crops: int = 1, n: int = 576, d: int = 1024, seed: int = 0
) -> dict:
    """FLOPs of one image's selection: ``scope.prune`` on random ``[crops, n, d]`` features of the real dims.

    ``budget`` is split evenly over the crops (floor(budget / crops) each). Returns ``{"counted": matmul
    FLOPs seen by FlopCounterMode, "elementwise": the record's ``selection_flops`` closed form for all
    crops, "total": their sum}``. In-LLM methods have no separate selection (their ranking row is counted in
    :func:`prefill_flops`): zeros.
    """
    record = get_method(method)
    if record.stage != PRE_LLM:
        return {"counted": 0, "elementwise": 0, "total": 0}
    import scope

    per_crop = budget // crops
    if per_crop < 1:
        raise ValueError(f"budget {budget} is smaller than the {crops} crops it is split over")
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(crops, n, d, generator=gen)
    sal = torch.rand(crops, n, generator=gen).softmax(-1)
    counted = count_flops(scope.prune, feats, sal, budget=per_crop, method=method)
    closed_form = record.selection_flops
    elementwise = crops * closed_form(n, per_crop, d) if closed_form is not None else 0
    return {"counted": counted, "elementwise": elementwise, "total": counted + elementwise}


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
    record = get_method(UNPRUNED if budget is None else method)
    model = meta_model(config)
    crops, per_crop = visual_layout(config)
    n_visual = crops * per_crop if n_visual is None else int(n_visual)
    n_layers = config.text_config.num_hidden_layers
    # a selection on the projector's output (DivPrune as its authors run it) projects every token and, on
    # LLaVA-NeXT, selects once over the whole image instead of floor(K / crops) per crop
    on_projected = record.stage == PRE_LLM and record.selects_projected(options)
    if record.stage == PRE_LLM:
        entering = budget if on_projected else crops * (budget // crops)
        schedule = token_schedule(record.name, entering, n_visual, n_layers, **options)
    else:  # the unpruned model and in-LLM methods feed the LLM every visual token
        entering = n_visual
        schedule = token_schedule(record.name, budget, n_visual, n_layers, **options)
    llm = llm_flops(model, [prompt_tokens + s for s in schedule])
    sal = saliency_flops(model, crops) if record.needs_saliency(options) else 0
    if on_projected:
        sel = selection_flops(record.name, budget, 1, n_visual, config.text_config.hidden_size)["total"]
    elif record.stage == PRE_LLM:
        sel = selection_flops(record.name, budget, crops, per_crop, config.vision_config.hidden_size)["total"]
    elif record.stage == IN_LLM:
        # their ranking: the last token's attention row, recomputed before every drop (counted as the in-LLM
        # methods' "selection")
        drops = [i for i in range(1, n_layers) if schedule[i] < schedule[i - 1]]
        sel = sum(ranking_flops(model, prompt_tokens + schedule[i - 1]) for i in drops)
    else:
        sel = 0
    vis = vision_flops(model, crops)
    proj = projector_flops(model, n_visual if on_projected else entering)
    return {
        "model": getattr(config, "_name_or_path", "") or "",
        "method": record.name,
        "budget": budget if budget is not None else n_visual,
        "prompt_tokens": prompt_tokens,
        "visual_in": entering,
        "visual_avg": sum(schedule) / n_layers,
        "per_layer": schedule,
        **gflops_fields(vis, sal, sel, llm, projector=proj),
        "kv_cache_mb": kv_cache_mb(config.text_config, [prompt_tokens + n for n in schedule]),
    }


def gflops_fields(
    vision: float, saliency: float, select: float, llm: float, projector: float | None = None
) -> dict:
    """The FLOP columns of a prefill row, in GFLOPs: each part (``projector`` left out when None: a tower
    that merges its own tokens), their total, and the selection's share of it (saliency included)."""
    parts = {"vision": vision, "saliency": saliency, "select": select}
    if projector is not None:
        parts["projector"] = projector
    parts["llm"] = llm
    total = sum(parts.values())
    return {
        **{f"{k}_gflops": v / 1e9 for k, v in parts.items()},
        "total_gflops": total / 1e9,
        "select_share": (saliency + select) / total,
    }


def kv_cache_mb(text_config, tokens_per_layer: Sequence[int]) -> float:
    """The KV cache a prefill leaves for decoding, in MiB at 16 bits: K and V of every layer's tokens."""
    t = text_config
    d_kv = (getattr(t, "num_key_value_heads", None) or t.num_attention_heads) * (
        t.hidden_size // t.num_attention_heads
    )
    return sum(2 * n * d_kv * 2 for n in tokens_per_layer) / 2**20


def flops_table(
    configs: Sequence = PAPER_CONFIGS,
    budgets: Sequence[int] | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    prompt_tokens: int = PROMPT_TOKENS,
    progress: bool = False,
) -> pd.DataFrame:
    """Prefill FLOPs of each config (name, folder or config) x method x budget, plus the unpruned row.

    ``budgets=None`` uses the paper's budgets of each family (192/128/64 for LLaVA-1.5, 640/320/160 for
    LLaVA-NeXT). Columns: those of :func:`prefill_flops` plus ``flops_ratio`` (unpruned / pruned total),
    ``llm_ratio`` (the same for the LLM alone) and ``token_ratio`` (N / layer-averaged visual tokens).
    """
    from tqdm.auto import tqdm

    rows = []
    for cfg in configs:
        config = load_config(cfg)
        name = cfg if isinstance(cfg, str) else getattr(config, "_name_or_path", "model")
        own = budgets if budgets is not None else PAPER_BUDGETS[family(config)]
        jobs = [(UNPRUNED, None)] + [(m, b) for b in own for m in methods]
        for method, budget in tqdm(jobs, desc=f"FLOPs {Path(str(name)).name}", disable=not progress):
            row = prefill_flops(config, method, budget, prompt_tokens)
            row["model"] = Path(str(name)).name
            rows.append(row)
    df = pd.DataFrame(rows)
    base = df[df.method == UNPRUNED].set_index("model")
    df["flops_ratio"] = df.model.map(base.total_gflops) / df.total_gflops
    df["llm_ratio"] = df.model.map(base.llm_gflops) / df.llm_gflops
    df["token_ratio"] = df.model.map(base.visual_avg) / df.visual_avg
    return df
