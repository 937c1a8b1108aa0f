"""Opt-in reuse of results that depend only on the prototypes and the weights.

At inference the reprogramming layer's prototype side (the K and V projections of the S text
prototypes, or the factorized logits' prototype operand) and TimeLLM's prototypes themselves are
the same from one call to the next while nothing is trained. Recomputing them is correct always;
reusing them is correct only while none of their inputs changes, and some changes are invisible to
any check that does not read every value again: writes through ``.data``,
``torch.nn.utils.vector_to_parameters`` into storage of the same address, a tensor sharing memory
with a NumPy array written through NumPy. So reuse is explicit, as with
``torch.nn.utils.parametrize.cached()``: only inside a :func:`reuse_prototypes` block, where the
caller promises that no input changes in such a way.

    with torch.no_grad(), timellm_fast.reuse_prototypes() as reuse:
        for batch in loader:
            forecast = model(batch)
    reuse.hits, reuse.misses

Inside the block a value is still recomputed whenever a change autograd sees happens (an
optimizer step, load_state_dict, any in-place op: the version counter), the tensors are other
objects, or their storage, shape, strides, dtype or device differ. The block belongs to the thread
(and asyncio task) that entered it: a ContextVar, so other threads never see its values. Nothing is
reused where an autograd graph is needed, for inference tensors (they have no version counter) or
while torch.compile traces (the graph recomputes what it needs).
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch

__all__ = ["PrototypeReuse", "reuse_prototypes", "reused"]


class PrototypeReuse:
    """The values of one :func:`reuse_prototypes` block, per owner (a layer or model), with the
    fingerprints of the tensors each was computed from; ``hits`` / ``misses`` count lookups."""

    def __init__(self):
        self.hits = 0
        self.misses = 0
        # owner -> (fingerprints + extra, weak references to the tensors, value); the block holds its
        # owners for its own duration only
        self._entries: Dict[Any, Tuple[tuple, tuple, Any]] = {}

    @staticmethod
    def _fingerprint(t: torch.Tensor) -> tuple:
        return (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device)

    def get(self, owner: Any, tensors: Tuple[torch.Tensor, ...], extra: tuple, compute: Callable[[], Any]) -> Any:
        key = tuple(self._fingerprint(t) for t in tensors) + extra
        entry = self._entries.get(owner)
        if entry is not None:
            seen, refs, value = entry
            if seen == key and len(refs) == len(tensors) and all(r() is t for r, t in zip(refs, tensors)):
                self.hits += 1
                return value
        self.misses += 1
        value = compute()
        self._entries[owner] = (key, tuple(weakref.ref(t) for t in tensors), value)
        return value


_ACTIVE: contextvars.ContextVar[Optional[PrototypeReuse]] = contextvars.ContextVar("timellm_fast_reuse",
                                                                                    default=None)


@contextlib.contextmanager
def reuse_prototypes() -> Iterator[PrototypeReuse]:
    """Inside the block, prototype-side results are computed once and reused (module docstring).
    A nested block shares the outer one's values."""
    outer = _ACTIVE.get()
    if outer is not None:
        yield outer
        return
    reuse = PrototypeReuse()
    token = _ACTIVE.set(reuse)
    try:
        yield reuse
    finally:
        _ACTIVE.reset(token)


def reused(owner: Any, tensors: Tuple[torch.Tensor, ...], extra: tuple, compute: Callable[[], Any]) -> Any:
    """compute(), or inside a :func:`reuse_prototypes` block the value `owner` computed there before
    from the same unchanged `tensors` (and equal `extra`). The caller calls this only where no
    autograd graph is needed."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace a ContextVar
        return compute()
    reuse = _ACTIVE.get()
    if reuse is None or any(t.is_inference() for t in tensors):
        return compute()
    return reuse.get(owner, tensors, extra, compute)
