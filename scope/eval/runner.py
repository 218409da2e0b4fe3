"""The evaluation loop: prompts -> greedy generation -> per-sample JSONL -> metrics.

:func:`evaluate` runs one configuration (model x method x budget) on a list of tasks into a run directory
(layout and resume rules: :mod:`scope.eval.rundir`); :func:`sweep` runs many configurations with one loaded
model.

Under ``accelerate launch`` (or torchrun) every process takes the questions whose index is its rank modulo
the world size (accelerate's ``PartialState`` gives both), writes its own rank file, and the main process
merges after a barrier. Tests simulate ranks by passing ``rank`` and ``world_size`` explicitly.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from scope.eval.generate import build_prompt, generate_answers
from scope.eval.rundir import (
    RunLock,
    brief_config,
    git_commit,
    logged_records,
    merge_task,
    model_identity,
    open_run_dir,
    package_versions,
    read_results,
    repair_tail,
    score_records,
    write_json,
)
from scope.eval.tasks import Task, get_task, parse_tasks, prepare
from scope.eval.video_tasks import DEFAULT_JUDGE, check_judge, supports_video
from scope.methods import IN_LLM, NONE, UNPRUNED, get_method, is_unpruned
from scope.protocol import (
    HF,
    Protocol,
    applied,
    limited_pixels,
    pixel_limits,
    prepare_images,
    resolve_protocol,
    run_options,
)

# Fields of config.json that make a run's identity: every setting that can change an answer. A resumed run
# must agree on all of them (batch size: padding changes the arithmetic; dtype: the rounding).
IDENTITY = (
    "model",
    "revision",
    "method",
    "budget",
    "options",
    "limit",
    "seed",
    "max_new_tokens",
    "task_kwargs",
    "dtype",
    "batch_size",
    "protocol",
    "pixels",
    "judge",
)
# what a field missing from an older config.json meant (runs before protocols existed used the checkpoint's
# own processor and template; runs before the video judges had only rule-based scoring, i.e. "match")
IDENTITY_DEFAULTS = {"protocol": HF.name, "pixels": None, "judge": DEFAULT_JUDGE}


def _dist(rank: int | None, world_size: int | None):
    """(rank, world size, PartialState or None). Explicit values simulate ranks without processes."""
    if rank is not None or world_size is not None:
        rank, world_size = rank or 0, world_size or 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} must be in [0, world_size={world_size!r})")
        return rank, world_size, None
    state = partial_state()
    return state.process_index, state.num_processes, state


def partial_state():
    """accelerate's PartialState; several CPU processes (torchrun / accelerate launch --cpu) get the gloo
    group, which PartialState only sets up when asked for the CPU explicitly."""
    from accelerate import PartialState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or (
        world > 1 and not torch.cuda.is_available()
    )
    return PartialState(cpu=True) if cpu else PartialState()


def evaluate(
    model: Any,
    processor: Any,
    tasks: str | Sequence[str] = "synthbench",
    *,
    out_dir: str | Path,
    method: str | None = None,
    budget: int | float | None = None,
    options: dict[str, Any] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    seed: int = 0,
    model_id: str | None = None,
    protocol: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    datasets: dict[str, Any] | None = None,
    data_dir: str | None = None,
    task_kwargs: dict[str, dict] | None = None,
    judge: str = DEFAULT_JUDGE,
    overwrite: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate an already loaded model on ``tasks`` and write a run directory at ``out_dir``.

    Args:
        model, processor: a transformers LLaVA / LLaVA-NeXT model and its processor (e.g. from scope.load()).
        tasks: names of :data:`scope.eval.tasks.TASKS` (list or comma-separated), e.g. "synthbench,pope".
        method, budget, options: pruning for this run. The model is patched with
            ``scope.patch(model, method, budget, **options)`` for the run and unpatched afterwards; "none"
            evaluates the unpruned model; None evaluates the model as it is (and records it as given).
            ``budget``: tokens per image, or on Qwen-VL a float share of each image's tokens (0.25).
        limit: first ``limit`` questions of every task (SynthBench: a family-balanced prefix).
        batch_size, max_new_tokens: prompts per generate() call (left padding); generation length (default:
            the task's). seed: torch seed (and SynthBench's) for reproducibility; decoding is greedy.
        protocol: "paper" or "hf" (:func:`run_protocol`); under "paper" ``options`` update the authors'.
        min_pixels, max_pixels: native-resolution (Qwen-VL) processors resize every image between these
            areas for the run (None: the processor's own); config.json records the limits used (``pixels``).
        datasets, data_dir: {task name: dataset} used instead of loading (offline fixtures); local benchmark
            copies tried before the hub (:mod:`scope.eval.sources`).
        task_kwargs: {task name: kwargs for its loader}, e.g. {"synthbench": {"image_size": 384}}.
        judge: how video QA answers are scored (:mod:`scope.eval.video_tasks`): "match" (offline word match,
            metric ``match_acc``; not the paper's GPT judge), "openai" or "openai_authors" (the authors'
            GPT-3.5 judge at temperature 0 or at the API's default, ``gpt_acc`` / ``gpt_score``). Part of
            the run's identity. Video tasks need a Video-LLaVA model.
        overwrite: delete the run in out_dir (logs, results, config) and start afresh. Without it, a run
            already there resumes only if every field of :data:`IDENTITY` agrees (else ValueError).
        rank, world_size: simulate one process of a multi-process run (default: accelerate's PartialState).

    Arguments are checked before anything is written; a second process on the same out_dir is refused
    (:class:`scope.eval.rundir.RunLock`). Returns results.json's dict (complete on the main process only).
    """
    _check_sizes(batch_size, max_new_tokens)
    task_list = parse_tasks(tasks)
    _check_video(model, task_list, judge)
    datasets = {get_task(k).name: v for k, v in (datasets or {}).items()}
    out_dir = Path(out_dir)
    rank, world_size, state = _dist(rank, world_size)
    method, budget, options = _given_pruning(model, method, budget, options)
    proto = run_protocol(model, processor, model_id, protocol)
    options = run_options(proto, method, budget, model, options)  # what config.json records
    _check_pruning(model, method, budget, options)  # before anything is written
    with limited_pixels(processor, min_pixels, max_pixels):  # checks the limits before anything is written
        config = run_config(
            model, model_id, method, budget, options, limit, seed, max_new_tokens, task_kwargs
        )
        config.update(tasks=[t.name for t in task_list], batch_size=batch_size, world_size=world_size)
        config.update(protocol=proto.name, data_dir=data_dir, pixels=pixel_limits(processor))  # IDENTITY
        config.update(judge=judge)
        config.update(datasets_given=sorted(t.name for t in task_list if t.name in datasets))
        return _run(model, processor, task_list, config, datasets, out_dir, rank, state, progress, overwrite)


def _run(model, processor, task_list, config, datasets, out_dir: Path, rank, state, progress, overwrite):
    """:func:`evaluate` once its arguments are checked and ``config`` is complete."""
    is_main = rank == 0
    method, budget, options = config["method"], config["budget"], config["options"]
    proto = resolve_protocol(protocol=config["protocol"])
    lock = RunLock(out_dir) if is_main else None
    # the main process takes the directory; a refusal (another run there, another process on it) is
    # raised on every rank, not on the main one alone while the others wait at a barrier
    on_every_rank(state, (lambda: _open(lock, out_dir, config, overwrite)) if is_main else None)
    with lock if lock is not None else contextlib.nullcontext():
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config["seed"])
        t0 = time.perf_counter()
        results: dict[str, Any] = {"config": brief_config(config), "tasks": {}}
        with _pruning(model, method, budget, options), applied(processor, model, proto):
            for task in task_list:
                run_task = task.under(proto).judged(config["judge"])
                entry = _evaluate_task(
                    model, processor, run_task, config, datasets, out_dir, rank, state, progress
                )
                if is_main:
                    _add_equivalent_tokens(entry, model, method, budget, options or {})
                    results["tasks"][task.name] = entry
        results["elapsed_s"] = round(time.perf_counter() - t0, 2)
        if is_main:
            _write_results(out_dir / "results.json", results)
    return results


def _given_pruning(model: Any, method: str | None, budget: int | float | None, options: dict | None):
    """(method, budget, options) of the run: as given, or with no method what the model was patched with
    (e.g. by scope.load), so that config.json records it."""
    patched = getattr(model, "__dict__", {}).get("_scope")
    if method is None and patched is not None:
        return patched.method, patched.budget, dict(patched.options)
    return method, budget, options


def run_protocol(model: Any, processor: Any, model_id: str | None, protocol: str | None) -> Protocol:
    """The run's protocol: ``protocol``, else the one ``scope.load`` recorded on the processor, else the
    default for the checkpoint (:func:`scope.protocol.resolve_protocol`)."""
    chosen = protocol or getattr(processor, "scope_protocol", None)
    name = model_id or getattr(getattr(model, "config", None), "_name_or_path", None)
    return resolve_protocol(name, chosen)


def _check_video(model: Any, task_list: list[Task], judge: str) -> None:
    """Refuse an unknown judge, and video tasks on a model that takes no videos, naming both."""
    check_judge(judge)
    video = [t.name for t in task_list if t.video]
    if video and not supports_video(model):
        kind = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"tasks {video} are video QA, and model {type(model).__name__} (model_type {kind!r}) takes no "
            "videos; they run on Video-LLaVA (e.g. LanguageBind/Video-LLaVA-7B-hf)"
        )


def _check_sizes(batch_size: int, max_new_tokens: int | None) -> None:
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if value is None and name == "max_new_tokens":
            continue  # the task's own length
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")


def _open(lock: RunLock, out_dir: Path, config: dict, overwrite: bool) -> None:
    lock.acquire()
    try:
        if not overwrite:
            _check_given_datasets(out_dir, config)
        open_run_dir(out_dir, config, IDENTITY, overwrite, IDENTITY_DEFAULTS)
    except BaseException:
        lock.release()
        raise


def _check_given_datasets(out_dir: Path, config: dict) -> None:
    """Refuse to resume a task on data from another kind of source than the run there used: in-memory
    datasets (``datasets=``, ``--fixtures``) against ones loaded from their source. The logs are keyed by
    row index, so the resumed run would silently keep the other data's answers for its first rows. Sets
    ``config["datasets_given"]`` to the union over the run's tasks, as config.json records it."""
    path = out_dir / "config.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    given, old_given = set(config["datasets_given"]), set(old.get("datasets_given", []))
    clash = [t for t in config["tasks"] if t in old.get("tasks", []) and (t in given) != (t in old_given)]
    if clash:
        how = {True: "given in memory (datasets= / --fixtures)", False: "loaded from its source"}
        lines = "; ".join(f"{t}: {how[t in old_given]} there, {how[t in given]} now" for t in clash)
        raise ValueError(
            f"out_dir={str(out_dir)!r} holds a run on other data ({lines}); use a new out_dir or "
            "overwrite=True (--overwrite)"
        )
    config["datasets_given"] = sorted(given | (old_given - set(config["tasks"])))


def on_every_rank(state, main_step) -> None:
    """Run ``main_step()`` (given on the main process only); if it raises ValueError or RuntimeError, raise
    the same error on every process (the others learn of it through a broadcast instead of waiting at a
    barrier)."""
    failure = None
    if main_step is not None:
        try:
            main_step()
        except (ValueError, RuntimeError) as err:
            failure = (type(err).__name__, str(err))
            if state is None or state.num_processes == 1:
                raise
    if state is not None and state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        failure = broadcast_object_list([failure], from_process=0)[0]
        if failure is not None:
            raise (ValueError if failure[0] == "ValueError" else RuntimeError)(failure[1])


def _write_results(path: Path, results: dict) -> None:
    # keep tasks of earlier calls into the same directory (same identity: checked when it was opened)
    old = read_results(path)
    results["tasks"] = {**old.get("tasks", {}), **results["tasks"]}
    write_json(path, results)


def run_config(model, model_id, method, budget, options, limit, seed, max_new_tokens, task_kwargs) -> dict:
    """What config.json records of a run: its identity (:data:`IDENTITY`) and how to trace it."""
    name, revision = model_identity(model, model_id)
    return {
        "model": name,
        "revision": revision,
        "method": None if method is None else get_method(method).name,  # aliases recorded by their name
        "budget": None if is_unpruned(method) and method is not None else budget,
        "options": dict(options or {}),
        "limit": limit,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "task_kwargs": task_kwargs or {},
        "tasks": [],
        "batch_size": None,
        "world_size": None,
        "dtype": str(getattr(model, "dtype", "")),
        "device": str(getattr(model, "device", "")),
        "model_class": type(model).__name__,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _check_pruning(model: Any, method: str | None, budget: int | None, options: dict) -> None:
    """Refuse a bad method, budget or option before the run directory is touched."""
    if method is None:
        return
    record = get_method(method)
    if record.stage == NONE:
        if options:
            raise ValueError(f"method {method!r} takes no options, got {sorted(options)}")
        return
    from scope.patch import check

    check(model, method, budget, **options)


def _evaluate_task(
    model, processor, task: Task, config: dict, datasets, out_dir: Path, rank, state, progress
):
    """Answer this process's share of ``task``'s questions, then (main process) merge and score them."""
    limit, seed, world_size = config["limit"], config["seed"], config["world_size"]
    if task.name in datasets:
        docs = prepare(task, datasets[task.name], limit, config["data_dir"])
    else:
        kwargs = config["task_kwargs"].get(task.name, {})
        docs = task.load(limit=limit, seed=seed, data_dir=config["data_dir"], **kwargs)
    n = len(docs)
    logged = logged_records(out_dir, task.name)
    check_logged_questions(task, docs, logged, out_dir)
    done = set(logged)
    # Shard the full index range, not the remaining list: every process then agrees on who owns which
    # question whatever the others have already logged, and a resume with another world size still
    # covers every index exactly once.
    mine = [i for i in range(rank, n, world_size) if i not in done]
    batch, mnt = config["batch_size"], config["max_new_tokens"]
    proto, show = config["protocol"], progress and rank == 0
    _run_task(model, processor, task, docs, mine, out_dir, rank, batch, mnt, show, proto)
    if state is not None:
        state.wait_for_everyone()
    if rank != 0:
        return None
    return score_records(task, merge_task(out_dir, task.name), n)


def check_logged_questions(
    task: Task, docs, logged: dict[int, dict], out_dir: Path, n_checks: int = 64
) -> None:
    """Refuse to resume when the questions under the logged indices are not the ones answered before.

    A run resumes by dataset index, so a dataset that changed between sessions (another source or
    ``data_dir``, a new version on the hub, videos added to or removed from a local copy) would pair old
    answers with new questions. The identity in ``config.json`` cannot see that; the logged question ids
    can. Up to ``n_checks`` logged indices, spread over the range (the last included), are compared: reading
    a question can decode its image, so not all of them."""
    if not logged:
        return
    idxs = sorted(logged)
    step = max(1, len(idxs) // n_checks)
    for i in sorted(set(idxs[::step]) | {idxs[-1]}):
        was = logged[i].get("qid")
        now = (task.qid(docs[i]) or f"{task.name}-{i}") if i < len(docs) else None
        if was is not None and was != now:
            raise ValueError(
                f"{out_dir}: {task.name} question {i} was {was!r} when this run was logged and is {now!r} in "
                f"the dataset loaded now ({len(docs)} questions): the data changed since the run started "
                "(source, data_dir, missing files). Resume with the same data, or start a new run "
                "(another out_dir, or overwrite=True)"
            )


def _add_equivalent_tokens(
    entry: dict, model: Any, method: str | None, budget: int | None, options: dict
) -> None:
    """Record the visual tokens per LLM layer, averaged over the layers (the number the paper compares across
    methods): the tokens entering the LLM for the unpruned model and pre-LLM methods; for in-LLM methods
    (FastV, PDrop), which feed the LLM every visual token and drop them inside it, their schedule's mean."""
    from scope.patch import equivalent_tokens

    if entry.get("mean_kept_tokens") is None:
        return
    if method is None or get_method(method).stage != IN_LLM:
        entry["equivalent_tokens"] = entry["mean_kept_tokens"]
        return
    cfg = getattr(model.config, "text_config", model.config)
    n_visual = round(entry["mean_kept_tokens"])
    entry["equivalent_tokens"] = equivalent_tokens(method, budget, n_visual, cfg.num_hidden_layers, **options)


@contextlib.contextmanager
def _pruning(model: Any, method: str | None, budget: int | None, options: dict):
    from scope.patch import is_patched, patch, unpatch

    if method is None or (
        is_patched(model)
        and (model._scope.method, model._scope.budget, model._scope.options) == (method, budget, options)
    ):
        yield  # as given (already patched as asked, or not asked to change anything)
        return

    # a model from scope.load(method=...) arrives patched: switch for this run, restore afterwards
    before = model._scope if is_patched(model) else None
    unpatch(model)
    try:
        if is_unpruned(method):
            yield
        else:
            patch(model, method=method, budget=budget, **options)
            try:
                yield
            finally:
                unpatch(model)
    finally:
        if before is not None:
            patch(model, method=before.method, budget=before.budget, **before.options)


def _run_task(
    model,
    processor,
    task: Task,
    docs,
    todo: list[int],
    out_dir: Path,
    rank: int,
    batch_size: int,
    max_new_tokens,
    progress: bool,
    protocol: str = HF.name,
) -> None:
    from tqdm.auto import tqdm

    path = out_dir / "samples" / f"{task.name}.rank{rank}.jsonl"
    repair_tail(path)
    mnt = max_new_tokens or task.max_new_tokens
    bar = tqdm(total=len(todo), desc=task.name, disable=not progress, unit="q")
    with path.open("a") as f:
        for start in range(0, len(todo), batch_size):
            idxs = todo[start : start + batch_size]
            batch = [docs[i] for i in idxs]
            # a video task's "images" are its video's frames, which the protocol leaves as they are
            imgs = [
                task.images(d) if task.video else prepare_images(processor, task.images(d), protocol)
                for d in batch
            ]
            questions = [task.prompt(d) for d in batch]
            prompts = [
                build_prompt(processor, q, len(im), protocol, task.video) for q, im in zip(questions, imgs)
            ]
            preds, kept = generate_answers(model, processor, prompts, imgs, mnt, videos=task.video)
            for i, d, q, p, k in zip(idxs, batch, prompts, preds, kept):
                rec = {
                    "idx": i,
                    "qid": task.qid(d) or f"{task.name}-{i}",
                    "prompt": q,
                    "prediction": p,
                    "answer": task.target(d),
                }
                rec.update(task.score(d, p))
                rec["kept_tokens"] = k
                rec.setdefault(task.unit, i)  # the bootstrap unit defaults to the sample itself
                f.write(json.dumps(rec, default=str) + "\n")
            f.flush()  # a crash loses at most the batch in flight
            bar.update(len(idxs))
    bar.close()


def sweep(
    model: Any,
    processor: Any,
    tasks: str | Sequence[str] = "synthbench",
    *,
    out_root: str | Path,
    methods: Sequence[str] = ("scope",),
    budgets: Sequence[int | float] = (64,),
    include_unpruned: bool = True,
    **kwargs: Any,
) -> dict[str, dict]:
    """Evaluate every method x budget (plus the unpruned model once) with one loaded model.

    Re-patching a loaded model takes milliseconds, reloading it takes seconds to minutes: notebooks sweep
    through this. The vision tower runs once per batch of images for all the runs
    (:func:`scope.patch.reuse_vision_features`): the runs see the same batches, so nothing changes but time.
    Each combination gets its own run directory ``out_root/<method>-<budget>`` (``none`` for the unpruned
    one; a share keeps its decimal point: ``scope-0.25``), so interrupted sweeps resume per combination.
    Returns {run name: results}.
    """
    out_root = Path(out_root)
    runs: list[tuple[str, str, int | float | None]] = []
    if include_unpruned:
        runs.append((UNPRUNED, UNPRUNED, None))
    runs += [(f"{m}-{b}", m, b) for m in methods if not is_unpruned(m) for b in budgets]
    out = {}
    from scope.patch import reuse_vision_features

    with reuse_vision_features(model):  # every run sees the same batches of pixels: run the tower once
        for name, m, b in runs:
            kw = {**kwargs, "options": {}} if is_unpruned(m) else kwargs  # method options are not its
            out[name] = evaluate(model, processor, tasks, out_dir=out_root / name, method=m, budget=b, **kw)
    return out
