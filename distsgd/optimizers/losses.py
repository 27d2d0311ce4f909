"""The loss half of the OptimizerV2 contract: ``minimize``, ``get_gradients``,
``get_updates``, and ``overlap`` (distsgd's: aggregation during the backward pass).

``minimize`` takes gradients with autograd into a :class:`~distsgd.GradientBuffer` the
optimizer keeps for its last ``var_list``, or, for a list of micro-batches, into a
:class:`~distsgd.GradientAccumulator`; then one ``apply_gradients``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from distsgd.gradients import GradientBuffer, gradients
from distsgd.optimizers.validation import FLOAT_DTYPES
from distsgd.variables import Variable

__all__ = ["LossMixin"]


class LossMixin:
    """``minimize``, ``get_gradients``, ``get_updates``, ``overlap``; the optimizer
    provides ``apply_gradients``, ``_clip``, ``_strategy_for`` and ``_step_count``."""

    _minimize_buffer: GradientBuffer | None
    _accumulator: Any
    _overlap_minimize: bool
    apply_gradients: Callable[..., Variable]
    _clip: Callable[..., list[Any]]
    _strategy_for: Callable[..., tuple[Any, bool]]
    _step_count: Callable[[], int]

    def overlap(self, buffer: GradientBuffer | None = None) -> GradientBuffer | None:
        """Reduce ``buffer``'s gradients while the backward pass still computes (DDP's
        design), for every following step of this optimizer on it: once the backward pass
        calls ``buffer.ready(i)`` for a complete gradient (``distsgd.gradients(...,
        out=buffer)`` and the training program's model do), the chunks it completes
        start crossing ranks on a communication thread; ``apply_gradients(buffer)`` then
        waits for the rest and updates. Bitwise the same as without it. Returns
        ``buffer``; in one process (or under a world-size-invariant strategy) nothing
        changes. Without ``buffer``: :meth:`minimize`'s own buffer, from now on."""
        if buffer is None:
            self._overlap_minimize = True
            if self._minimize_buffer is not None:
                self.overlap(self._minimize_buffer)
            return None
        if not isinstance(buffer, GradientBuffer):
            raise TypeError(f"buffer={buffer!r}; expected a distsgd.GradientBuffer")
        strategy, _ = self._strategy_for(buffer.variables, "overlap")
        strategy.aggregator.overlap(buffer, self._step_count)
        return buffer

    def minimize(self, loss: Callable[[], Any],
                 var_list: Sequence[Variable] | Callable[[], Sequence[Variable]],
                 grad_loss: Any = None, name: str | None = None) -> Variable:
        """Compute gradients of ``loss()`` with autograd and apply them.

        ``loss`` is a zero-argument callable written with ``autograd.numpy`` (or
        Variable operators); a non-scalar loss is summed, or weighted by ``grad_loss``.
        A callable ``var_list`` is evaluated after a first call of ``loss``.

        ``loss`` may also be a list of ``(index, loss)`` pairs, one per micro-batch of
        this rank (gradient accumulation): their gradients are combined by a
        :class:`~distsgd.GradientAccumulator` (world-size-invariantly under such a
        strategy: ``index`` is then the micro-batch's number in the global batch), and
        one step is applied.

        The gradients are written into a :class:`~distsgd.GradientBuffer` that the
        optimizer keeps for its last ``var_list`` (the same variables, in order), so a
        step allocates no gradient copies and reduces them where they lie.
        """
        if isinstance(loss, list | tuple):  # micro-batches: accumulate, then one step
            return self._minimize_micro_batches(loss, var_list, grad_loss, name)
        variables = _resolve_var_list(loss, var_list)
        buffer = self._minimize_buffer
        if buffer is None or not buffer.is_for(variables):
            buffer = None
            if variables and all(type(v) is Variable and v.dtype in FLOAT_DTYPES
                                 for v in variables):
                buffer = self._minimize_buffer = GradientBuffer(variables)
                if self._overlap_minimize:
                    self.overlap(buffer)
        if buffer is None:  # the pair-by-pair path names what is wrong
            return self.apply_gradients(_paired(loss, variables, grad_loss), name)
        self._strategy_for(variables, "minimize")  # refuse before computing anything
        gradients(loss, variables, grad_loss, out=buffer)
        return self.apply_gradients(buffer, name)

    def _minimize_micro_batches(self, losses: Sequence[tuple[int, Callable[[], Any]]],
                                var_list: Any, grad_loss: Any, name: str | None) -> Variable:
        from distsgd.accumulation import GradientAccumulator

        variables = list(_flatten(var_list() if callable(var_list) else var_list))
        accumulator = self._accumulator
        if accumulator is None or not accumulator.buffer.is_for(variables):
            accumulator = self._accumulator = GradientAccumulator(variables)
        for item in losses:
            if not isinstance(item, tuple | list) or len(item) != 2 or not callable(item[1]):
                raise TypeError(f"loss item {item!r}; expected (micro-batch index, loss "
                                "callable) pairs")
            index, micro_loss = item
            accumulator.add(micro_loss, index=index, grad_loss=grad_loss)
        return self.apply_gradients(accumulator, name)

    def get_gradients(self, loss: Callable[[], Any], params: Sequence[Variable]) -> list[Any]:
        """This replica's gradients of ``loss()`` w.r.t. ``params``, clipped as configured
        (``apply_gradients`` aggregates them).

        Raises:
            ValueError: a parameter has no gradient (the loss does not use it), or the
                parameters belong to another strategy.
        """
        params = _resolve_var_list(loss, params)
        self._strategy_for(params, "get_gradients")
        pairs = _paired(loss, params)
        for grad, param in pairs:
            if grad is None:
                raise ValueError(f"Variable {param.name!r} has `None` for gradient. Please make "
                                 "sure that all of your ops have a gradient defined (i.e. are "
                                 "differentiable) and that the loss uses the variable.")
        return self._clip([g for g, _ in pairs])

    def get_updates(self, loss: Callable[[], Any], params: Sequence[Variable]) -> list[Variable]:
        """``[apply_gradients(zip(get_gradients(loss, params), params))]``."""
        grads = self.get_gradients(loss, params)
        return [self.apply_gradients(list(zip(grads, params, strict=True)))]


def _resolve_var_list(loss: Callable[[], Any], var_list: Any) -> list[Any]:
    """``var_list`` as a flat list; a callable one is evaluated after a first call of
    ``loss`` (which creates variables made lazily)."""
    if callable(var_list) and callable(loss):
        loss()
        var_list = var_list()
    return list(_flatten(var_list))


def _paired(loss: Callable[[], Any], variables: list[Any],
            grad_loss: Any = None) -> list[tuple[Any, Variable]]:
    """``(gradient, variable)`` pairs of ``loss()``, the gradients as new arrays."""
    return list(zip(gradients(loss, variables, grad_loss), variables, strict=True))


def _flatten(items: Any) -> Iterable[Any]:
    if isinstance(items, list | tuple):
        for item in items:
            yield from _flatten(item)
    else:
        yield items
