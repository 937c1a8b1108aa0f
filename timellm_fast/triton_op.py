"""A Triton op with two routes to the same launchers, built once for both fused ops.

An op is a forward launcher and a backward launcher (plain functions with type annotations).
:class:`TritonOp` makes of them:

* a pair of ``torch.library`` custom ops, ``timellm_fast::<name>_fwd`` / ``_bwd``, with fake
  implementations and the forward's autograd registered: what ``torch.compile``, export,
  ``torch.jit.trace``, dispatch modes, ``torch.func`` transforms and tensor subclasses see
  (one opaque operator each, checked by ``opcheck``);
* a ``torch.autograd.Function`` over the same launchers, saved tensors and backward, for plain
  eager mode, where the custom op's dispatch is host time the small official shapes cannot hide.

Calling the op runs one of them; :func:`dispatch.direct_launch` decides which (its rules, and the
route counters tests read, live there). The backward follows the route its forward took. The
op's own parts are what differs between ops: what the backward keeps (`save`) and how the
gradients of the inputs come from the backward launcher (`gradients`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import dispatch


class TritonOp:
    """``op(*inputs)``: the forward launcher with its autograd, on the route dispatch picks.

    forward(*inputs) -> result, or (result, *residuals) when `residuals` is set: the forward
                                         launcher; becomes the ``_fwd`` custom op
    forward_fake(*inputs) -> the same    its shapes and dtypes, for tracing
    backward(*args) -> tensors           the backward launcher; becomes the ``_bwd`` custom op
    backward_fake(*args) -> tensors
    direct_backward(*args) -> tensors or None   the backward launcher as the direct route runs it
                                         (default `backward`): it may return None for a gradient
                                         nobody asked for and views of one buffer, which a custom
                                         op's outputs may not be
    save(ctx, inputs, outputs)           keeps on ctx what `gradients` needs
    gradients(ctx, run_backward, grad_result) -> one gradient (or None) per input;
                                         `run_backward(*args)` is the backward launcher on the
                                         forward's route (``ctx.direct``: whether it is the
                                         direct one)
    differentiable: the number of leading inputs a gradient can flow to (tensors)
    residuals: whether the forward launcher returns residuals after its result (they never
               receive a gradient)
    """

    def __init__(self, name: str, *, forward: Callable, forward_fake: Callable, backward: Callable,
                 backward_fake: Callable, save: Callable, gradients: Callable, differentiable: int,
                 residuals: bool = False, direct_backward: Optional[Callable] = None):
        self.name = name
        self.forward_name = f"timellm_fast::{name}_fwd"
        self.backward_name = f"timellm_fast::{name}_bwd"
        forward, backward = dispatch.one_interpreted_launch_at_a_time(forward), \
            dispatch.one_interpreted_launch_at_a_time(backward)
        self.launch_forward, self.launch_backward = forward, backward  # what both routes run
        self.launch_direct_backward = dispatch.one_interpreted_launch_at_a_time(direct_backward) if direct_backward \
            else backward
        self._save, self._gradients = save, gradients
        self._differentiable = differentiable
        self._residuals = residuals

        self.forward_op = torch.library.custom_op(self.forward_name, forward, mutates_args=())
        self.forward_op.register_fake(forward_fake)
        self.backward_op = torch.library.custom_op(self.backward_name, backward, mutates_args=())
        self.backward_op.register_fake(backward_fake)
        self.forward_op.register_autograd(self._backward, setup_context=self._setup_custom_op)
        self.function = self._direct_function()
        # Function.apply without its Python layer, which binds nothing here (forward takes ctx)
        # and only unwraps functorch's dead wrappers, which dispatch.direct_launch keeps off this
        # route: about 4 us per call
        self._apply_direct = super(torch.autograd.Function, self.function).apply

    def __call__(self, *inputs):
        tensors = inputs[:self._differentiable]
        if not dispatch.direct_launch(self.name, *tensors):
            outputs = self.forward_op(*inputs)
            return outputs[0] if self._residuals else outputs
        # in training the first input (an activation) decides, without a generator
        if torch.is_grad_enabled() and (tensors[0].requires_grad or any(t.requires_grad for t in tensors)):
            return self._apply_direct(*inputs)
        outputs = self._launch_direct_forward(*inputs)  # nothing to differentiate: not even an autograd node
        return outputs[0] if self._residuals else outputs

    def _launch_direct_forward(self, *inputs):
        if dispatch.profiling():  # named as the custom op would be
            with torch.profiler.record_function(self.forward_name):
                return self.launch_forward(*inputs)
        return self.launch_forward(*inputs)

    def _setup_custom_op(self, ctx, inputs, output) -> None:  # torch.library passes `output` by name
        self._save(ctx, inputs, output)
        ctx.direct = False
        if self._residuals:
            # residual outputs never get a gradient: without this autograd would fill zeros for
            # them on every backward (one more launch each)
            ctx.set_materialize_grads(False)

    def _backward(self, ctx, grad_result, *_residual_grads):
        if not ctx.direct:
            run_backward = self.backward_op
        else:  # the launcher itself where no profiler needs its name (one frame fewer)
            run_backward = self._direct_backward if dispatch.profiling() else self.launch_direct_backward
        return self._gradients(ctx, run_backward, grad_result)

    def _direct_backward(self, *args):
        if dispatch.profiling():
            with torch.profiler.record_function(self.backward_name):
                return self.launch_direct_backward(*args)
        return self.launch_direct_backward(*args)

    def _direct_function(self) -> type:
        op = self

        def forward(ctx, *inputs):
            # forward takes ctx itself: a separate setup_context makes every apply bind its
            # arguments with inspect.signature (~50 us of host time); the launcher is called from
            # here, not through _launch_direct_forward, where no profiler needs its name
            outputs = op._launch_direct_forward(*inputs) if dispatch.profiling() else op.launch_forward(*inputs)
            op._save(ctx, inputs, outputs)
            ctx.direct = True
            return outputs[0] if op._residuals else outputs  # the residuals are saved, not returned

        def backward(ctx, grad_result):
            return op._backward(ctx, grad_result)

        return type(f"Direct_{self.name}", (torch.autograd.Function,),
                    {"__doc__": f"{self.forward_name} with its autograd, without torch.library's dispatch",
                     "forward": staticmethod(forward), "backward": staticmethod(backward)})
