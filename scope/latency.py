"""What pruning buys, measured: latency, time to first token, decode speed, memory and selection time.

:func:`latency_table` patches a real (small) model with each method and budget and times its prefill
(``model(**inputs)``, logits of the last position), time to first token (``generate(max_new_tokens=1)``),
decoding, peak memory and the selection's own time, with :class:`torch.utils.benchmark.Timer` on CPU and
CUDA events on a GPU. Each row also carries the FLOPs :mod:`scope.efficiency` counts for the same prefill,
so a reader sees whether time follows FLOPs. ``python -m scope.bench e2e`` prints the table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch

from scope.efficiency import DEFAULT_METHODS, family, prefill_flops
from scope.eval.generate import build_prompt
from scope.methods import IN_LLM, NONE, PRE_LLM, UNPRUNED, get_method
from scope.patch import method_options

__all__ = [
    "synthetic_inputs",
    "selection_time",
    "measure",
    "latency_table",
    "default_model",
    "timed",
    "timed_repeats",
    "spread",
    "peak_memory",
]

REPEATS = 5  # timed repeats per latency: a median and a spread, not one number


def synthetic_inputs(n: int, batch: int, dim: int = 1024, kind: str = "clip-like", seed: int = 0):
    """Features and saliency shaped like LLaVA's vision layer -2 (CLS dropped).

    ``clip-like``: features drawn around 24 cluster centres (objects/background regions) with heavy-tailed
    saliency (softmax of scaled Gaussian logits), as CLIP's CLS attention is skewed (paper Fig. 1b).
    ``gaussian``: isotropic features and near-uniform saliency, the lazy greedy's worst case.
    """
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        feats = torch.randn(batch, n, dim, generator=gen)
        sal = torch.rand(batch, n, generator=gen).softmax(-1)
    elif kind == "clip-like":
        centres = torch.randn(batch, 24, dim, generator=gen)
        assign = torch.randint(0, 24, (batch, n), generator=gen)
        feats = centres.gather(1, assign[..., None].expand(-1, -1, dim)) + 0.7 * torch.randn(
            batch, n, dim, generator=gen
        )
        sal = (3.0 * torch.randn(batch, n, generator=gen)).softmax(-1)
    else:
        raise ValueError(f"kind must be 'clip-like' or 'gaussian', got {kind!r}")
    return feats, sal


def selection_time(
    method: str, budget: int, crops: int = 1, n: int = 576, d: int = 1024, min_run_time: float = 0.1
) -> float:
    """Milliseconds of ``scope.prune`` for one image at the real dims on this machine's CPU.

    Features drawn around cluster centres with skewed saliency (:func:`synthetic_inputs`,
    "clip-like"), since the lazy greedy's speed depends on the data; budget split over crops as above.
    """
    import scope

    feats, sal = synthetic_inputs(n, crops, dim=d)
    per_crop = budget // crops
    return 1e3 * timed(lambda: scope.prune(feats, sal, per_crop, method), torch.device("cpu"), min_run_time)


def timed(fn: Callable, device: torch.device, min_run_time: float) -> float:
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


def timed_repeats(
    fn: Callable, device: torch.device, min_run_time: float, repeats: int = REPEATS
) -> list[float]:
    """Seconds per call of ``fn()`` in each of ``repeats`` separate measurements of about ``min_run_time``
    seconds: the median of CUDA-event timings on a GPU, elsewhere the median block of
    torch.utils.benchmark.Timer's ``blocked_autorange``. Summarise with :func:`spread`."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be an int >= 1")
    if device.type == "cuda":
        return [timed(fn, device, min_run_time) for _ in range(repeats)]
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return [float(timer.blocked_autorange(min_run_time=min_run_time).median) for _ in range(repeats)]


def spread(times: Sequence[float]) -> dict[str, float]:
    """``median``, ``lo`` (fastest) and ``hi`` (slowest) of repeated timings, and ``n`` (how many)."""
    if len(times) == 0:
        raise ValueError("times is empty")
    t = torch.tensor([float(x) for x in times], dtype=torch.float64)
    # the mean of the two middle values for an even count (torch.median would take the lower one)
    return {"median": float(t.quantile(0.5)), "lo": float(t.min()), "hi": float(t.max()), "n": len(times)}


def peak_memory(fn: Callable, device: torch.device) -> float:
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
    """Features and CLS saliency of the first image's crops, exactly as the patched model hands them to
    ``scope.prune`` (:func:`scope.patch.llava.vision_features`); used to time the selection on real features."""
    from scope.patch.llava import vision_features

    pixels = inputs["pixel_values"]
    if pixels.dim() == 5:  # LLaVA-NeXT: [B, crops, 3, H, W] -> crops of the first image
        pixels = pixels[0]
    feats, sal, _ = vision_features(model, pixels.to(model.dtype))
    return feats.float(), sal.float()


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
    size = image_size * 2 if family(model.config) == "llava_next" else image_size
    image = _make_image(size)
    return processor(images=image, text=build_prompt(processor, question), return_tensors="pt")


def _selection_time(model, inputs, method, budget, options, min_run_time, repeats, pruned) -> dict:
    """The spread of a pre-LLM method's selection on this image's real features (NaN for the others)."""
    import scope

    nan = float("nan")
    if not pruned or get_method(method).stage != PRE_LLM:
        return {"median": nan, "lo": nan, "hi": nan}
    feats, sal = _vision_inputs(model, inputs)
    per_crop = max(1, budget // feats.shape[0])
    own = method_options(options)  # without the patch's own keep_newlines
    device = next(model.parameters()).device
    select = lambda: scope.prune(feats, sal, budget=per_crop, method=method, **own)  # noqa: E731
    return spread(timed_repeats(select, device, min_run_time, repeats))


def measure(
    model,
    inputs,
    method: str = UNPRUNED,
    budget: int | None = None,
    min_run_time: float = 0.2,
    decode_tokens: int = 16,
    memory: bool = True,
    repeats: int = REPEATS,
    **options,
) -> dict:
    """Measure one prefill of ``model`` on ``inputs`` pruned by ``method`` at ``budget`` (None: unpruned).

    Patches with ``scope.patch`` for the duration and unpatches after. Returns visual tokens per LLM layer
    (from forward hooks), prefill latency (``model(**inputs)``, logits of the last position) and
    time-to-first-token (``generate(max_new_tokens=1)``) in ms, decode tokens/s (``decode_tokens`` more
    tokens), the selection's own time in ms on this image's real features (pre-LLM methods; it is part
    of the pruned prefill) and the prefill's peak memory (MiB; NaN with ``memory=False``, which also keeps
    the CPU profiler, and what it prints, out of the run). Prefill, time to first token and selection are
    each timed ``repeats`` times (:func:`timed_repeats`, ``min_run_time`` seconds each): the median, and
    the fastest and slowest repeat as ``<name>_lo`` / ``<name>_hi``. ``options`` go to ``scope.patch``.
    """
    import scope

    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    n_input = int(inputs["input_ids"].shape[1])
    image_id = model.config.image_token_id if hasattr(model.config, "image_token_id") else None
    n_placeholders = int((inputs["input_ids"] == image_id).sum()) if image_id is not None else 0
    n_text = n_input - n_placeholders
    pruned = get_method(method).stage != NONE and budget is not None
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
            prefill_s = spread(timed_repeats(prefill, device, min_run_time, repeats))
            ttft_s = spread(timed_repeats(first_token, device, min_run_time, repeats))
            # the same statistic as ttft's (median of repeats): their difference is the decode time
            decode_s = spread(timed_repeats(decode, device, min_run_time, repeats))
            peak = peak_memory(prefill, device) if memory else float("nan")
    finally:
        if pruned:
            scope.unpatch(model)
    select_s = _selection_time(model, inputs, method, budget, options, min_run_time / 2, repeats, pruned)
    visual = [n - n_text for n in per_layer]
    timings = {
        f"{name}{end}": 1e3 * value[key]
        for name, value in (("prefill_ms", prefill_s), ("ttft_ms", ttft_s), ("select_ms", select_s))
        for end, key in (("", "median"), ("_lo", "lo"), ("_hi", "hi"))
    }
    return {
        "method": method if pruned else UNPRUNED,
        "budget": budget if pruned else n_placeholders,
        "text_tokens": n_text,
        "visual_in": visual[0],
        "visual_avg": sum(visual) / len(visual),
        "per_layer": visual,
        **timings,
        "repeats": repeats,
        "decode_tok_s": decode_tokens / max(decode_s["median"] - ttft_s["median"], 1e-9),
        "peak_mem_mb": peak / 2**20,
    }


def default_model():
    """(model, processor, label): the embedded MiniLLaVA (``scope.load()``), in eval mode."""
    import scope
    from scope.paths import MINILLAVA_DIR

    model, processor = scope.load()
    return model.eval(), processor, f"MiniLLaVA ({MINILLAVA_DIR.name}, embedded)"


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
    repeats: int = REPEATS,
) -> pd.DataFrame:
    """Measured prefill / TTFT / decode / memory / selection time per method x budget, plus unpruned.

    ``model=None`` takes :func:`default_model`. ``budgets=None`` scales the paper's 192/128/64 of 576 to
    the model's N. Columns: those of :func:`measure` (medians of ``repeats`` timings, with ``_lo`` / ``_hi``
    the fastest and slowest) plus ``speedup`` (unpruned median prefill / pruned median prefill; ``speedup_lo``
    / ``speedup_hi`` from the slowest / fastest pruned repeat), ``token_ratio`` (N / layer-averaged visual
    tokens), ``select_share`` (median selection / median pruned prefill) and,
    counted for this model's own config as in :func:`prefill_flops`, ``total_gflops`` and ``flops_ratio``
    (what the speed-up would be if time followed FLOPs).
    """
    from tqdm.auto import tqdm

    if model is None:
        model, processor, label = default_model()
    label = label or type(model).__name__
    inputs = _make_inputs(model, processor, question)
    base = measure(model, inputs, UNPRUNED, None, min_run_time, decode_tokens, memory, repeats)
    n_visual = base["visual_in"]
    budgets = tuple(budgets) if budgets is not None else _scaled_budgets(n_visual)
    rows = [base]
    jobs = [(m, b) for b in budgets for m in methods]
    for method, budget in tqdm(jobs, desc="latency", disable=not progress):
        rows.append(measure(model, inputs, method, budget, min_run_time, decode_tokens, memory, repeats))
    df = pd.DataFrame(rows)
    df.insert(0, "model", label)
    df["speedup"] = base["prefill_ms"] / df.prefill_ms
    df["speedup_lo"] = base["prefill_ms"] / df.prefill_ms_hi
    df["speedup_hi"] = base["prefill_ms"] / df.prefill_ms_lo
    df["token_ratio"] = base["visual_avg"] / df.visual_avg
    df["select_share"] = df.select_ms / df.prefill_ms
    df["total_gflops"] = [_counted_gflops(model.config, r) for r in df.itertuples()]
    df["flops_ratio"] = df.total_gflops.iloc[0] / df.total_gflops
    return df


def _counted_gflops(config, row) -> float:
    """FLOPs of a measured row's prefill, counted on the meta copy of the model (NaN if layouts differ)."""
    try:
        record = get_method(row.method)
        budget = None if record.stage == NONE else int(row.budget)
        n_visual = int(row.visual_in) if record.stage in (NONE, IN_LLM) else None
        counted = prefill_flops(config, row.method, budget, int(row.text_tokens), n_visual)
    except Exception:  # e.g. a LLaVA-NeXT image whose crops are not the 5 the counter assumes
        return float("nan")
    if counted["visual_avg"] != row.visual_avg:
        return float("nan")
    return counted["total_gflops"]
