"""Ignite handler that explains every validation batch with an attribution method and scores how faithful it is."""

from __future__ import annotations

import os
import pathlib

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from monai.metrics import Cumulative
from monai.utils import CommonKeys

from ..attribution.base import SegmentationAttribution
from ..attribution.faithfulness import (
    COLUMNS,
    deletion_insertion,
    image_preserved,
    masked_prediction,
    prediction_preserved,
)
from ..io import atomic_write_csv, format_number
from ..recorder import forward_hooks_suspended
from .batch import as_batch
from .probe import LayerProbeHandler

__all__ = ["AttributionHandler"]


class AttributionHandler(LayerProbeHandler):
    """Faithfulness of an attribution method's maps, computed on every batch while a MONAI evaluator runs.

    For every batch, the method explains the input (``image_key`` of ``engine.state.output``, where MONAI evaluators
    put it) and, per case: Prediction Preserved and Image Preserved (see
    :func:`~monai_protoseg.attribution.prediction_preserved`, ``P`` and ``P'`` both from the network run on the whole
    input without the engine's inferer), and the deletion and insertion areas (see
    :func:`~monai_protoseg.attribution.deletion_insertion`, on the region the method explained). The method and these
    passes run with the network's other forward hooks suspended, so handlers recording layers (such as
    :class:`~monai_protoseg.handlers.SAScoreHandler`) see only the evaluator's own pass, and leave the network as it
    was, so a trainer sharing it is untouched. Values are buffered in a MONAI ``Cumulative`` (gathered across ranks).

    Results, after each evaluator epoch: ``engine.state.metrics[f"{name}_prediction_preserved"]``,
    ``f"{name}_image_preserved"``, ``f"{name}_deletion_auc"`` and ``f"{name}_insertion_auc"``, the means over the
    cases (NaN ignored: a case whose explained region is empty has none of the four, its map being undefined), set
    before any other epoch-completed handler runs; with ``output_dir``, ``f"{name}.csv"`` there (``case``, ``class``
    and the four values per case, written atomically by rank ``save_rank``). A faulty batch (a NaN in the image, a
    non-finite network output, a bad label) is refused with a ValueError naming the method. Passed in an evaluator's
    ``additional_metrics`` (or ``key_val_metric``), the mean Prediction Preserved is also written under the metric's
    own name.

    The cost per case is the method's (for example ``n_masks`` forward passes for RISE) plus ``2 * (deletion_steps +
    1) + 3`` forward passes.

    Args:
        method: the attribution method (its network, class, activation and region are used).
        output_dir: folder of the CSV; None: no file.
        name: prefix of the result keys and name of the CSV.
        image_key: the key of the input image in ``engine.state.output``; its meta data in the batch names the cases.
        label_key: the key of the label in the batch the network saw (``engine.state.batch``), read when the
            method's region is ``"label"``.
        class_name: the class's name in the CSV; default ``f"class{method.class_index}"``.
        deletion_steps: chunks of pixels removed or revealed in the deletion and insertion curves.
        baseline: what replaces removed pixels: ``"zero"``, ``"blur"`` or a tensor (see ``deletion_insertion``).
        batch_size: modified inputs per forward pass of the deletion and insertion curves.
        save_rank: the distributed rank that writes the CSV.

    Example:
        >>> from monai.engines import SupervisedEvaluator
        >>> from monai.networks.nets import UNet
        >>> from monai_protoseg.attribution.rise import RISE
        >>> network = UNet(2, 1, 2, channels=(4, 8), strides=(2,))
        >>> handler = AttributionHandler(RISE(network, n_masks=4), deletion_steps=2)
        >>> evaluator = SupervisedEvaluator(device=torch.device("cpu"), network=network, val_handlers=[handler],
        ...                                 val_data_loader=[{"image": torch.rand(1, 1, 16, 16)}])
        >>> evaluator.run()
        >>> sorted(evaluator.state.metrics)[:2]
        ['attribution_deletion_auc', 'attribution_image_preserved']
    """

    def __init__(
        self,
        method: SegmentationAttribution,
        output_dir: str | os.PathLike | None = None,
        name: str = "attribution",
        image_key: str = CommonKeys.IMAGE,
        label_key: str = CommonKeys.LABEL,
        class_name: str | None = None,
        deletion_steps: int = 16,
        baseline: str | torch.Tensor = "zero",
        batch_size: int = 16,
        save_rank: int = 0,
    ) -> None:
        if not isinstance(method, SegmentationAttribution):
            raise TypeError(f"method must be a SegmentationAttribution (GradCAM, RISE, ...), got "
                            f"{type(method).__name__}.")
        if deletion_steps < 1:
            raise ValueError(f"deletion_steps must be at least 1, got {deletion_steps}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        class_names = None if class_name is None else [class_name]
        super().__init__([], method.network, method.activation, class_names, image_key=image_key, label_key=label_key)
        self.method = method
        self.class_indices = [method.class_index]
        self.output_dir = None if output_dir is None else pathlib.Path(output_dir)
        self.name = name
        self.deletion_steps = deletion_steps
        self.baseline = baseline
        self.batch_size = batch_size
        self.save_rank = save_rank
        self.values = Cumulative()  # (N, 4): the COLUMNS of every case

    def epoch_started(self, engine: Engine) -> None:
        """Start a new accumulation."""
        super().epoch_started(engine)
        self.values.reset()

    def iteration_completed(self, engine: Engine) -> None:
        """Explain the batch that just ran and score the maps."""
        inputs = self._from_output(engine, self.image_key)
        by_label = isinstance(self.method.region, str) and self.method.region == "label"
        label = self.reference_label(engine) if by_label else None
        if by_label and label is None:
            raise ValueError(f"{type(self).__name__}: the method's region is 'label', but engine.state.batch has no "
                             f"{self.label_key!r}.")
        label = None if label is None else label.to(inputs.device)
        network, class_index, activation = self.method.network, self.method.class_index, self.method.activation
        with forward_hooks_suspended(network):
            result = self.method(inputs, label=label)
            prob = masked_prediction(network, inputs, torch.ones_like(result.map), class_index, activation)
            prob_masked = masked_prediction(network, inputs, result.map, class_index, activation)
            deletion, insertion, _ = deletion_insertion(
                network, inputs, result.map, class_index, activation, steps=self.deletion_steps,
                baseline=self.baseline, region=result.region, batch_size=self.batch_size,
            )
        values = [prediction_preserved(prob, prob_masked), image_preserved(result.map), deletion, insertion]
        self.values.extend(torch.stack([value.double() for value in values], dim=1))
        self.record_case_names(engine, inputs.shape[0])

    def epoch_completed(self, engine: Engine) -> None:
        """Write the means to ``engine.state.metrics`` and, with ``output_dir``, the per-case CSV."""
        values = self.values.get_buffer()  # (N, 4), gathered across ranks
        means = values.nanmean(0)
        for column, mean in zip(COLUMNS, means):
            engine.state.metrics[f"{self.name}_{column}"] = mean.item()
        if self.metric_name is not None:
            engine.state.metrics[self.metric_name] = engine.state.metrics[f"{self.name}_prediction_preserved"]
        cases = self.case_names()
        if self.output_dir is not None and idist.get_rank() == self.save_rank:
            class_name = self.class_labels()[0]
            rows = [[case, class_name, *(format_number(value) for value in row)]
                    for case, row in zip(cases, values.cpu())]
            atomic_write_csv(self.output_dir / f"{self.name}.csv", ["case", "class", *COLUMNS], rows)

    def _from_output(self, engine: Engine, key: str) -> torch.Tensor:
        """The batch of ``key`` from ``engine.state.output`` (a dict, or MONAI's decollated list of dicts)."""
        output = engine.state.output
        if isinstance(output, dict):
            values = [output.get(key)]
        elif isinstance(output, (list, tuple)) and all(isinstance(item, dict) for item in output):
            values = [item.get(key) for item in output]
        else:
            values = [None]
        if not values or any(value is None for value in values):
            raise ValueError(f"{type(self).__name__} needs '{key}' in engine.state.output (MONAI evaluators put "
                             f"the image and the label there).")
        return as_batch(values[0] if isinstance(output, dict) else values)
