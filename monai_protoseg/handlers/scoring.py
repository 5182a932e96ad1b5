"""One SA pass per batch for all the scoring handlers of an engine.

``SAScoreHandler`` scores the layers against the label and ``MeanSAQualityHandler`` against the network's own
prediction, but both guide the prototypes with the same soft output: their binary maps are the same. The handlers of
one engine therefore hand their requests to the engine's :class:`BatchScoring`, which builds each layer's map once
and counts it against every handler's reference (:func:`~monai_protoseg.sa_scores` with several targets). Handlers
whose maps differ (another activation, other classes, a mask) are scored apart; nothing is shared across batches.
When the engine's sliding window streamed (no stitched features), a group's maps come from the wrapped inferer's
prototype logits (two passes over the windows for every layer of the group) instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from ignite.engine import Engine

from ..protoseg import _shared_guide_sa_scores
from ..streaming import sa_scores_from_logits

if TYPE_CHECKING:
    from ..inferers import ProtoSegInferer

__all__ = ["ScoringRequest", "BatchScoring", "batch_scoring"]

T = TypeVar("T")


@dataclass(frozen=True)
class ScoringRequest:
    """What one handler scores on the batch that just ran.

    Attributes:
        layers: the layers to score, in the order of the scores' layer axis.
        features: ``{layer: (B, C, *S_f)}``, at least for ``layers``; unused (may be empty) when ``streamed``.
        prob: ``(B, K, *S)`` foreground probability of the scored classes (guides the prototypes).
        target: bool ``(B, K, *S)`` reference of the scored classes.
        mask: optional ``(B, 1, *S)`` mask restricting the pixels that feed the prototypes.
        ignore_empty: empty-reference rule of :func:`~monai_protoseg.sa_score`.
        share: requests with equal ``share`` keys guide their maps identically (same network, activation, classes
            and mask) and are scored in one pass.
        context: the handler's own values of the batch (its label, the full probabilities, ...), handed back with
            the scores.
        streamed: the engine's wrapped sliding window when its last call streamed: the maps then come from its
            :meth:`~monai_protoseg.ProtoSegInferer.prototype_logits` (guided by ``prob`` and ``mask``).
    """

    layers: Sequence[str]
    features: Mapping[str, torch.Tensor]
    prob: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor | None
    ignore_empty: bool
    share: Hashable
    context: Mapping[str, Any] | None = None
    streamed: ProtoSegInferer | None = None


class ScoringHandler(Protocol):
    """A handler that scores layers through :class:`BatchScoring`."""

    def scoring_request(self, engine: Engine) -> ScoringRequest:
        """The request of the batch that just ran."""


class BatchScoring:
    """The scoring handlers of one engine, and the scores of the batch that just ran.

    A handler joins when the engine starts and leaves when it completes or raises. The first :meth:`scores` call of an
    iteration asks every joined handler for its :class:`ScoringRequest` and scores them all; later calls of the same
    iteration read the result. What the handlers derive alike from the batch (its probabilities, its stacked and
    one-hot label) is computed once per iteration too (:meth:`shared`), and the prototype weights of a group's pass
    are kept for its members (:meth:`guides`).
    """

    def __init__(self) -> None:
        self.handlers: list[ScoringHandler] = []
        self._iteration: tuple[int, int] | None = None
        self._results: dict[int, tuple[ScoringRequest, torch.Tensor]] = {}
        self._shared_iteration: tuple[int, int] | None = None
        self._shared: dict[Hashable, tuple[torch.Tensor | Sequence[torch.Tensor], Any]] = {}
        self._guides: dict[int, dict] = {}

    def shared(self, engine: Engine, key: Hashable, source: torch.Tensor | Sequence[torch.Tensor],
               compute: Callable[[], T]) -> T:
        """``compute()``, derived from ``source`` as ``key`` says, once per iteration for every handler of the engine.

        A value is reused only within the iteration and for a ``source`` (a tensor, or a list of them: a decollated
        batch) that views the very same data (the same memory, shape, strides and dtype; not merely equal values):
        the handlers must not modify what it returns. The cache holds ``source``, so its memory cannot be reused by
        another tensor while the value is kept.
        """
        iteration = (engine.state.epoch, engine.state.iteration)
        if self._shared_iteration != iteration:
            self._shared_iteration, self._shared = iteration, {}
        cached = self._shared.get(key)
        if cached is None or not _same_data(cached[0], source):
            cached = self._shared[key] = source, compute()
        return cached[1]

    def join(self, handler: ScoringHandler) -> None:
        """Score ``handler``'s requests from now on (a second call does nothing)."""
        if all(member is not handler for member in self.handlers):
            self.handlers.append(handler)
        self._iteration = None

    def leave(self, handler: ScoringHandler) -> None:
        """Stop scoring ``handler``; forget the current batch."""
        self.handlers = [member for member in self.handlers if member is not handler]
        self._iteration, self._results = None, {}
        self._shared_iteration, self._shared = None, {}

    def scores(self, engine: Engine, handler: ScoringHandler) -> tuple[ScoringRequest, torch.Tensor]:
        """``handler``'s request for the batch that just ran and its layer-wise scores ``(B, L, K)``."""
        iteration = (engine.state.epoch, engine.state.iteration)
        if self._iteration != iteration or id(handler) not in self._results:
            self._iteration, self._results, self._guides = None, {}, {}  # a failure leaves nothing half-scored
            members = self.handlers if any(member is handler for member in self.handlers) else [handler]
            self._results, self._guides = self._score(engine, members)
            self._iteration = iteration
        return self._results[id(handler)]

    def guides(self, handler: ScoringHandler) -> dict:
        """The prototype weights per dtype that the scoring pass of the batch that just ran built for ``handler``'s
        group when it has no mask (see :func:`~monai_protoseg.estimator.prototype_margins`); a new empty dict
        otherwise. Call it after :meth:`scores`."""
        return self._guides.get(id(handler), {})

    @staticmethod
    def _score(
        engine: Engine, handlers: Sequence[ScoringHandler]
    ) -> tuple[dict[int, tuple[ScoringRequest, torch.Tensor]], dict[int, dict]]:
        """Score every handler's request, one pass per group of requests that share their maps: the results and,
        for the members of groups without a mask, the guides of their pass."""
        requests = {id(handler): handler.scoring_request(engine) for handler in handlers}
        groups: dict[Hashable, list[int]] = {}
        for key, request in requests.items():
            groups.setdefault((request.share, request.ignore_empty), []).append(key)
        results, member_guides = {}, {}
        streamed_logits: dict[Hashable, dict[str, torch.Tensor]] = {}  # by share key: the passes run once
        for members in groups.values():
            first = requests[members[0]]
            targets = [requests[key].target for key in members]
            if first.streamed is not None:  # one pair of passes over the windows for every layer of the engine
                if first.share not in streamed_logits:
                    streamed_logits[first.share] = first.streamed.prototype_logits(first.prob, first.mask)
                logits = streamed_logits[first.share]
                layers = dict.fromkeys(layer for key in members for layer in requests[key].layers)
                per_target = sa_scores_from_logits({layer: logits[layer] for layer in layers}, targets,
                                                   ignore_empty=first.ignore_empty)
            else:  # each member's layers, from the same network's recording
                features = {layer: requests[key].features[layer] for key in members for layer in requests[key].layers}
                guides: dict = {}
                per_target = _shared_guide_sa_scores(features, first.prob, targets, first.mask, unit_wise=False,
                                                     ignore_empty=first.ignore_empty, guide="soft", guides=guides)
                if first.mask is None:
                    member_guides.update(dict.fromkeys(members, guides))
            for key, scores in zip(members, per_target):
                request = requests[key]
                results[key] = request, torch.stack([scores[layer] for layer in request.layers], dim=1)
        return results, member_guides


def _same_data(a: torch.Tensor | Sequence[torch.Tensor], b: torch.Tensor | Sequence[torch.Tensor]) -> bool:
    """Whether ``a`` and ``b`` view the same memory the same way (two wrappers of one tensor), item by item for
    lists of tensors."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and len(a) == len(b)
                and all(_same_data(x, y) for x, y in zip(a, b)))
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            and a.device == b.device)


_SCORING: weakref.WeakKeyDictionary[Engine, BatchScoring] = weakref.WeakKeyDictionary()


def batch_scoring(engine: Engine) -> BatchScoring:
    """The :class:`BatchScoring` shared by the scoring handlers attached to ``engine``."""
    if engine not in _SCORING:
        _SCORING[engine] = BatchScoring()
    return _SCORING[engine]
