"""What every handler that probes a network's layers during an engine run shares: the hooks' lifetime, the wrapped
sliding-window inferer, and the network's soft output as per-class foreground probabilities."""

from __future__ import annotations

import logging
import os
import pathlib
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.inferers import Inferer, SlidingWindowInferer
from monai.utils import CommonKeys, string_list_all_gather
from monai.utils import ImageMetaKey as Key
from torch import nn

from ..inferers import DEFAULT_MEMORY_BUDGET, MODES, ProtoSegInferer
from ..layer_names import layer_aliases
from ..protoseg import GUIDES
from ..recorder import FeatureRecorder, layer_list, resolve_layers
from .batch import as_batch, batch_value, check_same_grid, grid_of
from .postprocessing import (
    ACTIVATIONS,
    evaluator_postprocessing,
    postprocessing_activation,
    resampling_transforms,
    resolve_activation,
)
from .scoring import batch_scoring

__all__ = ["LayerProbeHandler"]

_OUTPUT = ""  # the network's own module name: recording it captures the soft (pre post-transform) output

_SHARED_SETTINGS: weakref.WeakKeyDictionary[ProtoSegInferer, tuple[list[str], str, float]] = weakref.WeakKeyDictionary()
"""The layers, mode and memory budget a wrapped sliding window had before the handlers of a run joined it, put back
when the run ends: a ``ProtoSegInferer`` the user made is left as it was."""


class LayerProbeHandler:
    """Base of the handlers that read layer features and the network's soft output while an engine runs.

    Forward hooks are registered when the engine starts and removed when it completes or raises, so a trainer sharing
    the network is untouched. When the engine's inferer is a ``SlidingWindowInferer`` it is wrapped in a
    :class:`~monai_protoseg.ProtoSegInferer` for the run instead (whole-image features, not one window's) and put back
    afterwards. Subclasses implement :meth:`epoch_started`, :meth:`iteration_completed` and :meth:`epoch_completed`,
    and read the batch with :meth:`reference_label` and :meth:`probed_batch`.

    Everything is read on the grid the network saw: the label (and mask) from ``engine.state.batch``, never from
    post-transformed outputs that ``Invertd`` or another resampling post-transform moved back to the original image.
    A label on another grid (shape, or affine where meta data tells) is refused with both grids named.

    Args:
        layers: qualified names of the layers to probe; ``None`` lets the subclass choose them when the engine starts
            (:meth:`default_layers`).
        network: the network; by default ``engine.network`` when the engine starts.
        activation: ``"auto"`` (the activation the evaluator's postprocessing applies to ``pred``, else
            ``"sigmoid"`` for a one-channel output and ``"softmax"`` for more; logged once per run), ``"sigmoid"``,
            ``"softmax"`` or ``None`` (the network outputs probabilities already). An explicit activation that
            contradicts the postprocessing is warned about; softmax on a one-channel output is an error.
        class_names: one name per scored class; default ``"class{index}"`` with the output channel index.
        include_background: score output channel 0 too. A single-channel output is always scored.
        image_key: the batch key of the network's input, whose meta data names the cases and gives the network's grid.
        label_key: the batch key of the label, read from ``engine.state.batch`` unless ``label_transform`` is given.
        label_transform: gives the label from ``engine.state.output`` instead (after the evaluator's
            postprocessing: it must still be on the network's grid); a ``KeyError`` or ``None`` means no label.
        guide: what weights the features into prototypes: ``"soft"``, the network's probabilities (the authors'
            code), or ``"binary"``, its binarised prediction (argmax for softmax, ``> 0.5`` otherwise; the paper).
        mode: with a ``SlidingWindowInferer``, how the layers' whole-image maps are built (see
            :class:`~monai_protoseg.ProtoSegInferer`): ``"stitch"`` (whole-image features of every layer, channels x
            voxels each), ``"stream"`` (two more passes over the windows, no stitched features) or ``"auto"`` (stream
            when the stitched features would exceed ``memory_budget``). Handlers sharing the engine's sliding window
            share its mode: ``"auto"`` gives way to another handler's ``"stitch"`` or ``"stream"``; two different
            explicit modes are an error. Other inferers run the whole image in one forward pass: no mode applies.
        memory_budget: bytes of stitched features above which ``mode="auto"`` streams (2 GiB by default); handlers
            sharing the sliding window use the smallest of their budgets.

    Example:
        >>> import torch
        >>> from monai.engines import SupervisedEvaluator
        >>> from monai.networks.nets import UNet
        >>> from monai_protoseg import sa_score
        >>> from monai_protoseg.handlers import LayerProbeHandler
        >>> class FirstLayerSA(LayerProbeHandler):  # the SA of one layer against the prediction, per batch
        ...     def iteration_completed(self, engine):
        ...         prob, features = self.probed_batch(engine)
        ...         foreground = prob[:, 1:]
        ...         self.scores.append(sa_score(features["model.0"], foreground, foreground > 0.5))
        ...     def epoch_started(self, engine):
        ...         super().epoch_started(engine)
        ...         self.scores = []
        ...     def epoch_completed(self, engine):
        ...         engine.state.metrics["first_layer_sa"] = torch.cat(self.scores).nanmean().item()
        >>> network = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))
        >>> image = torch.zeros(2, 1, 16, 16)
        >>> image[..., 4:12, 4:12] = 1
        >>> evaluator = SupervisedEvaluator(torch.device("cpu"), [{"image": image}], network,
        ...                                 val_handlers=[FirstLayerSA(["model.0"])])
        >>> evaluator.run()
        >>> "first_layer_sa" in evaluator.state.metrics
        True
    """

    def __init__(
        self,
        layers: Sequence[str] | None,
        network: nn.Module | None = None,
        activation: str | None = "auto",
        class_names: Sequence[str] | None = None,
        include_background: bool = False,
        image_key: str = CommonKeys.IMAGE,
        label_key: str = CommonKeys.LABEL,
        label_transform: Callable | None = None,
        guide: str = "soft",
        mode: str = "auto",
        memory_budget: float = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
        if guide not in GUIDES:
            raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}.")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not (
                0 < memory_budget < float("inf")):
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}.")
        self.guide = guide
        self.mode = mode
        self.memory_budget = memory_budget
        self.layers = None if layers is None else layer_list(layers)
        self.network = network
        self.activation = activation
        self.class_names = None if class_names is None else list(class_names)
        self.include_background = include_background
        self.image_key = str(image_key)  # MONAI's key constants are StrEnums: plain strings read better in messages
        self.label_key = str(label_key)
        self.label_transform = label_transform
        self.label_option = "label_transform"  # the option's name in messages (output_transform where it gives both)
        self.output_activation: str | None = None
        """The activation applied this run (``activation``, or what ``"auto"`` resolved to at the first batch)."""
        self.class_indices: list[int] = []
        self.metric_name: str | None = None
        self.logger = logging.getLogger(type(self).__module__)
        self._cases: list[str] = []
        self._recorder: FeatureRecorder | None = None
        self._inferer: ProtoSegInferer | None = None
        self._original_inferer: Inferer | None = None
        self._postprocessing: Callable | None = None
        self._activation_resolved = False
        self.probed_network: nn.Module | None = None
        """The network probed this run (``network``, or the engine's), set when the engine starts."""
        self.layer_aliases: dict[str, str] = {}
        """``{layer: readable alias}`` of the probed layers (:func:`~monai_protoseg.layer_aliases`), set when the
        engine starts: the names results, files and logs show."""

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
        if engine.has_event_handler(_raise_after_the_others, Events.EXCEPTION_RAISED):  # left by a failed run
            engine.remove_event_handler(_raise_after_the_others, Events.EXCEPTION_RAISED)
        network = self.network if self.network is not None else getattr(engine, "network", None)
        if network is None:
            raise ValueError(f"{type(self).__name__} needs a network: pass network=... or use an engine with .network.")
        self.completed(engine)
        self.probed_network = network
        if self.layers is None:
            self.layers = self.default_layers(network)
        self.layer_aliases = layer_aliases(network, self.layers)
        if hasattr(self, "scoring_request"):
            batch_scoring(engine).join(self)
        self._postprocessing = evaluator_postprocessing(engine)
        self._activation_resolved = False
        inferer = getattr(engine, "inferer", None)
        if isinstance(inferer, ProtoSegInferer) and isinstance(inferer.inferer, SlidingWindowInferer):
            resolve_layers(network, self.layers)  # another handler wraps the sliding window: share its recording
            _SHARED_SETTINGS.setdefault(inferer, (list(inferer.layers), inferer.mode, inferer.memory_budget))
            self._share_mode(inferer)
            inferer.layers += [layer for layer in self.layers if layer not in inferer.layers]
            self._inferer = inferer
        elif isinstance(inferer, SlidingWindowInferer):
            resolve_layers(network, self.layers)  # fail before the first window, naming the layer
            self._original_inferer = inferer
            engine.inferer = self._inferer = ProtoSegInferer(inferer, self.layers, mode=self.sliding_window_mode(),
                                                             memory_budget=self.memory_budget)
        else:
            self._recorder = FeatureRecorder(network, [*self.layers, _OUTPUT]).__enter__()

    def needs_features(self) -> bool:
        """Whether this handler needs the layers' whole-image features (not only their maps); subclasses that do
        (unit-wise scores) override it, and then never stream."""
        return False

    def sliding_window_mode(self) -> str:
        """``mode``, with ``"auto"`` made ``"stitch"`` when the handler needs the features (:meth:`needs_features`).

        Raises:
            ValueError: ``mode="stream"`` but the handler needs the features.
        """
        if self.needs_features():
            if self.mode == "stream":
                raise ValueError(f"{type(self).__name__}(mode='stream') cannot give unit-wise scores: they need every "
                                 f"channel's whole-image features, which streaming never builds. Use mode='stitch' "
                                 f"or 'auto' (which stitches for unit-wise scores).")
            return "stitch"
        return self.mode

    def _share_mode(self, inferer: ProtoSegInferer) -> None:
        """Agree on the mode of a sliding window that another handler (or the user) wrapped: ``"auto"`` gives way to
        an explicit mode, and the smallest memory budget counts.

        Raises:
            ValueError: the wrapped inferer's explicit mode is not this handler's explicit mode.
        """
        mode = self.sliding_window_mode()
        if mode != inferer.mode and "auto" not in (mode, inferer.mode):
            raise ValueError(f"{type(self).__name__} needs mode={mode!r}, but the engine's sliding window is already "
                             f"wrapped with mode={inferer.mode!r} (by another handler or ProtoSegInferer): handlers "
                             f"sharing a sliding window must agree; give them the same mode, or mode='auto'.")
        if inferer.mode == "auto":
            inferer.mode = mode
        inferer.memory_budget = min(inferer.memory_budget, self.memory_budget)

    def streamed_inferer(self) -> ProtoSegInferer | None:
        """The engine's wrapped sliding window when its last call streamed (the layers' maps then come from its
        :meth:`~monai_protoseg.ProtoSegInferer.prototype_logits`, not from features), else ``None``."""
        return self._inferer if self._inferer is not None and self._inferer.streamed else None

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
        """Remove the forward hooks, put the engine's own inferer back, and leave the engine's batch scoring."""
        batch_scoring(engine).leave(self)
        if self._recorder is not None:
            self._recorder.remove_hooks()
            self._recorder = None
        if self._inferer is not None:
            if self._original_inferer is not None:  # this handler wrapped the inferer: put the original back
                engine.inferer = self._original_inferer
            elif self._inferer in _SHARED_SETTINGS:  # joined: the wrapper's own settings back, once the run ends
                self._inferer.layers, self._inferer.mode, self._inferer.memory_budget = _SHARED_SETTINGS.pop(
                    self._inferer)
            self._inferer = self._original_inferer = None

    def exception_raised(self, engine: Engine, error: BaseException) -> None:
        """Remove the hooks and make sure the run fails with ``error``.

        Ignite raises nothing itself once any exception handler is registered. This handler runs first (the hooks
        are removed whatever the others do) and schedules :func:`_raise_after_the_others` last, so the other
        exception handlers (``StatsHandler``'s log, ``CheckpointSaver``'s final save) still run, and the exception,
        ``KeyboardInterrupt`` included, reaches the caller of ``engine.run()``. No epoch-completed handler runs, so
        no file is written from part of an epoch.
        """
        self.completed(engine)
        if not engine.has_event_handler(_raise_after_the_others, Events.EXCEPTION_RAISED):
            engine.add_event_handler(Events.EXCEPTION_RAISED, _raise_after_the_others)

    def reference_label(self, engine: Engine) -> torch.Tensor | None:
        """The label of the batch that just ran, on the network's grid.

        Read from ``engine.state.batch[label_key]`` (the batch the network saw), or from ``label_transform`` when
        given. Its grid (shape, and affine where meta data tells) is checked against the network's input.

        Returns:
            ``(B, 1 or K, *S)``, or ``None`` when the batch has no label.

        Raises:
            ValueError: the label is on another grid; the message names both grids, the likely cause and the fix.
        """
        batch = engine.state.batch
        if self.label_transform is None:
            value = batch_value(batch, self.label_key)
            what = f"the label (engine.state.batch[{self.label_key!r}])"
            cause = (f"The preprocessing moved the image but not the label: apply its spatial transforms (Spacingd, "
                     f"Orientationd, Resized, ...) to {self.label_key!r} too.")
        else:
            try:
                value = self.label_transform(engine.state.output)
            except KeyError:
                return None
            if isinstance(value, tuple) and len(value) == 1:  # from_engine on a (not decollated) dict output
                value = value[0]
            what = f"the label from {self.label_option} (engine.state.output, after the evaluator's postprocessing)"
            resampling = resampling_transforms(self._postprocessing)
            cause = (f"The evaluator's postprocessing has {', '.join(resampling)}, which moves the label off the "
                     f"network's grid" if resampling else "A post-transform moved the label off the network's grid")
            cause += (f". Leave {self.label_option} unset: the handler then reads {self.label_key!r} from "
                      f"engine.state.batch, the batch the network saw.")
        if value is None or (isinstance(value, (list, tuple)) and any(item is None for item in value)):
            return None
        image = batch_value(batch, self.image_key)
        if image is not None:
            check_same_grid(what, grid_of(value, batch, self.label_key),
                            grid_of(image, batch, self.image_key), cause)
        return batch_scoring(engine).shared(engine, "label", value, lambda: as_batch(value))  # stacked once a batch

    def batch_mask(self, engine: Engine, key: str) -> torch.Tensor:
        """The ``(B, 1, *S)`` value of ``key`` in the batch the network saw, on the network's grid.

        Raises:
            KeyError: the batch has no ``key``.
            ValueError: it is on another grid than the network's input.
        """
        batch = engine.state.batch
        value = batch_value(batch, key)
        if value is None:
            raise KeyError(f"{type(self).__name__}: {key!r} is not in the batch (engine.state.batch).")
        image = batch_value(batch, self.image_key)
        if image is not None:
            check_same_grid(f"{key!r} (engine.state.batch)", grid_of(value, batch, key),
                            grid_of(image, batch, self.image_key),
                            f"Apply the preprocessing's spatial transforms to {key!r} too.")
        return as_batch(value)

    def probed_batch(
        self, engine: Engine, spatial_size: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The soft output and the layer features of the batch that just ran.

        Args:
            engine: the engine.
            spatial_size: the spatial size the prediction must have when the batch holds no image (the label's).

        Returns:
            ``prob``: ``(B, K, *S)`` float foreground probability of every output channel (``self.class_indices`` are
            the scored ones); ``features``: ``{layer: (B, C, *S_f)}``, empty when the sliding window streamed
            (:meth:`streamed_inferer`).

        Raises:
            ValueError: the prediction does not cover the network's input (an inferer that runs the network on
                parts of the image), or softmax on a one-channel output.
        """
        if self._inferer is not None:
            logits = self._inferer.prediction
            features = {} if self._inferer.streamed else {layer: self._inferer.features[layer] for layer in self.layers}
        elif self._recorder is not None:
            logits = self._recorder[_OUTPUT]
            features = {layer: self._recorder[layer] for layer in self.layers}
        else:
            raise RuntimeError(f"{type(self).__name__}: the engine started before the handler was attached.")
        logits = logits.as_subclass(torch.Tensor)
        image = batch_value(engine.state.batch, self.image_key)
        expected = grid_of(image).shape if image is not None else spatial_size
        if expected is not None and logits.shape[2:] != tuple(expected):
            raise ValueError(
                f"the network's last forward output has spatial size {tuple(logits.shape[2:])}, its input "
                f"{tuple(expected)}: {type(self).__name__} needs the prediction over the whole input (a "
                f"SlidingWindowInferer is handled; another inferer that runs the network on parts is not)."
            )
        self._resolve_activation(logits)
        # handlers of one engine with the same activation share one copy (the handlers only read it)
        prob = batch_scoring(engine).shared(engine, ("prob", self.output_activation), logits,
                                            lambda: self.activate(logits))
        self.class_indices = self._classes(prob.shape[1])
        return prob, features

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """The network's output ``(B, K, *S)`` as float probabilities, with the activation of this run.

        The first call of a run resolves ``activation="auto"`` (and checks an explicit one against the evaluator's
        postprocessing) and logs the choice once.
        """
        self._resolve_activation(logits)
        logits = logits.float()
        if self.output_activation == "sigmoid":
            return torch.sigmoid(logits)
        if self.output_activation == "softmax":
            return torch.softmax(logits, dim=1)
        return logits

    def _resolve_activation(self, logits: torch.Tensor) -> None:
        """Resolve ``activation="auto"`` on the first output of a run (and check an explicit one against the
        evaluator's postprocessing), logging the choice once; refuse softmax on a one-channel output."""
        if not self._activation_resolved:
            found = postprocessing_activation(self._postprocessing)
            self.output_activation, reason, warning = resolve_activation(
                self.activation, logits.shape[1], found, type(self).__name__)
            if warning is not None:
                self.logger.warning(warning)
            elif self.activation == "auto":
                self.logger.info(f"{type(self).__name__}: activation {self.output_activation!r}, {reason}.")
            self._activation_resolved = True
        elif self.output_activation == "softmax" and logits.shape[1] == 1:
            resolve_activation("softmax", 1, None, type(self).__name__)  # raises

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
        if self.output_activation == "softmax":  # max().indices: the first maximum, as argmax, many times faster
            index = prob.max(1, keepdim=True).indices
            channels = torch.arange(prob.shape[1], device=prob.device)
            return index == channels.view(1, -1, *(1,) * (prob.ndim - 2))
        return prob > 0.5

    def share_key(self, mask_key: str | None = None) -> tuple:
        """What makes two handlers' maps of a batch the same: the network, activation, guide, classes and mask (see
        :class:`~monai_protoseg.handlers.scoring.ScoringRequest`)."""
        return id(self.probed_network), self.output_activation, self.guide, tuple(self.class_indices), mask_key

    def guide_weights(self, prob: torch.Tensor) -> torch.Tensor:
        """What guides the prototypes of every channel of ``prob``: ``prob`` itself, or with ``guide="binary"``
        the binarised prediction (:meth:`binarised`) as 0/1 floats."""
        return prob if self.guide == "soft" else self.binarised(prob).to(prob.dtype)

    def one_hot_label(self, label: torch.Tensor, channels: int) -> torch.Tensor:
        """A ``(B, 1, *S)`` class-index or ``(B, K, *S)`` one-hot / multi-label ``label`` as a bool ``(B, K, *S)`` mask.

        Raises:
            ValueError: the channel count fits neither form, a one-hot label is not binary, or a class index is not
                a whole number in ``[0, channels)``; the message names the label key and the values found.
        """
        label = label.as_subclass(torch.Tensor)
        where = f"the label ({self.label_key!r})" if self.label_transform is None else f"the label of {self.label_option}"
        if label.shape[1] == channels:
            mask = label.bool()
            if label.dtype != torch.bool and not torch.equal(label, mask.to(label.dtype)):  # 0 and 1 only (no NaN)
                raise ValueError(
                    f"{type(self).__name__}: {where} has {channels} channel(s) like the network output, so it must be "
                    f"binary (0/1) per channel; found values {_some_values(label)}."
                )
            return mask
        if label.shape[1] == 1:
            if label.dtype != torch.bool and not ((label >= 0) & (label < channels) & (label == label.round())).all():
                raise ValueError(
                    f"{type(self).__name__}: {where} holds class indices (one channel), which must be whole numbers "
                    f"in [0, {channels}) for a {channels}-channel output; found values {_some_values(label)}."
                )
            index = label.long()
            return index == torch.arange(channels, device=label.device).view(1, -1, *(1,) * (label.ndim - 2))
        raise ValueError(
            f"{type(self).__name__}: {where} has {label.shape[1]} channels; expected 1 (class indices) or "
            f"{channels} (one-hot or multi-label, like the network output)."
        )

    def shared_one_hot_label(self, engine: Engine, label: torch.Tensor, channels: int) -> torch.Tensor:
        """:meth:`one_hot_label`, computed once per batch for the handlers of ``engine`` that read the same label."""
        return batch_scoring(engine).shared(engine, ("one_hot_label", channels), label,
                                            lambda: self.one_hot_label(label, channels))

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


def second_item(output_transform: Callable) -> Callable:
    """The label part of a MONAI ``(pred, label)`` output transform: ``output -> output_transform(output)[1]``."""

    def label_transform(output: Any) -> Any:
        return output_transform(output)[1]

    return label_transform


def _some_values(values: torch.Tensor, count: int = 6) -> str:
    """Up to ``count`` of the distinct values of ``values``, for a message."""
    values = values.detach().flatten().cpu()
    nan = values.isnan()
    distinct = [f"{value:.7g}" for value in torch.unique(values[~nan]).tolist()] + (["nan"] if nan.any() else [])
    return f"{{{', '.join(distinct[:count])}{', ...' if len(distinct) > count else ''}}}"


def _case_name(filename: str | os.PathLike) -> str:
    """``/data/imagesTr/BRATS_001.nii.gz`` -> ``BRATS_001``."""
    name = pathlib.Path(filename).name.removesuffix(".gz")
    return name.rsplit(".", 1)[0] if "." in name else name


def _raise_after_the_others(engine: Engine, error: BaseException) -> None:
    """The last exception handler of a failed run (added by :meth:`LayerProbeHandler.exception_raised`): raise the
    run's exception, which ignite would otherwise swallow."""
    engine.remove_event_handler(_raise_after_the_others, Events.EXCEPTION_RAISED)
    raise error


def _add_first(engine: Engine, event: Events, handler: Callable) -> None:
    """Register ``handler`` to run before the handlers already registered for ``event``."""
    engine.add_event_handler(event, handler)
    handlers = engine._event_handlers[event]
    handlers.insert(0, handlers.pop())
