"""Ignite handler that estimates each prediction's quality without ground truth: the mean SA of the last layers
against the network's own prediction, turned into an estimated Dice by a calibration fitted during validation."""

from __future__ import annotations

import logging
import math
import os
import pathlib
from collections.abc import Callable, Sequence

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from monai.handlers import from_engine
from monai.metrics import DiceMetric
from monai.utils import CommonKeys
from torch import nn

from ..io import atomic_write_csv, format_number
from ..metrics import SAScoreMetric
from ..quality import QualityCalibration
from ..recorder import last_decoder_layers
from .probe import LayerProbeHandler, as_batch

__all__ = ["MeanSAQualityHandler"]


class MeanSAQualityHandler(LayerProbeHandler):
    """Per-case quality estimate of the network's prediction, written to a CSV; no ground truth needed.

    For every case and scored class: the SA of each chosen layer against the network's own binarised prediction
    (argmax for softmax, ``> 0.5`` otherwise; prototypes guided by the soft output), their mean (the paper's mean SA),
    the Dice estimated from it by a :class:`~monai_protoseg.QualityCalibration`, and a review flag. Attach it to the
    inference evaluator with ``calibration`` pointing at the JSON file fitted during validation; attach it to the
    validation evaluator with ``fit_calibration=True`` to fit that file on the cases that have ground truth (true Dice
    of the same binarised prediction against the label, all classes pooled into one line). Wherever the cases have
    labels, their true Dice is written next to the estimate, so held-out cases show how good the estimate is.

    Without a calibration (none given, its file missing, or too few valid cases to fit one), the CSV reports mean SA
    alone, ``estimated_dice`` is NaN, the ``note`` column and a log warning say why, and the review flag compares
    mean SA with ``threshold``. A case whose prediction is empty has undefined (NaN) SA and is flagged for review.

    CSV columns (``output_dir/filename``, written atomically once per epoch, by rank ``save_rank`` only): ``case``
    (the image file name without folder and extension, from the image's meta data), ``class``, ``mean_sa``,
    ``sa_{layer}`` per layer, ``true_dice`` (when the cases have labels), ``estimated_dice``, ``review``, ``note``.
    ``engine.state.metrics`` gets ``f"{name}_mean_sa"``, ``f"{name}_review"`` (the number of flagged rows),
    ``f"{name}_undefined"`` (rows whose mean SA is NaN), and when a calibration is fitted ``f"{name}_pearson_r"``,
    ``f"{name}_mae"`` and ``f"{name}_loo_mae"``.

    Args:
        layers: the layers whose SA is averaged; ``None``: the last two decoder layers
            (:func:`~monai_protoseg.last_decoder_layers`), chosen when the engine starts.
        output_dir: folder of the CSV.
        filename: name of the CSV.
        calibration: a ``QualityCalibration``, or the path of its JSON file (read when the engine starts; with
            ``fit_calibration``, where the fitted calibration is saved), or ``None``.
        fit_calibration: fit the calibration on this run's cases, which then need labels.
        threshold: a row is flagged for review when its estimated Dice (mean SA without calibration) is below it.
        network: the network; by default ``engine.network`` when the engine starts.
        label_transform: gives the labels from ``engine.state.output`` (``None`` or a missing key: no labels).
        activation: ``"sigmoid"``, ``"softmax"`` or ``None`` (the network outputs probabilities already).
        class_names: one name per scored class; default ``"class{index}"`` with the output channel index.
        include_background: score output channel 0 too. A single-channel output is always scored.
        image_key: the batch key whose meta data names the case.
        name: prefix of the ``engine.state.metrics`` keys.
        save_rank: the distributed rank that writes the files.
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        output_dir: str | os.PathLike = "./",
        filename: str = "quality.csv",
        calibration: QualityCalibration | str | os.PathLike | None = None,
        fit_calibration: bool = False,
        threshold: float = 0.7,
        network: nn.Module | None = None,
        label_transform: Callable = from_engine([CommonKeys.LABEL]),
        activation: str | None = "sigmoid",
        class_names: Sequence[str] | None = None,
        include_background: bool = False,
        image_key: str = CommonKeys.IMAGE,
        name: str = "quality",
        save_rank: int = 0,
    ) -> None:
        super().__init__(layers, network, activation, class_names, include_background, image_key)
        if fit_calibration and not isinstance(calibration, (str, os.PathLike, type(None))):
            raise ValueError("fit_calibration=True needs calibration to be the path to save it to, or None.")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1] (a Dice-like score), got {threshold}.")
        self.csv_path = pathlib.Path(output_dir) / filename
        self.calibration_path = None if isinstance(calibration, (QualityCalibration, type(None))) else pathlib.Path(
            calibration
        )
        self.calibration = calibration if isinstance(calibration, QualityCalibration) else None
        self.fit_calibration = fit_calibration
        self.threshold = threshold
        self.label_transform = label_transform
        self.name = name
        self.save_rank = save_rank
        self.logger = logging.getLogger(__name__)
        self.metric: SAScoreMetric | None = None
        self.dice = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
        self._no_calibration = "no calibration given"
        self._with_labels: bool | None = None

    def default_layers(self, network: nn.Module) -> list[str]:
        """The last two decoder layers of ``network``."""
        return last_decoder_layers(network)

    def started(self, engine: Engine) -> None:
        """Choose the layers, register the hooks, and read the calibration file unless it is to be fitted."""
        super().started(engine)
        if self.metric is None:
            self.metric = SAScoreMetric(self.layers)
        if self.calibration_path is not None and not self.fit_calibration:
            if self.calibration_path.exists():
                self.calibration = QualityCalibration.load(self.calibration_path)
            else:
                self.calibration = None
                self._no_calibration = f"no calibration file at {self.calibration_path}"
        if self.calibration is None and not self.fit_calibration:
            self.logger.warning(f"{type(self).__name__}: {self._no_calibration}; reporting mean SA alone.")

    def epoch_started(self, engine: Engine) -> None:
        """Start a new accumulation."""
        super().epoch_started(engine)
        self.metric.reset()
        self.dice.reset()
        self._with_labels = None

    def iteration_completed(self, engine: Engine) -> None:
        """Score the batch that just ran against its own prediction (and its label, where there is one)."""
        try:
            labels = self.label_transform(engine.state.output)
        except (KeyError, TypeError):  # no label key in the output
            labels = None
        if labels is None or any(item is None for item in labels):
            if self.fit_calibration:
                raise ValueError(
                    f"{type(self).__name__}(fit_calibration=True) needs labels, but label_transform found none in "
                    f"engine.state.output."
                )
            label = None
        else:
            label = as_batch(labels)
        if self._with_labels is not None and self._with_labels != (label is not None):
            raise ValueError(f"{type(self).__name__}: some batches have labels and others do not.")
        self._with_labels = label is not None
        prob, features = self.probed_batch(None if label is None else label.shape[2:])
        classes = slice(self.class_indices[0], self.class_indices[-1] + 1)  # contiguous: a view, not a copy
        prediction = self.binarised(prob)[:, classes]
        self.metric(prob[:, classes], prediction, features=features)
        if label is not None:
            self.dice(prediction.float(), self.one_hot_label(label.to(prob.device), prob.shape[1])[:, classes].float())
        self.record_case_names(engine, prob.shape[0])

    def epoch_completed(self, engine: Engine) -> None:
        """Fit the calibration if asked, estimate Dice, write the CSV and the summary metrics."""
        scores = self.metric.layer_scores()  # (N, L, K), gathered across ranks
        mean_sa = scores.nanmean(1)  # (N, K)
        cases = self.case_names()
        true_dice = self.dice.get_buffer() if self._with_labels else None
        metrics = engine.state.metrics
        if self.fit_calibration:
            self._fit(mean_sa, true_dice, metrics)
        if self.calibration is not None:
            estimated = self.calibration.predict(mean_sa.double())
            note = ""
        else:
            estimated = torch.full_like(mean_sa, math.nan, dtype=torch.float64)
            note = f"{self._no_calibration}: mean SA only"
        review = ~((estimated if self.calibration is not None else mean_sa) >= self.threshold)  # NaN is flagged
        metrics[f"{self.name}_mean_sa"] = mean_sa.nanmean().item()
        if self.metric_name is not None:
            metrics[self.metric_name] = metrics[f"{self.name}_mean_sa"]
        metrics[f"{self.name}_review"] = int(review.sum())
        metrics[f"{self.name}_undefined"] = int(mean_sa.isnan().sum())
        if idist.get_rank() == self.save_rank:
            self._write_csv(cases, scores, mean_sa, true_dice, estimated, review, note)
            self.logger.info(
                f"{type(self).__name__}: {len(cases)} case(s), mean SA {metrics[f'{self.name}_mean_sa']:.4f}, "
                f"{metrics[f'{self.name}_review']} row(s) flagged for review; wrote {self.csv_path}"
            )

    def _fit(self, mean_sa: torch.Tensor, true_dice: torch.Tensor, metrics: dict) -> None:
        """Fit the calibration on (mean SA, true Dice) of every case and class, save it, report its fit."""
        try:
            self.calibration = QualityCalibration.fit(mean_sa.flatten(), true_dice.flatten())
        except ValueError as error:
            self.calibration = None
            self._no_calibration = f"calibration not fitted ({error})"
            if idist.get_rank() == self.save_rank:
                self.logger.warning(f"{type(self).__name__}: {self._no_calibration}")
            return
        metrics[f"{self.name}_pearson_r"] = self.calibration.pearson_r
        metrics[f"{self.name}_mae"] = self.calibration.mae
        metrics[f"{self.name}_loo_mae"] = self.calibration.loo_mae
        if idist.get_rank() != self.save_rank:
            return
        if self.calibration_path is not None:
            self.calibration.save(self.calibration_path)
        self.logger.info(
            f"{type(self).__name__}: calibration fitted on {self.calibration.n_cases} case-class pair(s): "
            f"Pearson r {self.calibration.pearson_r:.3f}, leave-one-out MAE {self.calibration.loo_mae:.3f}"
            + (f"; saved to {self.calibration_path}" if self.calibration_path is not None else "")
        )

    def _write_csv(
        self,
        cases: list[str],
        scores: torch.Tensor,
        mean_sa: torch.Tensor,
        true_dice: torch.Tensor | None,
        estimated: torch.Tensor,
        review: torch.Tensor,
        note: str,
    ) -> None:
        columns = ["case", "class", "mean_sa", *(f"sa_{layer}" for layer in self.layers)]
        columns += ["true_dice"] if true_dice is not None else []
        columns += ["estimated_dice", "review", "note"]
        rows = []
        for n, case in enumerate(cases):
            for k, class_name in enumerate(self.class_labels()):
                row_note = "empty prediction: SA undefined" if math.isnan(mean_sa[n, k]) else note
                values = [mean_sa[n, k], *scores[n, :, k]]
                values += [true_dice[n, k]] if true_dice is not None else []
                rows.append([case, class_name, *(format_number(v) for v in values), format_number(estimated[n, k]),
                             bool(review[n, k]), row_note])
        atomic_write_csv(self.csv_path, columns, rows)

