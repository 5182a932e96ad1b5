"""Ignite handler that scores every probed layer's segmentation ability during MONAI validation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine
from monai.inferers import Inferer, SlidingWindowInferer
from monai.networks import one_hot
from monai.utils import CommonKeys
from torch import nn

from .inferers import ProtoSegInferer
from .metrics import SAScoreMetric
from .recorder import FeatureRecorder, resolve_layers

__all__ = ["SAScoreHandler"]

_OUTPUT = ""  # the network's own module name: recording it captures the soft (pre post-transform) output


class SAScoreHandler:
    """Layer-wise (and unit-wise) SA scores of a network, computed while a MONAI evaluator runs.

    Add it to a ``SupervisedEvaluator``'s handlers and nothing else changes. Hooks are registered when the evaluator
    starts and removed when it completes or raises, so a trainer sharing the network is untouched. Prototypes are
    guided by the network's soft output, recorded from the network itself (before any post-transform discretises
    ``pred``). Classes are scored one-vs-rest. When the evaluator's inferer is a ``SlidingWindowInferer`` it is
    wrapped in a :class:`~monai_protoseg.ProtoSegInferer` while the evaluator runs, so prototypes and maps cover the
    whole image, not one window; the original inferer is put back when the run completes or raises.

    Results, after each evaluator epoch: ``engine.state.metrics[f"{name}_{layer}"]`` (mean over classes),
    ``f"{name}_{layer}_{class}"`` per class when there are several, ``f"{name}_mean"`` over layers and classes,
    ``f"{name}_undefined"`` (image-layer-class scores that were NaN); per image, ``engine.state.metric_details
    [f"{name}_{layer}"]`` of shape ``(N, K)`` as MONAI's ``MetricsSaver`` writes them; with ``unit_wise``,
    ``self.unit_scores = {layer: (K, C) mean unit SA}``. They are set before any other epoch-completed handler
    runs, so ``StatsHandler`` and ``TensorBoardStatsHandler`` see them whatever their order.

    Args:
        layers: qualified names of the layers to probe (see :func:`~monai_protoseg.candidate_layers`).
        network: the network; by default ``engine.network`` when the engine starts.
        output_transform: gives ``(pred, label)`` from ``engine.state.output`` (MONAI ``from_engine`` style).
        activation: ``"sigmoid"``, ``"softmax"`` or ``None`` (the network outputs probabilities already).
        class_names: one name per scored class; default ``"class{index}"`` with the output channel index.
        include_background: score output channel 0 too. A single-channel output is always scored.
        unit_wise: also compute unit-wise SA.
        mask_key: key of a binary ``(1, *S)`` tissue mask in the batch; only its pixels feed the prototypes.
        reference: ``"label"`` scores against the ground truth, ``"pred"`` against the binarised prediction
            (argmax for softmax, ``> 0.5`` otherwise).
        name: prefix of the result keys.
        save_details: keep per-image scores in ``engine.state.metric_details``.
        ignore_empty: empty-reference rule of :func:`~monai_protoseg.sa_score` (NaN when ``True``).
    """

    def __init__(
        self,
        layers: Sequence[str],
        network: nn.Module | None = None,
        output_transform: Callable = from_engine([CommonKeys.PRED, CommonKeys.LABEL]),
        activation: str | None = "sigmoid",
        class_names: Sequence[str] | None = None,
        include_background: bool = False,
        unit_wise: bool = False,
        mask_key: str | None = None,
        reference: str = "label",
        name: str = "sa",
        save_details: bool = True,
        ignore_empty: bool = True,
    ) -> None:
        if activation not in ("sigmoid", "softmax", None):
            raise ValueError(f"activation must be 'sigmoid', 'softmax' or None, got {activation!r}.")
        if reference not in ("label", "pred"):
            raise ValueError(f"reference must be 'label' or 'pred', got {reference!r}.")
        self.layers = list(layers)
        self.network = network
        self.output_transform = output_transform
        self.activation = activation
        self.class_names = None if class_names is None else list(class_names)
        self.include_background = include_background
        self.mask_key = mask_key
        self.reference = reference
        self.name = name
        self.save_details = save_details
        self.metric = SAScoreMetric(self.layers, unit_wise=unit_wise, ignore_empty=ignore_empty)
        self.unit_scores: dict[str, torch.Tensor] = {}
        self._recorder: FeatureRecorder | None = None
        self._inferer: ProtoSegInferer | None = None
        self._original_inferer: Inferer | None = None
        self._class_indices: list[int] = []

    def attach(self, engine: Engine) -> None:
        """Register the handler's events on ``engine`` (a second call does nothing).

        Args:
            engine: a MONAI evaluator or any ignite ``Engine`` whose output holds prediction and label.
        """
        if engine.has_event_handler(self.started, Events.STARTED):
            return
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        _add_first(engine, Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        _add_first(engine, Events.EXCEPTION_RAISED, self.exception_raised)

    def started(self, engine: Engine) -> None:
        """Register the forward hooks on the network, or wrap the engine's sliding-window inferer."""
        network = self.network if self.network is not None else getattr(engine, "network", None)
        if network is None:
            raise ValueError("SAScoreHandler needs a network: pass network=... or use an engine with .network.")
        self.completed(engine)
        inferer = getattr(engine, "inferer", None)
        if isinstance(inferer, SlidingWindowInferer):
            resolve_layers(network, self.layers)  # fail before the first window, naming the layer
            self._original_inferer = inferer
            engine.inferer = self._inferer = ProtoSegInferer(inferer, self.layers)
        else:
            self._recorder = FeatureRecorder(network, [*self.layers, _OUTPUT]).__enter__()

    def epoch_started(self, engine: Engine) -> None:
        """Start a new accumulation."""
        self.metric.reset()

    def iteration_completed(self, engine: Engine) -> None:
        """Score the batch that just ran."""
        if self._inferer is not None:
            logits = self._inferer.prediction
            features = self._inferer.features
        elif self._recorder is not None:
            logits = self._recorder[_OUTPUT]
            features = {layer: self._recorder[layer] for layer in self.layers}
        else:
            raise RuntimeError("SAScoreHandler: the engine started before the handler was attached.")
        logits = logits.as_subclass(torch.Tensor)
        pred, label = (_batch(value) for value in self.output_transform(engine.state.output))
        if pred.shape[2:] != label.shape[2:]:
            raise ValueError(
                f"the prediction's spatial size {tuple(pred.shape[2:])} does not match the label's "
                f"{tuple(label.shape[2:])}."
            )
        if logits.shape[2:] != label.shape[2:]:
            raise ValueError(
                f"the network's last forward output has spatial size {tuple(logits.shape[2:])}, the label "
                f"{tuple(label.shape[2:])}: SAScoreHandler needs the prediction over the whole image (a "
                f"SlidingWindowInferer is handled; another inferer that runs the network on parts is not)."
            )
        prob = self._probabilities(logits)
        classes = self._class_indices = self._classes(prob.shape[1])
        if self.reference == "pred":
            target = self._binarised(prob)
        else:
            target = self._one_hot_label(label.to(prob.device), prob.shape[1])
        mask = None
        if self.mask_key is not None:
            batch = engine.state.batch
            if not isinstance(batch, dict) or self.mask_key not in batch:
                raise KeyError(f"mask_key {self.mask_key!r} is not in the batch.")
            mask = _batch(batch[self.mask_key]).to(prob.device)
        self.metric(prob[:, classes], target[:, classes], features=features, mask=mask)

    def epoch_completed(self, engine: Engine) -> None:
        """Write the epoch's results to ``engine.state``."""
        scores = self.metric.layer_scores()  # (N, L, K), gathered across ranks once
        means = scores.nanmean(0)
        names = self._names()
        metrics = engine.state.metrics
        for i, layer in enumerate(self.layers):
            metrics[f"{self.name}_{layer}"] = means[i].nanmean().item()
            if len(names) > 1:
                for k, class_name in enumerate(names):
                    metrics[f"{self.name}_{layer}_{class_name}"] = means[i, k].item()
        metrics[f"{self.name}_mean"] = means.nanmean().item()
        metrics[f"{self.name}_undefined"] = int(scores.isnan().sum())
        if self.save_details:
            details = getattr(engine.state, "metric_details", None)
            if details is None:
                details = engine.state.metric_details = {}
            for i, layer in enumerate(self.layers):
                details[f"{self.name}_{layer}"] = scores[:, i]
        if self.metric.unit_wise:
            self.unit_scores = self.metric.unit_scores()

    def completed(self, engine: Engine) -> None:
        """Remove the forward hooks and put the engine's own inferer back."""
        if self._recorder is not None:
            self._recorder.remove_hooks()
            self._recorder = None
        if self._inferer is not None:
            engine.inferer = self._original_inferer
            self._inferer = self._original_inferer = None

    def exception_raised(self, engine: Engine, error: Exception) -> None:
        """Remove the hooks; re-raise unless another exception handler follows (ignite's rule otherwise)."""
        self.completed(engine)
        if len(engine._event_handlers[Events.EXCEPTION_RAISED]) == 1:
            raise error

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        if self.activation == "softmax":
            return torch.softmax(logits, dim=1)
        return logits

    def _classes(self, channels: int) -> list[int]:
        classes = list(range(0 if self.include_background or channels == 1 else 1, channels))
        if self.class_names is not None and len(self.class_names) != len(classes):
            raise ValueError(
                f"class_names has {len(self.class_names)} names but {len(classes)} classes are scored "
                f"(output channels {classes})."
            )
        return classes

    def _names(self) -> list[str]:
        if self.class_names is not None:
            return self.class_names
        return [f"class{index}" for index in self._class_indices]

    def _binarised(self, prob: torch.Tensor) -> torch.Tensor:
        if self.activation == "softmax":
            return one_hot(prob.argmax(1, keepdim=True), prob.shape[1]).bool()
        return prob > 0.5

    def _one_hot_label(self, label: torch.Tensor, channels: int) -> torch.Tensor:
        if label.shape[1] == channels:
            return label.bool() if label.dtype == torch.bool else label > 0.5
        if label.shape[1] == 1:
            return one_hot(label.long(), channels).bool()
        raise ValueError(
            f"the label has {label.shape[1]} channels; expected 1 (class indices) or {channels} "
            f"(one-hot or multi-label, like the network output)."
        )


def _batch(value: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """A batch-first tensor from a tensor or a list of channel-first tensors (MONAI's decollated output)."""
    if isinstance(value, torch.Tensor):
        return value.as_subclass(torch.Tensor)
    return torch.stack([item.as_subclass(torch.Tensor) for item in value])


def _add_first(engine: Engine, event: Events, handler: Callable) -> None:
    """Register ``handler`` to run before the handlers already registered for ``event``."""
    engine.add_event_handler(event, handler)
    handlers = engine._event_handlers[event]
    handlers.insert(0, handlers.pop())
