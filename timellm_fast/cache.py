"""One cache for results derived from tensors that may change in place (K/V projections,
Time-LLM's text prototypes): reused while every tensor they depend on is unchanged."""
from __future__ import annotations

import weakref
from typing import Any, Callable, Optional, Tuple

import torch


class TensorCache:
    """Holds one computed value while none of the tensors it was computed from has changed.

    A tensor counts as unchanged while it is the same live object (held by weak reference, so a
    new tensor that happens to reuse a freed address is never mistaken for it) with the same
    storage pointer, version counter (bumped by every in-place write: an optimizer step,
    load_state_dict), shape, strides, dtype and device. `extra` adds anything else the value
    depends on (a dtype, the autocast state). ``hits`` / ``misses`` count lookups.
    """

    def __init__(self):
        self.hits = 0
        self.misses = 0
        self._key: Optional[tuple] = None
        self._refs: tuple = ()
        self._value: Any = None

    @staticmethod
    def _fingerprint(t: torch.Tensor) -> tuple:
        return (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device)

    def __getstate__(self) -> dict:
        # weak references cannot be pickled (torch.save of a whole model); a copy starts cold
        state = dict(self.__dict__)
        state.update(_key=None, _refs=(), _value=None)
        return state

    def clear(self) -> None:
        self._key, self._refs, self._value = None, (), None

    def get(self, tensors: Tuple[torch.Tensor, ...], extra: tuple, compute: Callable[[], Any]) -> Any:
        if any(t.is_inference() for t in tensors):
            # inference tensors have no version counter, so in-place changes would go unseen
            self.misses += 1
            return compute()
        key = tuple(self._fingerprint(t) for t in tensors) + extra
        alive = len(self._refs) == len(tensors) and all(r() is t for r, t in zip(self._refs, tensors))
        if alive and key == self._key:
            self.hits += 1
            return self._value
        self.misses += 1
        self._value = compute()
        self._key = key
        self._refs = tuple(weakref.ref(t) for t in tensors)
        return self._value
