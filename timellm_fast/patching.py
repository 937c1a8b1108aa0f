"""Swap Time-LLM's two eager layers for ours inside any model, in place, and back.

    summary = patch_model(model)     # [Replacement(name, old_class, new_class), ...]
    unpatch_model(model)             # the original module objects are back

The original project's classes are never imported: a module is recognized by its structure,
i.e. Time-LLM's class name (or our eager copies' in :mod:`timellm_fast.models`) *and* exactly
the submodules, parameters and settings the layer has in Time-LLM (docs/spec.md §1):

* ``PatchEmbedding``: ``value_embedding.tokenConv`` an ``nn.Conv1d(patch_len, d_model, 3,
  padding=1, padding_mode="circular", bias=False)``, int attributes ``patch_len`` and
  ``stride``, an ``nn.Dropout`` ``dropout``, optionally a replication ``padding_patch_layer``
  padding ``(0, stride)``; one parameter, no buffers.
* ``ReprogrammingLayer``: ``query/key/value/out_projection`` ``nn.Linear`` with bias and
  consistent shapes, int ``n_heads`` dividing the projection width, an ``nn.Dropout``
  ``dropout``; those eight parameters, no buffers.

The same classes ship, under the same names and with the same structure, in neuralforecast
(``neuralforecast.models.timellm``: both layers, its own ``ReplicationPad1d``) and in PyPOTS
(``pypots.nn.modules.timellm.layers.ReprogrammingLayer``, built with ``d_k`` for ``d_keys``);
tests/test_integrations.py patches the real packages' models. A module with the right class name
but another structure is left alone with a warning saying why: PatchTST's PatchEmbedding (a
linear ``value_embedding`` and a positional embedding), which PyPOTS's TimeLLM uses in place of
Time-LLM's, is one.

What is kept (documented contract):

* **The same submodule objects**: the new module is built on the meta device and takes over the
  old module's ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Dropout`` objects themselves, so their
  ``nn.Parameter`` objects, hooks, parametrizations and flags. An optimizer, an EMA, DDP /
  accelerate, or anything else already holding the parameters keeps working, device, dtype and
  ``requires_grad`` are exactly what they were, and the state-dict keys are unchanged
  (checkpoints load in either direction). Where those submodules carry hooks or wrappers, the
  new layer computes through their calls (its docstring), so they act as before.
* The train / eval flags of the replaced module and of each of its submodules (Monte-Carlo
  dropout: a Dropout in train() under an eval() model stays so).
* Not replaced, with a warning naming the module: a subclass (or instance) that overrides
  ``forward``, and a layer with hooks on itself or on Time-LLM's own helper modules inside it
  (``value_embedding``, ``padding_patch_layer``), whose objects a replacement does not keep.
* All or nothing: every replacement is built before any is swapped in; an error names the module.

Idempotent: our modules are never replaced again. ``unpatch_model`` puts the original objects
back (with whatever Parameter objects our modules hold at that time, and their train / eval
flag). Call ``patch_model`` before wrapping the model in DDP, FSDP or ``accelerator.prepare``.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from . import dispatch, validation
from .patch_embedding import PatchEmbedding, is_token_conv
from .reprogramming import ReprogrammingLayer

__all__ = ["Replacement", "patch_model", "unpatch_model"]

# where a replacement keeps the module it replaced: a plain attribute, set around
# nn.Module.__setattr__ so the original is not registered as a submodule (no duplicate state dict)
ORIGINAL_ATTR = "_timellm_fast_replaced_module"

PATCH_EMBEDDING_NAMES = ("PatchEmbedding", "EagerPatchEmbedding")
REPROGRAMMING_NAMES = ("ReprogrammingLayer", "EagerReprogrammingLayer")
OURS = (PatchEmbedding, ReprogrammingLayer)


class Replacement(NamedTuple):
    name: str  # qualified name in the model, e.g. "patch_embedding" or "encoder.layers.0"
    old_class: type
    new_class: type


class NotRecognized(Exception):
    """The module has the class name but not the structure; the message says what differs."""


def _only(module: nn.Module, children: set, optional: set = frozenset(), where: str = "") -> None:
    """NotRecognized unless `module`'s children are exactly `children` (plus any of `optional`);
    `where` names the module in the message when it is not the layer itself."""
    present = set(name for name, _ in module.named_children())
    missing, extra = children - present, present - children - optional
    if missing or extra:
        raise NotRecognized(f"{where + ' has ' if where else ''}submodules {sorted(present)}; expected "
                            f"{sorted(children)}" + (f" (optionally {sorted(optional)})" if optional else ""))


def _exact_state(module: nn.Module, parameter_names: set) -> None:
    names = set(name for name, _ in module.named_parameters())
    if names != parameter_names:
        raise NotRecognized(f"parameters {sorted(names)}; expected {sorted(parameter_names)}")
    buffers = [name for name, _ in module.named_buffers()]
    if buffers:
        raise NotRecognized(f"has buffers {buffers}; Time-LLM's layer has none")


def _int_attr(module: nn.Module, name: str) -> int:
    value = getattr(module, name, None)
    try:
        return validation.positive_int(name, value)
    except ValueError:
        raise NotRecognized(f"attribute {name!r} is {value!r}, not a positive int") from None


def _dropout_p(module: nn.Module) -> float:
    dropout = getattr(module, "dropout", None)
    if not isinstance(dropout, nn.Dropout):
        raise NotRecognized(f"'dropout' is {type(dropout).__name__}, not nn.Dropout")
    return dropout.p


def patch_embedding_arguments(module: nn.Module) -> dict:
    """Constructor arguments of a Time-LLM PatchEmbedding, read from its structure."""
    _only(module, {"value_embedding", "dropout"}, optional={"padding_patch_layer"})
    if "tokenConv" not in module.value_embedding._modules:
        # PatchTST's form (PyPOTS's TimeLLM uses it): patches projected by a Linear, another layer
        raise NotRecognized(f"value_embedding is {type(module.value_embedding).__name__}, not Time-LLM's "
                            f"TokenEmbedding (a circular Conv1d named tokenConv)")
    _only(module.value_embedding, {"tokenConv"}, where="value_embedding")
    _exact_state(module, {"value_embedding.tokenConv.weight"})
    conv = module.value_embedding.tokenConv
    if not isinstance(conv, nn.Conv1d):
        raise NotRecognized(f"value_embedding.tokenConv is {type(conv).__name__}, not nn.Conv1d")
    patch_len, stride = _int_attr(module, "patch_len"), _int_attr(module, "stride")
    if not is_token_conv(conv, patch_len):
        raise NotRecognized(f"tokenConv is {conv!r}; Time-LLM's has patch_len={patch_len} input channels, "
                            f"kernel 3, circular padding 1, unit stride and dilation, one group, no bias")
    pad = getattr(module, "padding_patch_layer", None)
    if pad is not None:
        if "Replication" not in type(pad).__name__:
            raise NotRecognized(f"padding_patch_layer is {type(pad).__name__}, not a replication pad")
        if tuple(getattr(pad, "padding", ())) != (0, stride):
            raise NotRecognized(f"padding_patch_layer pads {getattr(pad, 'padding', None)!r}, "
                                f"expected (0, stride) = (0, {stride})")
    return dict(d_model=conv.out_channels, patch_len=patch_len, stride=stride, dropout=_dropout_p(module))


def reprogramming_arguments(module: nn.Module) -> dict:
    """Constructor arguments of a Time-LLM ReprogrammingLayer, read from its structure."""
    projections = ("query_projection", "key_projection", "value_projection", "out_projection")
    _only(module, set(projections) | {"dropout"})
    _exact_state(module, {f"{p}.{w}" for p in projections for w in ("weight", "bias")})
    q, k, v, o = (getattr(module, p) for p in projections)
    for name, linear in zip(projections, (q, k, v, o)):
        if not isinstance(linear, nn.Linear) or linear.bias is None:
            raise NotRecognized(f"{name} is not an nn.Linear with bias")
    n_heads = _int_attr(module, "n_heads")
    width = q.out_features  # H*E
    d_llm = k.in_features
    if width % n_heads:
        raise NotRecognized(f"query_projection width {width} is not a multiple of n_heads={n_heads}")
    if not (k.out_features == v.out_features == o.in_features == width and v.in_features == o.out_features == d_llm):
        raise NotRecognized(f"projection shapes do not fit d_keys*n_heads={width}, d_llm={d_llm}: "
                            f"key {k.in_features}->{k.out_features}, value {v.in_features}->{v.out_features}, "
                            f"out {o.in_features}->{o.out_features}")
    return dict(d_model=q.in_features, n_heads=n_heads, d_keys=width // n_heads, d_llm=d_llm,
                attention_dropout=_dropout_p(module))


def _recognizer(module: nn.Module) -> Optional[Tuple[type, Callable[[nn.Module], dict], Optional[str]]]:
    """(our class, the reader of the constructor arguments, why it must stay) for a module whose
    class, or a base class of it, has one of Time-LLM's layer names; None for anything else.

    The reason to stay is set where the forward that runs is not the named class's own: a
    subclass (or the instance) overrides ``forward``, so replacing it would change what the model
    computes."""
    if isinstance(module, OURS):
        return None
    for base in reversed(type(module).__mro__):  # the named class nearest nn.Module: a user's subclass may share its name
        if base.__name__ in PATCH_EMBEDDING_NAMES:
            ours, read = PatchEmbedding, patch_embedding_arguments
        elif base.__name__ in REPROGRAMMING_NAMES:
            ours, read = ReprogrammingLayer, reprogramming_arguments
        else:
            continue
        own_forward = base.__dict__.get("forward")
        overridden = "forward" in module.__dict__ or (own_forward is not None and type(module).forward is not own_forward)
        why = (f"{type(module).__name__} overrides {base.__name__}.forward; replacing it would change what the "
               f"model computes") if overridden else None
        return ours, read, why
    return None


def _set_parameter(root: nn.Module, dotted: str, parameter: nn.Parameter) -> None:
    *path, leaf = dotted.split(".")
    owner = root
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, leaf, parameter)


def _move_parameters(src: nn.Module, dst: nn.Module) -> None:
    """Puts src's Parameter objects into dst under the same names (identical name sets)."""
    src_params = dict(src.named_parameters())
    dst_names = set(name for name, _ in dst.named_parameters())
    if set(src_params) != dst_names:
        raise RuntimeError(f"timellm_fast: cannot carry parameters from {type(src).__name__} to "
                           f"{type(dst).__name__}: {sorted(src_params)} vs {sorted(dst_names)}")
    for name, parameter in src_params.items():
        _set_parameter(dst, name, parameter)


#: torch's own module classes a replacement takes over from the module it replaces, objects and
#: all (their hooks, parametrizations, wrappers and train/eval flags with them)
ADOPTED = (nn.Linear, nn.Conv1d, nn.Dropout)


def _hooked(module: nn.Module) -> List[str]:
    """The names of `module` and of its submodules that are not torch's own classes (ADOPTED) and
    have hooks: those module objects are not kept by a replacement, so their hooks would be lost."""
    return [name or "(the layer itself)" for name, sub in module.named_modules()
            if not isinstance(sub, ADOPTED) and dispatch.has_hooks(sub)]


def _adopt_submodules(src: nn.Module, dst: nn.Module) -> None:
    """Puts src's nn.Linear / nn.Conv1d / nn.Dropout objects into dst in place of dst's under the
    same names: the replacement computes through the very modules the original called."""
    for name, sub in list(dst.named_modules()):
        if name and isinstance(sub, ADOPTED):
            owner_name, _, leaf = name.rpartition(".")
            owner = dst.get_submodule(owner_name) if owner_name else dst
            owner._modules[leaf] = src.get_submodule(name)


def replacement_for(module: nn.Module, new_class: type, arguments: dict) -> nn.Module:
    """Our module holding `module`'s own nn.Linear / nn.Conv1d / nn.Dropout objects (so their
    Parameter objects, hooks and flags), with its train/eval flags and a link back to it."""
    with torch.device("meta"):  # no memory, no init: every parameter is replaced just below
        new = new_class(**arguments)
    _adopt_submodules(module, new)
    leftovers = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if leftovers:
        raise RuntimeError(f"timellm_fast: {new_class.__name__} has state {leftovers} that "
                           f"{type(module).__name__} does not provide")
    _copy_training_flags(module, new)
    object.__setattr__(new, ORIGINAL_ATTR, module)
    return new


def _copy_training_flags(src: nn.Module, dst: nn.Module) -> None:
    """dst's train/eval flag, and that of each of its submodules src has under the same name, as
    src's: a Dropout put back in train() under an eval() model (Monte-Carlo dropout) stays so."""
    dst.train(src.training)
    flags = {name: module.training for name, module in src.named_modules()}
    for name, module in dst.named_modules():
        if name in flags:
            module.training = flags[name]


def _walk(parent: nn.Module, prefix: str, visit: Callable[[nn.Module, str, nn.Module, str], bool],
          expanded: Optional[set] = None) -> None:
    """Calls ``visit(parent, attribute, child, qualified name)`` for each child below `parent`, in
    module order, and descends into the child when visit returns True. A module shared by
    several parents is expanded once."""
    expanded = set() if expanded is None else expanded
    if parent in expanded:
        return
    expanded.add(parent)
    for attr, child in list(parent._modules.items()):  # visit may replace entries
        if child is None:
            continue
        qualified = f"{prefix}.{attr}" if prefix else attr
        if visit(parent, attr, child, qualified):
            _walk(child, qualified, visit, expanded)


def patch_model(model: nn.Module) -> List[Replacement]:
    """Replaces, in place, every Time-LLM PatchEmbedding / ReprogrammingLayer below `model`
    with timellm_fast's (same Parameter objects, train/eval flag); returns what was replaced.

    All or nothing: every replacement is built before any is swapped in, and an error names the
    module it is about (the model is then unchanged). A module left alone (another structure, or
    a subclass that overrides forward) is named in a warning."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _recognizer(model) is not None:
        raise ValueError(f"model is itself a {type(model).__name__}; patch_model replaces submodules in "
                         f"place, so pass the model that contains it")
    swaps: List[Tuple[nn.Module, str, nn.Module, str, type]] = []  # (parent, attribute, new, name, old class)
    done: Dict[nn.Module, nn.Module] = {}  # old -> new while walking: a module shared by two parents is built once
    left_alone: List[str] = []  # a warning per module left unchanged, and why

    def visit(parent: nn.Module, attr: str, child: nn.Module, qualified: str) -> bool:
        if isinstance(child, OURS):
            return False
        recognized = _recognizer(child)
        if recognized is None:
            return True
        new_class, read_arguments, why_not = recognized
        hooked = _hooked(child)
        if why_not is None and hooked:
            why_not = f"hooks are registered on {', '.join(hooked)}, which a replacement would not keep"
        if why_not is not None:
            left_alone.append(f"timellm_fast.patch_model: {qualified} is left unchanged: {why_not}")
            return True
        if child not in done:
            try:
                arguments = read_arguments(child)
            except NotRecognized as why:
                left_alone.append(f"timellm_fast.patch_model: {qualified} ({type(child).__name__}) does not have "
                                  f"Time-LLM's structure and is left unchanged: {why}")
                return True
            try:
                done[child] = replacement_for(child, new_class, arguments)
            except Exception as error:
                message = (f"timellm_fast.patch_model: cannot replace {qualified} ({type(child).__name__}); "
                           f"nothing was replaced: {error}")
                try:
                    named = type(error)(message)
                except Exception:  # an exception type that takes other arguments
                    named = RuntimeError(message)
                raise named from error
        swaps.append((parent, attr, done[child], qualified, type(child)))
        return False

    _walk(model, "", visit)
    for message in left_alone:  # from here, so that the warning points at the caller of patch_model
        warnings.warn(message, stacklevel=2)
    for parent, attr, new, _, _ in swaps:
        setattr(parent, attr, new)
    return [Replacement(qualified, old_class, type(new)) for _, _, new, qualified, old_class in swaps]


def unpatch_model(model: nn.Module) -> List[Replacement]:
    """Undoes :func:`patch_model`: puts the original module objects back, holding the Parameter
    objects our modules hold now and their train/eval flag. Returns (name, our class, original class)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    summary: List[Replacement] = []
    restored: Dict[nn.Module, nn.Module] = {}
    ours: List[nn.Module] = []

    def visit(parent: nn.Module, attr: str, child: nn.Module, qualified: str) -> bool:
        original = child.__dict__.get(ORIGINAL_ATTR)
        if original is None:
            return not isinstance(child, OURS)
        if child not in restored:
            _move_parameters(child, original)
            _copy_training_flags(child, original)
            restored[child] = original
            ours.append(child)
        setattr(parent, attr, original)
        summary.append(Replacement(qualified, type(child), type(original)))
        return False

    _walk(model, "", visit)
    for module in ours:
        del module.__dict__[ORIGINAL_ATTR]  # detached now; do not keep the original alive through it
    return summary
