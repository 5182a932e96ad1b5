"""Ignite handler that keeps the prototype maps of every probed layer for the first cases of each validation epoch:
``.npz`` snapshots for figures, and TensorBoard images."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from monai.utils import CommonKeys
from torch import nn

from ..inferers import DEFAULT_MEMORY_BUDGET
from ..layer_names import write_layer_names
from ..maps import MapSnapshot, save_snapshot, take_snapshot, tile_snapshot
from ..protoseg import _rescaled_sigmoid, _resize, prototype_map
from .batch import as_batch, batch_value
from .probe import LayerProbeHandler, second_item

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["PrototypeMapHandler"]


class PrototypeMapHandler(LayerProbeHandler):
    """Prototype maps of every probed layer for the first ``num_cases`` cases of each evaluator epoch.

    For each of those cases and each scored class, the prototypes of every layer are guided by the network's soft
    output for that class (over the whole image; a ``SlidingWindowInferer`` is handled as by
    :class:`~monai_protoseg.SAScoreHandler`), and a :class:`~monai_protoseg.maps.MapSnapshot` keeps the image, the
    ground truth (when the output has a label), the prediction and the maps: the whole case in 2D, in 3D the slice
    along the last axis with the most foreground (or ``slice_index``). Cases are taken in the order the evaluator
    runs them, so the same cases come back every epoch when the loader does not shuffle; once ``num_cases`` are
    kept, later batches cost nothing. In a distributed run, the cases are the first of rank ``save_rank``'s share.

    Snapshots name the layers by their readable aliases (``self.layer_aliases``, see
    :func:`~monai_protoseg.layer_aliases`); with ``output_dir``, ``layer_names.csv`` there pairs each with its qualified
    name. After each epoch: ``self.snapshots`` holds the snapshots (plot them with
    :func:`~monai_protoseg.maps.plot_prototype_maps`); with ``output_dir``, each is written atomically to
    ``output_dir/{name}/{case}_{class}.npz`` (read it with :func:`~monai_protoseg.maps.read_snapshot`); with
    ``summary_writer``, each is added as the image ``f"{name}/{case}/{class}"`` (image, ground truth, prediction, then
    the layers' maps side by side, see :func:`~monai_protoseg.maps.tile_snapshot`) at step
    ``global_iter_transform(engine.state.epoch)``: the trainer's epoch when a MONAI ``ValidationHandler`` runs the
    evaluator.

    Args:
        layers: qualified names of the layers to probe (see :func:`~monai_protoseg.candidate_layers`).
        network: the network; by default ``engine.network`` when the engine starts.
        output_transform: ``None`` (default) reads the label from ``engine.state.batch[label_key]``, the batch the
            network saw. Given, it gives ``(pred, label)`` from ``engine.state.output`` (MONAI ``from_engine``
            style), after the evaluator's postprocessing: the label must still be on the network's grid. Without a
            label (a missing key, or ``None``) the snapshots have no ground truth.
        activation: ``"auto"`` (from the evaluator's postprocessing, else the output's channel count; logged),
            ``"sigmoid"``, ``"softmax"`` or ``None`` (the network outputs probabilities already).
        class_names: one name per scored class; default ``"class{index}"`` with the output channel index.
        include_background: show output channel 0 too. A single-channel output is always shown.
        image_key: the batch key of the image (``(B, C, *S)`` in ``engine.state.batch``), whose meta data names the
            cases.
        num_cases: how many cases to keep per epoch.
        slice_index: the slice of 3D cases along the last axis; ``None``: the one with the most foreground.
        output_dir: when given, the folder in which the ``name`` folder of ``.npz`` snapshots is written.
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter`` (or a TensorBoardX one) to add the images to.
        global_iter_transform: turns ``engine.state.epoch`` into the TensorBoard step (as in MONAI's
            ``TensorBoardImageHandler``).
        name: the folder of the snapshots and the prefix of the TensorBoard tags.
        save_rank: the distributed rank that keeps, writes and logs the snapshots.
        label_key: the batch key of the label.
        guide: ``"soft"`` (prototypes weighted by the network's probabilities) or ``"binary"`` (by its binarised
            prediction).
        mode: with a ``SlidingWindowInferer``: ``"stitch"``, ``"stream"`` or ``"auto"`` (the default: stream when the
            stitched features would exceed ``memory_budget``); see :class:`~monai_protoseg.handlers.LayerProbeHandler`.
        memory_budget: bytes of stitched features above which ``mode="auto"`` streams (2 GiB by default).

    Example:
        >>> import torch
        >>> from monai.engines import SupervisedEvaluator
        >>> from monai.networks.nets import UNet
        >>> from monai_protoseg import PrototypeMapHandler
        >>> network = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))
        >>> image = torch.zeros(3, 1, 16, 16)
        >>> image[..., 4:12, 4:12] = 1
        >>> maps = PrototypeMapHandler(["model.0", "model.2"], num_cases=2)
        >>> SupervisedEvaluator(torch.device("cpu"), [{"image": image}], network, val_handlers=[maps]).run()
        >>> len(maps.snapshots), maps.snapshots[0].layers, maps.snapshots[0].maps.shape  # (layers, H, W)
        (2, ('encoder.1', 'output'), (2, 16, 16))
    """

    def __init__(
        self,
        layers: Sequence[str],
        network: nn.Module | None = None,
        output_transform: Callable | None = None,
        activation: str | None = "auto",
        class_names: Sequence[str] | None = None,
        include_background: bool = False,
        image_key: str = CommonKeys.IMAGE,
        num_cases: int = 2,
        slice_index: int | None = None,
        output_dir: str | os.PathLike | None = None,
        summary_writer: SummaryWriter | None = None,
        global_iter_transform: Callable[[int], int] = lambda x: x,
        name: str = "prototype_maps",
        save_rank: int = 0,
        label_key: str = CommonKeys.LABEL,
        guide: str = "soft",
        mode: str = "auto",
        memory_budget: float = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        if num_cases < 1:
            raise ValueError(f"num_cases must be at least 1, got {num_cases}.")
        label_transform = None if output_transform is None else second_item(output_transform)
        super().__init__(layers, network, activation, class_names, include_background, image_key, label_key,
                         label_transform, guide, mode, memory_budget)
        self.label_option = "output_transform"
        self.num_cases = num_cases
        self.slice_index = slice_index
        self.output_dir = None if output_dir is None else pathlib.Path(output_dir)
        self.summary_writer = summary_writer
        self.global_iter_transform = global_iter_transform
        self.name = name
        self.save_rank = save_rank
        self.snapshots: list[MapSnapshot] = []
        self._kept_cases = 0

    def epoch_started(self, engine: Engine) -> None:
        """Start collecting the epoch's first cases."""
        super().epoch_started(engine)
        self.snapshots = []
        self._kept_cases = 0

    def iteration_completed(self, engine: Engine) -> None:
        """Take the snapshots of the batch's cases (case by case, each class) while fewer than ``num_cases`` are
        kept."""
        if self._kept_cases >= self.num_cases or idist.get_rank() != self.save_rank:
            return
        label = self.reference_label(engine)
        prob, features = self.probed_batch(engine, None if label is None else label.shape[2:])
        image = self._image(engine)
        self.record_case_names(engine, prob.shape[0])
        count = min(self.num_cases - self._kept_cases, prob.shape[0])
        cases = self._cases[-prob.shape[0]:][:count]
        prediction = self.binarised(prob[:count])
        guide = self.guide_weights(prob[:count])
        label = None if label is None else self.one_hot_label(label[:count].to(prob.device), prob.shape[1])
        streamed = self.streamed_inferer()
        if streamed is not None:  # from two passes over the batch's windows; one whole-size map at a time
            logits = streamed.prototype_logits(self.guide_weights(prob)[:, self.class_indices])
            maps = {k: {} for k in self.class_indices}
            for layer in self.layers:
                layer_maps = _rescaled_sigmoid(_resize(logits.pop(layer)[:count], prob.shape[2:]),
                                               streamed.logit_scales[layer][:count])
                for j, k in enumerate(self.class_indices):
                    maps[k][layer] = layer_maps[:, j:j + 1]
        else:  # (count, 1, *S) per class and layer
            maps = {k: {layer: prototype_map(features[layer][:count], guide[:count, k:k + 1]) for layer in self.layers}
                    for k in self.class_indices}
        for b, case in enumerate(cases):
            for k, class_name in zip(self.class_indices, self.class_labels()):
                self.snapshots.append(take_snapshot(
                    image[b],
                    prob[b, k],
                    {self.layer_aliases[layer]: value[b, 0] for layer, value in maps[k].items()},
                    None if label is None else label[b, k],
                    prediction=prediction[b, k],
                    case=case,
                    class_name=class_name,
                    slice_index=self.slice_index,
                ))
        self._kept_cases += count

    def epoch_completed(self, engine: Engine) -> None:
        """Write the epoch's snapshots to ``output_dir`` and the summary writer."""
        if idist.get_rank() != self.save_rank:
            return
        step = self.global_iter_transform(engine.state.epoch)
        if self.output_dir is not None and self.snapshots:
            write_layer_names(self.output_dir, self.layer_aliases)
        for snapshot in self.snapshots:
            if self.output_dir is not None:
                save_snapshot(self.output_dir / self.name / f"{snapshot.case}_{snapshot.class_name}.npz", snapshot)
            if self.summary_writer is not None:
                tag = f"{self.name}/{snapshot.case}/{snapshot.class_name}"
                self.summary_writer.add_image(tag, tile_snapshot(snapshot), step, dataformats="CHW")
        if self.summary_writer is not None:
            self.summary_writer.flush()

    def _image(self, engine: Engine) -> torch.Tensor:
        """The batch's ``(B, C, *S)`` image (the network's input, checked by :meth:`probed_batch` to lie on the
        prediction's grid)."""
        image = batch_value(engine.state.batch, self.image_key)
        if image is None:
            raise KeyError(f"{type(self).__name__}: image_key {self.image_key!r} is not in the batch.")
        return as_batch(image)
