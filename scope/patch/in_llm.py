"""In-LLM baselines: FastV and PyramidDrop (PDrop) on the language model of a transformers LLaVA model.

Both drop rows of the hidden states between decoder layers, ranked by the attention that the last prompt
token pays to the image tokens:

- FastV (Chen et al., ECCV 2024): before layer ``K`` (default 2) keep, per image, the ``budget`` visual
  tokens with the highest attention from the last token in layer ``K - 1`` (mean over heads). Kept tokens
  keep their original RoPE positions (FastV's ``position_ids = keep_indexs``).
- PDrop (Xing et al., CVPR 2025): stages end at layers 8/16/24 of a 32-layer LLM (scaled to the depth:
  ``round(L * x / 32)``); at each stage end keep ``ratio`` (0.5) of the previous visual tokens, ranked by
  the last instruction token's attention in the *first layer of the next stage*, computed on that layer's
  input. Positions are renumbered compactly after each drop, as the reference does. ``budget`` (if not
  None) sets the count after the first drop; later stages keep ``int(budget * ratio ** s)``; with
  ``budget=None`` stage s keeps ``int(N * ratio ** s)`` as in the paper. ``stages=[(layer, keep), ...]``
  sets drop layers and absolute counts directly, as the SCOPE authors ran PDrop† (e.g. LLaVA-1.5 at 64:
  layers 2 / 6 / 16 keeping 66 / 30 / 17, about 64 visual tokens per layer on average).
- SparseVLM: its own ranking (text raters) and keep (token recycling) through a :class:`Stage`'s ``rank`` /
  ``reduce`` hooks, see :mod:`scope.patch.sparsevlm`.

How it runs inside transformers 5.x without giving up SDPA:

- only the one attention row needed (the last valid token's query against all keys) is recomputed, with
  the layer's own q/k projections and RoPE; the layers themselves keep their attention implementation;
- every decoder layer's ``forward`` is wrapped on the instance; the wrapper of a pruning layer packs the
  kept rows (left padding, per-row counts may differ) and swaps in a matching 4D mask, positions and RoPE
  tables for all later layers;
- KV cache: layers after a drop cache fewer keys. The per-stage validity mask and position shift are kept on
  the ``DynamicCache`` object itself, so each decoding step builds the right mask for each stage's shorter
  cache; ``generate()`` works unchanged (greedy, sampling, beams);
- the language model's output is scattered back to the input length (dropped rows are zeros), so
  ``logits[:, -1]`` and the text positions line up with the caller's ``input_ids``.

Token accounting: ``model._scope.last["visual_tokens_per_layer"]`` lists, per layer, the visual tokens per
row in the latest prefill; ``equivalent_tokens`` is their mean over layers, per image (the layer-averaged
count by which papers compare in-LLM and pre-LLM pruning).

``device_map`` models (layers on several GPUs): accelerate wraps each layer's forward to move its inputs,
and our wrapper runs outside that one, so it moves the hidden states, the call's masks / positions / RoPE
tables and its own bookkeeping to the layer's execution device itself. Tested with accelerate's hooks on
one device (CPU); not yet run across two GPUs.

Not supported: flash-attention / flex (needs masks per stage), static caches, ``inputs_embeds`` instead
of ``input_ids`` (image tokens cannot be located), ``output_hidden_states`` of pruned layers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.models.llama.modeling_llama import rotate_half  # RoPE as the Llama layers apply it

from scope.methods import IN_LLM, get_method, names

from .state import PatchState, left_pack

__all__ = ["install", "uninstall", "stage_plan", "fastv_plan", "pdrop_plan", "last_token_attention", "Stage"]

_CACHE_KEY = "_scope_in_llm"


# --------------------------------------------------------------------------------------------------------
# schedule: which layers drop, which layer scores, how many survive
# --------------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One drop point. ``rank`` / ``reduce`` let a method replace the last-token ranking and the top-k keep
    (SparseVLM, :mod:`scope.patch.sparsevlm`, rates by text raters and recycles pruned tokens):

    - ``rank(layer, hidden, cos_sin, run) -> scores [B, L]``: ``layer`` is the score layer, ``hidden`` its
      input, ``run`` the call's :class:`_Run` (current packing in ``valid`` / ``seg`` / ``orig``);
    - ``reduce(run, stage, scores, hidden) -> (src, valid, hidden)``: the packing of the next layer's rows
      (as :func:`scope.patch.state.left_pack` returns it) and the hidden states to gather them from.
    """

    layer: int  # first layer that sees the reduced sequence
    score_layer: int  # whose attention ranks the visual tokens
    keep: Callable[[int], int]  # visual tokens of an image of n_visual (original) tokens from this stage on
    rank: Callable | None = None
    reduce: Callable | None = None


def fastv_plan(budget: int | None, num_layers: int, layer: int = 2) -> list[Stage]:
    """FastV: before ``layer`` keep ``budget`` visual tokens per image, ranked by layer ``layer - 1``."""
    if not 1 <= layer < num_layers:
        raise ValueError(f"fastv layer must be an int in [1, {num_layers - 1}], got layer={layer!r}")
    if budget is None:
        raise ValueError("fastv needs a budget (visual tokens kept after its layer)")
    return [Stage(layer, layer - 1, lambda n: min(n, budget))]


def pdrop_plan(
    budget: int | None, num_layers: int, layers=None, ratio: float = 0.5, stages=None
) -> list[Stage]:
    """PDrop: drops at ``layers`` (default 8/16/24 of 32, scaled to the depth), each ranked by its own layer;
    stage s keeps ``int(budget * ratio ** s)`` (``budget=None``: ``int(N * ratio ** (s + 1))``).

    ``stages=[(layer, keep), ...]`` gives the drop layers and the visual tokens kept from each on instead
    (the authors' PDrop† settings, :data:`scope.methods.PDROP_PRESETS`); ``budget`` then only names the
    run, and ``layers`` / ``ratio`` must be left at their defaults.
    """
    if stages is not None:
        if layers is not None or ratio != 0.5:
            raise ValueError(
                f"pdrop takes stages or layers / ratio, not both (stages={stages!r}, layers={layers!r}, "
                f"ratio={ratio!r})"
            )
        pairs = [(int(b), int(k)) for b, k in stages]
        if pairs[-1][0] >= num_layers:
            raise ValueError(f"pdrop stage layers must be in [1, {num_layers - 1}], got stages={stages!r}")
        return [Stage(b, b, lambda n, k=k: min(n, k)) for b, k in pairs]
    if layers is None:
        layers = sorted({max(1, round(num_layers * x / 32)) for x in (8, 16, 24)})
    layers = list(layers)
    if layers[-1] >= num_layers:
        raise ValueError(f"pdrop layers must be increasing in [1, {num_layers - 1}], got layers={layers!r}")

    def keep(stage: int):
        if budget is None:
            return lambda n: max(1, int(n * ratio ** (stage + 1)))
        return lambda n: max(1, min(n, int(budget * ratio**stage)))

    return [Stage(b, b, keep(s)) for s, b in enumerate(layers)]


def stage_plan(method: str, budget: int | None, num_layers: int, options: dict) -> list[Stage]:
    """The drop points of in-LLM ``method`` for an LLM of ``num_layers`` layers; validates the options."""
    record = get_method(method)
    if record.stage != IN_LLM:
        raise ValueError(f"unknown in-LLM method {method!r}; choose one of {names(IN_LLM)}")
    return record.planner(budget, num_layers, **record.check_options(options))


# --------------------------------------------------------------------------------------------------------
# per-call state
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What one forward call knows while it walks through the layers."""

    image_mask: torch.Tensor | None  # [B, L] bool, prefill only
    attention_mask: torch.Tensor | None  # [B, L] 2D mask of the call
    prefill: bool
    pruned: bool = False
    stage: int = 0
    valid: torch.Tensor | None = None  # [B, Lp] real (non-pad) slots of the current packing
    seg: torch.Tensor | None = None  # [B, Lp] image run id of each slot, -1 for text
    orig: torch.Tensor | None = None  # [B, Lp] slot in the caller's sequence
    pos: torch.Tensor | None = None  # [B, Lp] RoPE positions of the current stage
    kwargs: dict[str, Any] = field(default_factory=dict)  # mask / positions / rope swapped into layers
    score_input: tuple | None = None  # FastV: (hidden_states, position_embeddings) of the score layer
    counts: list[torch.Tensor] = field(default_factory=list)
    kept_slots: list[torch.Tensor] = field(default_factory=list)  # per drop: [B, L] caller slots kept
    n_images: torch.Tensor | None = None
    first_seg: torch.Tensor | None = None  # seg / valid before any drop (original image runs)
    first_valid: torch.Tensor | None = None
    embeds: torch.Tensor | None = None  # [B, L, D] input of layer 0 (SparseVLM picks its raters there)
    memo: dict[str, Any] = field(default_factory=dict)  # what a Stage's rank computes once per call

    def to(self, device: torch.device) -> None:
        """Move every tensor of the run to ``device`` (layers of a ``device_map`` model live on several)."""
        for name, value in vars(self).items():
            setattr(self, name, _to(value, device))


def _to(value, device: torch.device):
    """Tensors (also inside tuples, lists and dicts) on ``device``; other values unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _layer_device(layer) -> torch.device:
    """Where ``layer`` computes: accelerate's execution device under a ``device_map``, else its weights'."""
    device = getattr(getattr(layer, "_hf_hook", None), "execution_device", None)
    if device is None:
        return next(layer.parameters()).device
    return device if isinstance(device, torch.device) else torch.device(device)


def _image_runs(image_mask: torch.Tensor) -> torch.Tensor:
    """Id of the contiguous image-token run each position belongs to (-1 for text); ids restart per row.

    One run is one image: processors write each image's placeholders as one block separated by text.
    """
    start = image_mask & ~torch.nn.functional.pad(image_mask, (1, 0))[:, :-1]
    run_id = start.long().cumsum(1) - 1
    return torch.where(image_mask, run_id, torch.full_like(run_id, -1))


def _mask_4d(valid_kv: torch.Tensor, q_len: int, attn_impl: str, dtype: torch.dtype) -> torch.Tensor:
    """Causal + padding mask ``[B, 1, q, kv]`` for queries that are the last ``q_len`` key slots.

    Every query may also see itself, so pad rows stay finite under SDPA (their outputs are never used).
    """
    B, kv = valid_kv.shape
    dev = valid_kv.device
    q_idx = torch.arange(kv - q_len, kv, device=dev)[:, None]
    k_idx = torch.arange(kv, device=dev)[None, :]
    allowed = (valid_kv[:, None, :] & (k_idx <= q_idx)[None]) | (k_idx == q_idx)[None]
    allowed = allowed[:, None]
    if attn_impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)


@torch.no_grad()
def last_token_attention(layer, hidden: torch.Tensor, cos_sin, valid: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention ``[B, L]`` of each row's last valid token in ``layer``, given its input.

    Recomputes one query row with the layer's own norm, projections and RoPE, so the layer itself can keep
    SDPA. Keys are masked to the row's valid slots (all are at or before the last valid token).
    """
    attn = layer.self_attn
    h = layer.input_layernorm(hidden)
    B, L, _ = h.shape
    hd = attn.head_dim
    last = (valid.long() * torch.arange(L, device=h.device)).argmax(1)  # [B]
    rows = torch.arange(B, device=h.device)
    cos, sin = cos_sin
    cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)
    q = attn.q_proj(h[rows, last]).view(B, -1, hd)  # [B, H, hd]
    k = attn.k_proj(h).view(B, L, -1, hd).transpose(1, 2)  # [B, Hkv, L, hd]
    q = q * cos[rows, last][:, None] + rotate_half(q) * sin[rows, last][:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention
    scores = torch.einsum("bhd,bhld->bhl", q.float(), k.float()) * attn.scaling
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return scores.softmax(-1).mean(1)  # [B, L]


def _cache_of(kwargs: dict):
    """The KV cache passed to a model or decoder layer: ``cache`` since transformers 5.24, before that
    ``past_key_values`` (both are read, so the patch works on either side of the rename)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


# --------------------------------------------------------------------------------------------------------
# the patch
# --------------------------------------------------------------------------------------------------------


class InLLMPatch:
    """Wrappers on the decoder layers of a LLaVA / LLaVA-NeXT language model that drop visual rows.

    A pre-hook on the model starts a :class:`_Run` per call; each wrapped layer reads it (prefill: drop at the
    stage layers and swap in the packed mask / positions / RoPE; decoding: the mask of its stage's shorter
    cache); a hook on the language model's output scatters the rows back to the caller's length.
    """

    def __init__(self, model, state: PatchState):
        self.model, self.state = model, state
        self.lm = model.model.language_model
        self.layers = self.lm.layers
        self.impl = model.config.text_config._attn_implementation
        if self.impl not in ("sdpa", "eager"):
            raise ValueError(
                f"{state.method} supports the sdpa and eager attention implementations, got {self.impl!r}; "
                "load the model with attn_implementation='sdpa'"
            )
        self.stages = stage_plan(state.method, state.budget, len(self.layers), state.options)
        self.compact = get_method(state.method).compact_positions
        self.by_layer = {s.layer: (i, s) for i, s in enumerate(self.stages)}
        self.score_layers = {s.score_layer for s in self.stages if s.score_layer != s.layer}
        self.image_token_id = model.config.image_token_id
        self.run: _Run | None = None
        self.hooks: list = []
        self.saved_forwards: list = []

    # ---- installing

    def install(self) -> None:
        model = self.model
        self.hooks.append(model.model.register_forward_pre_hook(self.on_model_call, with_kwargs=True))
        self.hooks.append(self.lm.register_forward_hook(self.on_lm_output, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self.saved_forwards.append((layer, layer.__dict__.get("forward")))
            layer.forward = self.wrap(i, layer.forward)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        for layer, previous in self.saved_forwards:
            if previous is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.__dict__["forward"] = previous
        self.hooks, self.saved_forwards, self.run = [], [], None

    # ---- per call

    def on_model_call(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = _cache_of(kwargs)
        empty = cache is None or cache.get_seq_length() == 0
        mask = None if input_ids is None else input_ids == self.image_token_id
        prefill = bool(empty and mask is not None and bool(mask.any()))
        self.run = _Run(mask if prefill else None, kwargs.get("attention_mask"), prefill)

    def wrap(self, i: int, orig_forward):
        # stage number of layer i: how many drop points are at or before it
        stage_of_i = sum(1 for s in self.stages if s.layer <= i)

        layer = self.layers[i]

        @functools.wraps(orig_forward)
        def forward(hidden_states, *args, **kwargs):
            run, cache = self.run, _cache_of(kwargs)
            device = _layer_device(layer)  # asked per call: the model may have moved since it was patched
            if hidden_states.device != device:  # a device_map model: this wrapper runs before accelerate's
                hidden_states = hidden_states.to(device)
                kwargs = {
                    k: _to(v, device) if k != "past_key_values" and k != "cache" else v
                    for k, v in kwargs.items()
                }
            if run is not None and run.valid is not None and run.valid.device != device:
                run.to(device)
            if run is not None and run.prefill:
                hidden_states = self.prefill_step(i, run, hidden_states, kwargs, cache)
            elif stage_of_i > 0 and cache is not None and stage_of_i in getattr(cache, _CACHE_KEY, {}):
                kwargs.update(self.decode_kwargs(i, stage_of_i, hidden_states, kwargs, cache))
            return orig_forward(hidden_states, *args, **kwargs)

        return forward

    def prefill_step(self, i: int, run: _Run, hidden: torch.Tensor, kwargs: dict, cache) -> torch.Tensor:
        """Layer i of a prefill: start the run, drop rows at a stage layer, swap in the current packing."""
        if i == 0:
            self.start(run, hidden, kwargs)
        if run.pruned:  # mask / positions / RoPE of the current (packed) stage
            kwargs.update(run.kwargs)
        if i in self.by_layer:
            stage_no, stage = self.by_layer[i]
            hidden = self.drop(i, stage_no, stage, hidden, kwargs, cache)
            kwargs.update(run.kwargs)
        if i in self.score_layers:  # after a drop here: a later stage may rate on this layer's reduced input
            run.score_input = (hidden, kwargs["position_embeddings"])
        run.counts.append(((run.seg >= 0) & run.valid).sum(1))
        return hidden

    def start(self, run: _Run, hidden: torch.Tensor, kwargs: dict) -> None:
        B, L, _ = hidden.shape
        am = run.attention_mask
        run.valid = torch.ones(B, L, dtype=torch.bool, device=hidden.device) if am is None else am.bool()
        run.seg = _image_runs(run.image_mask & run.valid)
        run.orig = torch.arange(L, device=hidden.device).expand(B, L)
        run.pos = kwargs["position_ids"].expand(B, L)
        run.n_images = (run.seg.amax(1) + 1).clamp(min=0)
        run.first_seg, run.first_valid = run.seg, run.valid
        run.embeds = hidden

    def keep_mask(self, run: _Run, stage: Stage, scores: torch.Tensor) -> torch.Tensor:
        """Valid text slots, plus each image's ``stage.keep`` best-scored visual slots."""
        keep = run.valid & (run.seg < 0)
        for b in range(scores.shape[0]):
            for r in range(int(run.n_images[b])):
                cand = (run.seg[b] == r).nonzero()[:, 0]
                if cand.numel() == 0:
                    continue
                n_orig = int((run.first_seg[b] == r).sum())
                k = min(cand.numel(), stage.keep(n_orig))
                keep[b, cand[scores[b, cand].topk(k).indices]] = True
        return keep

    def drop(self, i: int, stage_no: int, stage: Stage, hidden, kwargs: dict, cache) -> torch.Tensor:
        run = self.run
        h_in, cos_sin = (hidden, kwargs["position_embeddings"]) if stage.score_layer == i else run.score_input
        if stage.rank is None:
            scores = last_token_attention(self.layers[stage.score_layer], h_in, cos_sin, run.valid)
        else:
            scores = stage.rank(self.layers[stage.score_layer], h_in, cos_sin, run)
        if stage.reduce is None:
            src, valid = left_pack(self.keep_mask(run, stage, scores))
        else:
            src, valid, hidden = stage.reduce(run, stage, scores, hidden)
        hidden = hidden.gather(1, src[..., None].expand(-1, -1, hidden.shape[-1]))
        run.seg = torch.where(valid, run.seg.gather(1, src), torch.full_like(src, -1))
        run.orig = torch.where(valid, run.orig.gather(1, src), torch.full_like(src, -1))
        if self.compact:  # PDrop: compact positions, as the reference renumbers after each drop
            new_pos = (valid.long().cumsum(1) - 1).clamp(min=0)
            shift = run.first_valid.sum(1) - valid.sum(1)
        else:  # FastV keeps each token's original position
            new_pos = torch.where(valid, run.pos.gather(1, src), torch.zeros_like(src))
            shift = torch.zeros_like(valid.sum(1))
        run.valid, run.pos, run.pruned, run.stage = valid, new_pos, True, stage_no + 1
        kept = torch.zeros_like(run.first_valid)
        ok = valid & (run.orig >= 0)
        kept[torch.arange(kept.shape[0], device=kept.device)[:, None].expand_as(ok)[ok], run.orig[ok]] = True
        run.kept_slots.append(kept)
        run.kwargs = {
            "attention_mask": _mask_4d(valid, valid.shape[1], self.impl, hidden.dtype),
            "position_ids": new_pos,
            "position_embeddings": self.lm.rotary_emb(hidden, position_ids=new_pos),
        }
        if cache is not None:
            per_stage = getattr(cache, _CACHE_KEY, {})
            per_stage[stage_no + 1] = {"valid": valid, "shift": shift}
            setattr(cache, _CACHE_KEY, per_stage)
        return hidden

    def decode_kwargs(self, i: int, stage_no: int, hidden: torch.Tensor, kwargs: dict, cache) -> dict:
        """Mask, positions and RoPE of a decoding step in a layer whose cache holds a stage's kept keys."""
        info = _to(getattr(cache, _CACHE_KEY)[stage_no], hidden.device)
        B, q = hidden.shape[:2]
        past = cache.layers[self.layers[i].self_attn.layer_idx].get_seq_length()
        extra = past + q - info["valid"].shape[1]
        valid_kv = torch.cat([info["valid"], info["valid"].new_ones(B, extra)], dim=1)
        pos = kwargs["position_ids"].expand(B, q) - info["shift"][:, None]
        return {
            "attention_mask": _mask_4d(valid_kv, q, self.impl, hidden.dtype),
            "position_ids": pos,
            "position_embeddings": self.lm.rotary_emb(hidden, position_ids=pos),
        }

    def on_lm_output(self, module, args, kwargs, output):
        run, self.run = self.run, None  # per call: a later direct call of the language model must not see it
        if run is None or not run.prefill:
            return output
        run.to(output.last_hidden_state.device)
        counts = torch.stack(run.counts, 1)  # [B, layers]
        n_img = run.n_images.clamp(min=1)[:, None]
        self.state.last = {
            "visual_tokens_per_layer": counts,
            "equivalent_tokens": (counts.float().mean(1) / n_img[:, 0]).tolist(),
            "n_images": run.n_images.tolist(),
            "kept_slots": run.kept_slots,
            "stage_layers": [s.layer for s in self.stages],
        }
        if not run.pruned:
            return output
        h = output.last_hidden_state
        B, L = run.image_mask.shape
        full = h.new_zeros(B, L, h.shape[-1])
        rows = torch.arange(B, device=h.device)[:, None].expand_as(run.orig)
        ok = run.valid & (run.orig >= 0)
        full[rows[ok], run.orig[ok]] = h[ok]
        output.last_hidden_state = full
        return output


def install(model, state: PatchState) -> None:
    """Wrap the language model's decoder layers of ``model`` (LLaVA or LLaVA-NeXT) for FastV / PDrop."""
    patch = InLLMPatch(model, state)
    patch.install()
    state.saved = {"in_llm": patch}


def uninstall(model, state: PatchState) -> None:
    """Remove the hooks and layer wrappers ``install`` added."""
    patch = state.saved.get("in_llm")
    if patch is not None:
        patch.remove()
