"""What every handler that probes a network's layers during an engine run shares: the hooks' lifetime, the wrapped
sliding-window inferer, and the network's soft output as per-class foreground probabilities."""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.inferers import Inferer, SlidingWindowInferer
from monai.networks import one_hot
from monai.utils import CommonKeys, string_list_all_gather
from monai.utils import ImageMetaKey as Key
from torch import nn

from ..inferers import ProtoSegInferer
from ..recorder import FeatureRecorder, resolve_layers

__all__ = ["LayerProbeHandler", "as_batch"]

_OUTPUT = ""  # the network's own module name: recording it captures the soft (pre post-transform) output


class LayerProbeHandler:
    """Base of the handlers that read layer features and the network's soft output while an engine runs.

    Forward hooks are registered when the engine starts and removed when it completes or raises, so a trainer sharing
    the network is untouched. When the engine's inferer is a ``SlidingWindowInferer`` it is wrapped in a
    :class:`~monai_protoseg.ProtoSegInferer` for the run instead (whole-image features, not one window's) and put back
    afterwards. Subclasses implement :meth:`epoch_started`, :meth:`iteration_completed` and :meth:`epoch_completed`,
    and read the batch with :meth:`probed_batch`.

    Args:
        layers: qualified names of the layers to probe; ``None`` lets the subclass choose them when the engine starts
            (:meth:`default_layers`).
        network: the network; by default ``engine.network`` when the engine starts.
        activation: ``"sigmoid"``, ``"softmax"`` or ``None`` (the network outputs probabilities already).
        class_names: one name per scored class; default ``"class{index}"`` with the output channel index.
        include_background: score output channel 0 too. A single-channel output is always scored.
        image_key: the batch key whose meta data names the cases.
    """

    def __init__(
        self,
        layers: Sequence[str] | None,
        network: nn.Module | None = None,
        activation: str | None = "sigmoid",
        class_names: Sequence[str] | None = None,
        include_background: bool = False,
        image_key: str = CommonKeys.IMAGE,
    ) -> None:
        if activation not in ("sigmoid", "softmax", None):
            raise ValueError(f"activation must be 'sigmoid', 'softmax' or None, got {activation!r}.")
        self.layers = None if layers is None else list(layers)
        self.network = network
        self.activation = activation
        self.class_names = None if class_names is None else list(class_names)
        self.include_background = include_background
        self.image_key = image_key
        self.class_indices: list[int] = []
        self.metric_name: str | None = None
        self._cases: list[str] = []
        self._recorder: FeatureRecorder | None = None
        self._inferer: ProtoSegInferer | None = None
        self._original_inferer: Inferer | None = None

    def attach(self, engine: Engine, name: str | None = None) -> None:
        """Register the handler's events on ``engine`` (a second call does nothing).

        The epoch-completed and exception handlers run before those already registered, so that results are in
        ``engine.state.metrics`` when ``StatsHandler`` or ``TensorBoardStatsHandler`` read them, whatever the order
        the handlers were listed in.

        Args:
            engine: a MONAI evaluator or any ignite ``Engine`` that runs the network.
            name: given when the handler is passed in an evaluator's ``key_val_metric`` or ``additional_metrics``
                (MONAI calls ``attach(engine, name)``): the handler's summary score is also written to
                ``engine.state.metrics[name]``, so it can be the key metric that selects the best checkpoint.
        """
        if engine.has_event_handler(self.started, Events.STARTED):
            return
        self.metric_name = name
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        _add_first(engine, Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        _add_first(engine, Events.EXCEPTION_RAISED, self.exception_raised)

    def default_layers(self, network: nn.Module) -> list[str]:
        """The layers to probe when none were given; subclasses that allow ``layers=None`` override it."""
        raise ValueError(f"{type(self).__name__} needs layers: pass layers=[...] (see monai_protoseg.candidate_layers).")

    def started(self, engine: Engine) -> None:
        """Register the forward hooks on the network, or wrap the engine's sliding-window inferer."""
        network = self.network if self.network is not None else getattr(engine, "network", None)
        if network is None:
            raise ValueError(f"{type(self).__name__} needs a network: pass network=... or use an engine with .network.")
        self.completed(engine)
        if self.layers is None:
            self.layers = self.default_layers(network)
        inferer = getattr(engine, "inferer", None)
        if isinstance(inferer, ProtoSegInferer) and isinstance(inferer.inferer, SlidingWindowInferer):
            resolve_layers(network, self.layers)  # another handler wraps the sliding window: share its recording
            inferer.layers += [layer for layer in self.layers if layer not in inferer.layers]
            self._inferer = inferer
        elif isinstance(inferer, SlidingWindowInferer):
            resolve_layers(network, self.layers)  # fail before the first window, naming the layer
            self._original_inferer = inferer
            engine.inferer = self._inferer = ProtoSegInferer(inferer, self.layers)
        else:
            self._recorder = FeatureRecorder(network, [*self.layers, _OUTPUT]).__enter__()

    def epoch_started(self, engine: Engine) -> None:
        """Start a new accumulation; subclasses reset their metrics and call this."""
        self._cases = []

    def iteration_completed(self, engine: Engine) -> None:
        """Score the batch that just ran."""
        raise NotImplementedError

    def epoch_completed(self, engine: Engine) -> None:
        """Write the epoch's results."""
        raise NotImplementedError

    def completed(self, engine: Engine) -> None:
        """Remove the forward hooks and put the engine's own inferer back."""
        if self._recorder is not None:
            self._recorder.remove_hooks()
            self._recorder = None
        if self._inferer is not None:
            if self._original_inferer is not None:  # this handler wrapped the inferer: put the original back
                engine.inferer = self._original_inferer
            self._inferer = self._original_inferer = None

    def exception_raised(self, engine: Engine, error: Exception) -> None:
        """Remove the hooks; re-raise unless another exception handler follows (ignite's rule otherwise)."""
        self.completed(engine)
        if len(engine._event_handlers[Events.EXCEPTION_RAISED]) == 1:
            raise error

    def probed_batch(self, spatial_size: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The soft output and the layer features of the batch that just ran.

        Args:
            spatial_size: the spatial size the prediction must have (the label's, or the evaluator's ``pred``);
                checked so that an inferer that ran the network on parts of the image is refused clearly.

        Returns:
            ``prob``: ``(B, K, *S)`` float foreground probability of every scored class (``self.class_indices`` are
            their output channels); ``features``: ``{layer: (B, C, *S_f)}``.
        """
        if self._inferer is not None:
            logits = self._inferer.prediction
            features = {layer: self._inferer.features[layer] for layer in self.layers}
        elif self._recorder is not None:
            logits = self._recorder[_OUTPUT]
            features = {layer: self._recorder[layer] for layer in self.layers}
        else:
            raise RuntimeError(f"{type(self).__name__}: the engine started before the handler was attached.")
        logits = logits.as_subclass(torch.Tensor)
        if spatial_size is not None and logits.shape[2:] != tuple(spatial_size):
            raise ValueError(
                f"the network's last forward output has spatial size {tuple(logits.shape[2:])}, the image "
                f"{tuple(spatial_size)}: {type(self).__name__} needs the prediction over the whole image (a "
                f"SlidingWindowInferer is handled; another inferer that runs the network on parts is not)."
            )
        logits = logits.float()
        if self.activation == "sigmoid":
            prob = torch.sigmoid(logits)
        elif self.activation == "softmax":
            prob = torch.softmax(logits, dim=1)
        else:
            prob = logits
        self.class_indices = self._classes(prob.shape[1])
        return prob, features

    def record_case_names(self, engine: Engine, count: int) -> None:
        """Append the names of the ``count`` cases of the batch that just ran (see :meth:`case_names`)."""
        batch = engine.state.batch
        items = batch if isinstance(batch, (list, tuple)) else [batch]
        names: list[str] = []
        for item in items:
            if not isinstance(item, dict):
                continue
            image = item.get(self.image_key)
            meta = getattr(image, "meta", None) or item.get(f"{self.image_key}_meta_dict") or {}
            filenames = meta.get(Key.FILENAME_OR_OBJ)
            if filenames is not None:
                names += [filenames] if isinstance(filenames, (str, os.PathLike)) else list(filenames)
        if len(names) != count:
            first = len(self._cases)
            prefix = f"rank{idist.get_rank()}_" if idist.get_world_size() > 1 else ""
            names = [f"{prefix}case{first + i:04d}" for i in range(count)]
        self._cases += [_case_name(name) for name in names]

    def case_names(self) -> list[str]:
        """The names of every case of the epoch, gathered across ranks in the order of MONAI's metric buffers.

        A case is named by its image file without folder and extension (``image_key``'s meta data, as
        ``LoadImaged`` leaves it: ``/data/imagesTr/BRATS_001.nii.gz`` gives ``BRATS_001``), else by its number.
        """
        return string_list_all_gather(self._cases)

    def binarised(self, prob: torch.Tensor) -> torch.Tensor:
        """The network's own prediction of every channel of ``prob``: argmax for softmax, ``> 0.5`` otherwise."""
        if self.activation == "softmax":
            return one_hot(prob.argmax(1, keepdim=True), prob.shape[1]).bool()
        return prob > 0.5

    def one_hot_label(self, label: torch.Tensor, channels: int) -> torch.Tensor:
        """A ``(B, 1, *S)`` class-index or ``(B, K, *S)`` one-hot / multi-label ``label`` as a ``(B, K, *S)`` mask."""
        if label.shape[1] == channels:
            return label.bool() if label.dtype == torch.bool else label > 0.5
        if label.shape[1] == 1:
            return one_hot(label.long(), channels).bool()
        raise ValueError(
            f"the label has {label.shape[1]} channels; expected 1 (class indices) or {channels} "
            f"(one-hot or multi-label, like the network output)."
        )

    def class_labels(self) -> list[str]:
        """The names of the scored classes, in the order of ``self.class_indices``."""
        if self.class_names is not None:
            return self.class_names
        return [f"class{index}" for index in self.class_indices]

    def _classes(self, channels: int) -> list[int]:
        classes = list(range(0 if self.include_background or channels == 1 else 1, channels))
        if self.class_names is not None and len(self.class_names) != len(classes):
            raise ValueError(
                f"class_names has {len(self.class_names)} names but {len(classes)} classes are scored "
                f"(output channels {classes})."
            )
        return classes


def as_batch(value: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """A batch-first tensor from a tensor or a list of channel-first tensors (MONAI's decollated output)."""
    if isinstance(value, torch.Tensor):
        return value.as_subclass(torch.Tensor)
    return torch.stack([item.as_subclass(torch.Tensor) for item in value])


def _case_name(filename: str | os.PathLike) -> str:
    """``/data/imagesTr/BRATS_001.nii.gz`` -> ``BRATS_001``."""
    name = pathlib.Path(filename).name.removesuffix(".gz")
    return name.rsplit(".", 1)[0] if "." in name else name


def _add_first(engine: Engine, event: Events, handler: Callable) -> None:
    """Register ``handler`` to run before the handlers already registered for ``event``."""
    engine.add_event_handler(event, handler)
    handlers = engine._event_handlers[event]
    handlers.insert(0, handlers.pop())


@contextlib.contextmanager
def forward_hooks_suspended(network: nn.Module) -> Iterator[None]:
    """Suspend every forward hook of ``network`` for an extra pass (a flipped input, an attribution method, a
    masked input), so that no recorder (this handler's or another's) sees it; the hooks are back afterwards."""
    saved = {module: module._forward_hooks for module in network.modules()}
    try:
        for module in saved:
            module._forward_hooks = OrderedDict()
        yield
    finally:
        for module, hooks in saved.items():
            module._forward_hooks = hooks
