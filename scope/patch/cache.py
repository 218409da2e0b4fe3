"""Reuse the vision tower's outputs across the runs of a sweep: same model, same images, other methods.

A sweep evaluates one model on the same questions, in the same batches, once per method and budget. The
vision tower's work (features, CLS saliency, attention keys) is then the same in every run, and on a small
language model it is most of a pruned prefill. Inside ``with reuse_vision_features(model):`` the patched
model keeps what :func:`scope.patch.llava.vision_features` returned per batch of pixels and hands it back
when the same pixels come again, bit for bit the tensors the tower gave the first time.

Only for a model whose weights do not change inside the block (evaluation, not training).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable

import torch

__all__ = ["VisionCache", "reuse_vision_features", "cached_vision_features"]

_ATTR = "_scope_vision_cache"


class VisionCache:
    """Tower outputs by batch of pixels, up to ``max_bytes``; once full it keeps what it has.

    A sweep reads the same batches in the same order, run after run: evicting the oldest entry would make
    every lookup of the next run miss (each batch is evicted just before it comes again), while keeping the
    first batches makes those hit in every later run.
    """

    def __init__(self, max_bytes: int = 2 << 30):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes={max_bytes!r} must be > 0")
        self.max_bytes, self.bytes, self.hits, self.misses = int(max_bytes), 0, 0, 0
        self._store: dict[tuple, tuple[torch.Tensor, ...]] = {}

    @staticmethod
    def key(pixel_values: torch.Tensor, *settings) -> tuple:
        data = pixel_values.detach().contiguous().cpu()
        digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
        return (digest, tuple(data.shape), str(data.dtype), str(pixel_values.device), *settings)

    def get(self, key: tuple) -> tuple[torch.Tensor, ...] | None:
        value = self._store.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        return tuple(t.clone() for t in value)  # callers may not share the cached tensors

    def put(self, key: tuple, value: tuple[torch.Tensor, ...]) -> None:
        size = sum(t.numel() * t.element_size() for t in value)
        if self.bytes + size > self.max_bytes:
            return
        self._store[key] = tuple(t.clone() for t in value)
        self.bytes += size


@contextlib.contextmanager
def reuse_vision_features(model, max_bytes: int = 2 << 30):
    """Within the block, a patched ``model`` runs its vision tower once per distinct batch of pixels.

    Nested blocks share the outer cache. Yields the :class:`VisionCache` (``hits`` / ``misses`` tell how
    much was reused).
    """
    outer = model.__dict__.get(_ATTR)
    cache = outer if outer is not None else VisionCache(max_bytes)
    model.__dict__[_ATTR] = cache
    try:
        yield cache
    finally:
        if outer is None:
            model.__dict__.pop(_ATTR, None)


def cached_vision_features(model, pixel_values, settings: tuple, compute: Callable[[], tuple]) -> tuple:
    """``compute()``, or its stored result for these pixels and settings inside :func:`reuse_vision_features`."""
    cache = model.__dict__.get(_ATTR)
    if cache is None:
        return compute()
    key = cache.key(pixel_values, *settings)
    hit = cache.get(key)
    if hit is not None:
        return hit
    value = compute()
    cache.put(key, value)
    return value
