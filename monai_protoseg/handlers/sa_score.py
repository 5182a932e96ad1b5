"""Ignite handler that scores every probed layer's segmentation ability during MONAI validation."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Sequence

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from monai.utils import CommonKeys
from torch import nn

from ..inferers import DEFAULT_MEMORY_BUDGET
from ..io import atomic_write_csv, format_number
from ..layer_names import write_layer_names
from ..metrics import SAScoreMetric
from ..protoseg import sa_scores
from ..recorder import candidate_layers
from .probe import LayerProbeHandler, second_item
from .scoring import ScoringRequest, batch_scoring

__all__ = ["SAScoreHandler"]


class SAScoreHandler(LayerProbeHandler):
    """Layer-wise (and unit-wise) SA scores of a network, computed while a MONAI evaluator runs.

    Add it to a ``SupervisedEvaluator``'s handlers and nothing else changes. Hooks are registered when the evaluator
    starts and removed when it completes or raises, so a trainer sharing the network is untouched. Prototypes are
    guided by the network's soft output, recorded from the network itself (before any post-transform discretises
    ``pred``). Classes are scored one-vs-rest. The label is read from the batch the network saw, on its grid, so an
    evaluator whose postprocessing inverts ``pred`` and ``label`` to the original image (``Invertd``) is scored
    right; a label on another grid is refused, naming both grids. When the evaluator's inferer is a ``SlidingWindowInferer`` it is
    wrapped in a :class:`~monai_protoseg.ProtoSegInferer` while the evaluator runs, so prototypes and maps cover the
    whole image, not one window; the original inferer is put back when the run completes or raises.

    Results, after each evaluator epoch, named by each layer's readable alias (``self.layer_aliases``, see
    :func:`~monai_protoseg.layer_aliases`: ``bottleneck``, not ``model.1.submodule.1.submodule``), so logs and
    TensorBoard tags read: ``engine.state.metrics[f"{name}_{alias}"]`` (mean over classes),
    ``f"{name}_{alias}_{class}"`` per class when there are several, ``f"{name}_mean"`` over layers and classes,
    ``f"{name}_undefined"`` (image-layer-class scores that were NaN); per image, ``engine.state.metric_details
    [f"{name}_{alias}"]`` of shape ``(N, K)`` as MONAI's ``MetricsSaver`` writes them; with ``unit_wise``,
    ``self.unit_scores = {layer: (K, C) mean unit SA}`` (by qualified name). They are set before any other epoch-completed handler
    runs, so ``StatsHandler`` and ``TensorBoardStatsHandler`` see them whatever their order. Passed in an
    evaluator's ``additional_metrics`` (or ``key_val_metric``) instead, it also writes ``f"{name}_mean"`` under the
    metric's own name.

    Args:
        layers: qualified names of the layers to probe; ``None``: :func:`~monai_protoseg.candidate_layers` of the
            network, chosen when the engine starts.
        network: the network; by default ``engine.network`` when the engine starts.
        output_transform: ``None`` (default) reads the label from ``engine.state.batch[label_key]``, the batch the
            network saw. Given, it gives ``(pred, label)`` from ``engine.state.output`` (MONAI ``from_engine``
            style), after the evaluator's postprocessing: the label must still be on the network's grid.
        activation: ``"auto"`` (from the evaluator's postprocessing, else the output's channel count; logged),
            ``"sigmoid"``, ``"softmax"`` or ``None`` (the network outputs probabilities already).
        class_names: one name per scored class; default ``"class{index}"`` with the output channel index.
        include_background: score output channel 0 too. A single-channel output is always scored.
        unit_wise: also compute unit-wise SA.
        mask_key: key of a binary ``(1, *S)`` tissue mask in the batch; only its pixels feed the prototypes.
        reference: ``"label"`` scores against the ground truth, ``"pred"`` against the binarised prediction
            (argmax for softmax, ``> 0.5`` otherwise).
        name: prefix of the result keys.
        save_details: keep per-image scores in ``engine.state.metric_details``.
        ignore_empty: empty-reference rule of :func:`~monai_protoseg.sa_score` (NaN when ``True``).
        output_dir: when given, each epoch also writes ``f"{name}_layers.csv"`` (a row per case and class, a column
            per layer alias) and, with ``unit_wise``, ``f"{name}_units.csv"`` (mean SA per layer alias, qualified
            name, class and unit) there, atomically, and adds the layers to ``layer_names.csv`` (alias, qualified
            name; see :func:`~monai_protoseg.layer_names.write_layer_names`); the files the report reads.
        image_key: the batch key of the network's input, whose meta data names the cases in those files.
        save_rank: the distributed rank that writes the files.
        label_key: the batch key of the label.
        guide: ``"soft"`` (prototypes weighted by the network's probabilities) or ``"binary"`` (by its binarised
            prediction).
        mode: with a ``SlidingWindowInferer``: ``"stitch"``, ``"stream"`` or ``"auto"`` (the default: stream when the
            stitched features would exceed ``memory_budget``; unit-wise scores always stitch); see :class:`~monai_protoseg.handlers.LayerProbeHandler`.
        memory_budget: bytes of stitched features above which ``mode="auto"`` streams (2 GiB by default).

    Example:
        >>> import torch
        >>> from monai.engines import SupervisedEvaluator
        >>> from monai.networks.nets import UNet
        >>> from monai_protoseg import SAScoreHandler
        >>> network = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))
        >>> label = torch.zeros(2, 1, 16, 16)
        >>> label[..., 4:12, 4:12] = 1
        >>> data = [{"image": label + 0.1 * torch.randn(2, 1, 16, 16), "label": label}]
        >>> sa = SAScoreHandler()  # the candidate layers of the network, chosen when the evaluator starts
        >>> evaluator = SupervisedEvaluator(torch.device("cpu"), data, network, val_handlers=[sa])
        >>> evaluator.run()
        >>> sa.layers
        ['model.0', 'model.1.submodule', 'model.2']
        >>> sorted(evaluator.state.metrics)
        ['sa_bottleneck', 'sa_encoder.1', 'sa_mean', 'sa_output', 'sa_undefined']
        >>> evaluator.state.metric_details["sa_output"].shape  # (images, classes)
        torch.Size([2, 1])
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        network: nn.Module | None = None,
        output_transform: Callable | None = None,
        activation: str | None = "auto",
        class_names: Sequence[str] | None = None,
        include_background: bool = False,
        unit_wise: bool = False,
        mask_key: str | None = None,
        reference: str = "label",
        name: str = "sa",
        save_details: bool = True,
        ignore_empty: bool = True,
        output_dir: str | os.PathLike | None = None,
        image_key: str = CommonKeys.IMAGE,
        save_rank: int = 0,
        label_key: str = CommonKeys.LABEL,
        guide: str = "soft",
        mode: str = "auto",
        memory_budget: float = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        if reference not in ("label", "pred"):
            raise ValueError(f"reference must be 'label' or 'pred', got {reference!r}.")
        label_transform = None if output_transform is None else second_item(output_transform)
        super().__init__(layers, network, activation, class_names, include_background, image_key, label_key,
                         label_transform, guide, mode, memory_budget)
        self.label_option = "output_transform"
        self.output_transform = output_transform
        self.unit_wise = unit_wise
        self.sliding_window_mode()  # mode='stream' with unit_wise fails here, not at the first batch
        self.ignore_empty = ignore_empty
        self.mask_key = mask_key
        self.reference = reference
        self.name = name
        self.save_details = save_details
        self.output_dir = None if output_dir is None else pathlib.Path(output_dir)
        self.save_rank = save_rank
        self.metric: SAScoreMetric | None = None
        self.unit_scores: dict[str, torch.Tensor] = {}

    def needs_features(self) -> bool:
        """Unit-wise scores need the layers' whole-image features."""
        return self.unit_wise

    def default_layers(self, network: nn.Module) -> list[str]:
        """:func:`~monai_protoseg.candidate_layers` of the network."""
        return candidate_layers(network)

    def started(self, engine: Engine) -> None:
        """Choose the layers (when not given), register the hooks, and make the metric."""
        super().started(engine)
        if self.metric is None:
            self.metric = SAScoreMetric(self.layers, unit_wise=self.unit_wise, ignore_empty=self.ignore_empty)

    def epoch_started(self, engine: Engine) -> None:
        """Start a new accumulation."""
        super().epoch_started(engine)
        self.metric.reset()

    def scoring_request(self, engine: Engine) -> ScoringRequest:
        """The layers, features, guide and reference of the batch that just ran (scored by :class:`BatchScoring`
        with the other scoring handlers of the engine)."""
        label = self.reference_label(engine)
        if label is None and self.reference == "label":
            source = "output_transform" if self.output_transform is not None else f"engine.state.batch[{self.label_key!r}]"
            raise ValueError(
                f"{type(self).__name__}(reference='label') found no label in {source}: set label_key (or "
                f"output_transform) to where the label is, or reference='pred' to score against the prediction."
            )
        prob, features = self.probed_batch(engine, None if label is None else label.shape[2:])
        classes = slice(self.class_indices[0], self.class_indices[-1] + 1)  # contiguous: a view, not a copy
        if self.reference == "pred":
            target = self.binarised(prob)
        else:
            target = self.shared_one_hot_label(engine, label.to(prob.device), prob.shape[1])
        mask = None if self.mask_key is None else self.batch_mask(engine, self.mask_key).to(prob.device)
        return ScoringRequest(self.layers, features, self.guide_weights(prob)[:, classes], target[:, classes], mask,
                              self.ignore_empty, self.share_key(self.mask_key), streamed=self.streamed_inferer())

    def iteration_completed(self, engine: Engine) -> None:
        """Score the batch that just ran."""
        request, scores = batch_scoring(engine).scores(engine, self)
        units = []
        if self.unit_wise:
            units = list(sa_scores({layer: request.features[layer] for layer in self.layers}, request.prob,
                                   request.target, request.mask, unit_wise=True,
                                   ignore_empty=self.ignore_empty).values())
        self.metric.extend(scores, *units)
        self.record_case_names(engine, scores.shape[0])

    def epoch_completed(self, engine: Engine) -> None:
        """Write the epoch's results to ``engine.state``."""
        scores = self.metric.layer_scores()  # (N, L, K), gathered across ranks once
        means = scores.nanmean(0)
        names = self.class_labels()
        metrics = engine.state.metrics
        aliases = [self.layer_aliases[layer] for layer in self.layers]
        for i, alias in enumerate(aliases):
            metrics[f"{self.name}_{alias}"] = means[i].nanmean().item()
            if len(names) > 1:
                for k, class_name in enumerate(names):
                    metrics[f"{self.name}_{alias}_{class_name}"] = means[i, k].item()
        metrics[f"{self.name}_mean"] = means.nanmean().item()
        if self.metric_name is not None:
            metrics[self.metric_name] = metrics[f"{self.name}_mean"]
        metrics[f"{self.name}_undefined"] = int(scores.isnan().sum())
        if self.save_details:
            details = getattr(engine.state, "metric_details", None)
            if details is None:
                details = engine.state.metric_details = {}
            for i, alias in enumerate(aliases):
                details[f"{self.name}_{alias}"] = scores[:, i]
        if self.metric.unit_wise:
            self.unit_scores = self.metric.unit_scores()
        cases = self.case_names()
        if self.output_dir is not None and idist.get_rank() == self.save_rank:
            self._write_csvs(cases, scores, names)

    def _write_csvs(self, cases: list[str], scores: torch.Tensor, names: list[str]) -> None:
        """``{name}_layers.csv``: one row per case and class, one column per layer alias; ``{name}_units.csv``: the
        mean SA of every unit (layer alias, qualified name, class, unit); the layers in ``layer_names.csv``."""
        aliases = self.layer_aliases
        rows = [[case, class_name, *(format_number(value) for value in scores[n, :, k])]
                for n, case in enumerate(cases) for k, class_name in enumerate(names)]
        header = ["case", "class", *(aliases[layer] for layer in self.layers)]
        atomic_write_csv(self.output_dir / f"{self.name}_layers.csv", header, rows)
        if self.metric.unit_wise:
            rows = [[aliases[layer], layer, class_name, unit, format_number(value)]
                    for layer, units in self.unit_scores.items()
                    for k, class_name in enumerate(names) for unit, value in enumerate(units[k])]
            atomic_write_csv(self.output_dir / f"{self.name}_units.csv",
                             ["layer", "qualified_name", "class", "unit", "sa"], rows)
        write_layer_names(self.output_dir, aliases)
