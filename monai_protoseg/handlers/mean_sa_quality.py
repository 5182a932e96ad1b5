"""Ignite handler that estimates each prediction's quality without ground truth: the mean SA of the last layers
against the network's own prediction, turned into an estimated Dice by a calibration fitted during validation, or the
SA profile and the prediction's confidence, turned into an estimated Dice by a quality estimator."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine
from monai.metrics import Cumulative, DiceMetric
from monai.networks import eval_mode
from monai.utils import CommonKeys, string_list_all_gather
from monai.utils import ImageMetaKey as Key
from torch import nn

from ..estimator import (
    ALPHAS,
    MAX_FOLDS,
    MIN_GROUPS,
    MIN_ROWS,
    PER_CLASS,
    PROTOTYPE_FEATURES,
    SELECTIONS,
    SPREAD_PREFIX,
    TARGETS,
    TTA_FEATURE,
    QualityEstimator,
    activation_spread,
    aliased_feature,
    feature_names,
    is_option,
    prototype_margins,
    quality_features,
)
from ..fingerprint import NetworkFingerprint, architecture_digest, weights_digest
from ..inferers import DEFAULT_MEMORY_BUDGET, ProtoSegInferer
from ..io import atomic_write_csv, format_number
from ..layer_names import write_layer_names
from ..metrics import SAScoreMetric
from ..quality import QualityCalibration
from ..recorder import candidate_layers, forward_hooks_suspended, last_decoder_layers, layer_list
from .batch import as_batch
from .probe import LayerProbeHandler
from .scoring import ScoringRequest, batch_scoring

__all__ = ["MeanSAQualityHandler", "CV_FILENAME", "REVIEW_RULES"]

CV_FILENAME = "quality_cv.csv"
"""The estimator's cross-validation table, written beside the quality CSV."""

REVIEW_RULES = ("estimate", "upper")
"""``review_rule``: flag a row whose estimate, or whose interval's upper bound, is below the threshold."""


class MeanSAQualityHandler(LayerProbeHandler):
    """Per-case quality estimate of the network's prediction, written to a CSV; no ground truth needed.

    For every case and scored class: the SA of each chosen layer against the network's own binarised prediction
    (argmax for softmax, ``> 0.5`` otherwise; prototypes guided by the soft output), their mean (the paper's mean SA),
    an estimated Dice, and a review flag. Wherever the cases have labels, their true Dice (of the same binarised
    prediction against the label) is written next to the estimate, so held-out cases show how good the estimate is.

    Two ways to estimate Dice, each fitted during validation on cases with labels and read back at inference:

    - ``calibration``: a :class:`~monai_protoseg.QualityCalibration`, a straight line on mean SA
      (``fit_calibration=True`` fits it, all classes pooled into one line);
    - ``estimator``: a :class:`~monai_protoseg.QualityEstimator`, a ridge regression on the SA of every probed layer
      (``profile_layers`` and ``layers``), mean SA, the prediction's confidence and volume, and optionally its
      disagreement with the prediction for the flipped input (``tta_flip``); see :mod:`monai_protoseg.estimator`.
      ``fit_estimator=True`` fits it on every case and class (rows grouped by case for cross-validation) and logs
      the cross-validated Pearson r and MAE of each feature set. The CSV then also gets every feature column.

    The estimator is used when there is one; otherwise the calibration; otherwise (none given, file missing, or too
    few valid cases to fit: at least ``monai_protoseg.estimator.MIN_ROWS`` rows from ``MIN_GROUPS`` cases for the
    estimator, ``monai_protoseg.quality.MIN_CASES`` for the calibration) the CSV reports mean SA alone,
    ``estimated_dice`` is NaN, and the review flag compares mean SA with ``threshold``. The ``note`` column names the
    method (``estimator (<feature set>)``, ``calibration``, ``mean SA only``) and why a method was not used; the
    log says so too. A case whose SA is undefined (empty prediction) has no estimate and is flagged for review.

    A calibration or estimator fitted here is saved with the network's fingerprint
    (:class:`~monai_protoseg.fingerprint.NetworkFingerprint`: its architecture and probed layers; its weights). One
    read back (file or object) with a fingerprint is checked: fitted for another architecture or other layers is an
    error; fitted on other weights of this network (the best checkpoint of a training run is often from an earlier
    epoch than the last fit) is allowed, with a warning and the note ``..., fitted on other weights``. A file without a
    fingerprint (written by an older version) is used with a warning that it cannot be checked. A fit that fails
    leaves an earlier file in place.

    CSV columns (``output_dir/filename``, written atomically once per epoch, by rank ``save_rank`` only): ``case``
    (the image file name without folder and extension, from the image's meta data; names that repeat get ``#0``,
    ``#1``, ... in order), ``class``, ``group`` (only with the ``group`` option), ``mean_sa``,
    ``sa_{alias}`` per probed layer (its readable alias, see :func:`~monai_protoseg.layer_aliases`; ``layer_names.csv``
    beside the CSV pairs each alias with its qualified name), with an estimator (given or fitted) the other features
    (``fg_prob``, ``max_prob``, ``volume``, ``entropy``, ``boundary_margin``, ``spread_{alias}`` per probed layer,
    ``proto_in``, ``proto_out``, ``proto_near``, ``tta_disagreement``; the spread and prototype features come from the
    layers' recorded features, no extra network pass, and are left out when a sliding window streams), then
    ``true_dice`` (when the cases have labels), ``estimated_dice``, ``estimate_low``, ``estimate_high`` (the interval;
    NaN where there is none), ``calibrated_mean_sa`` (only when a mean-SA calibration exists), ``review``, ``note``
    (always names the method).
    With an estimator in use, its CV table goes to ``output_dir/quality_cv.csv`` (the columns of
    :meth:`~monai_protoseg.QualityEstimator.cv_rows`). ``engine.state.metrics`` gets ``f"{name}_mean_sa"``,
    ``f"{name}_review"`` (the number of flagged rows), ``f"{name}_undefined"`` (rows whose mean SA is NaN), when a
    calibration is fitted ``f"{name}_pearson_r"``, ``f"{name}_mae"`` and ``f"{name}_loo_mae"``, and when an estimator
    is fitted ``f"{name}_estimator_cv_r"`` and ``f"{name}_estimator_cv_mae"`` (nested cross-validation).

    Honest figures and intervals: the estimator's selection (penalty and feature set) is measured by nested
    cross-validation grouped by ``group`` (the selection repeated inside every outer training part); the logged and
    saved CV figures are the nested ones. Every estimate gets a split-conformal interval of nominal ``coverage`` from
    the nested out-of-fold errors (estimator) or the leave-one-out errors (calibration).

    Args:
        layers: the layers whose SA is averaged into mean SA; ``None``: the last two decoder layers
            (:func:`~monai_protoseg.last_decoder_layers`), chosen when the engine starts.
        output_dir: folder of the CSV.
        filename: name of the CSV.
        calibration: a ``QualityCalibration``, or the path of its JSON file (read when the engine starts; with
            ``fit_calibration``, where the fitted calibration is saved), or ``None``.
        fit_calibration: fit the calibration on this run's cases, which then need labels.
        threshold: a row is flagged for review when its estimated Dice (mean SA without an estimate) is below it.
        network: the network; by default ``engine.network`` when the engine starts.
        label_transform: ``None`` (default) reads the labels from ``engine.state.batch[label_key]``, the batch the
            network saw (no such key: no labels). Given, it gives the labels from ``engine.state.output``, after the
            evaluator's postprocessing: they must still be on the network's grid (a ``KeyError``: no labels).
        activation: ``"auto"`` (from the evaluator's postprocessing, else the output's channel count; logged),
            ``"sigmoid"``, ``"softmax"`` or ``None`` (the network outputs probabilities already).
        class_names: one name per scored class; default ``"class{index}"`` with the output channel index.
        include_background: score output channel 0 too. A single-channel output is always scored.
        image_key: the key of the input image: its meta data in the batch names the case; with ``tta_flip`` the
            flipped pass reads the image from ``engine.state.output`` (where MONAI evaluators put it).
        name: prefix of the ``engine.state.metrics`` keys.
        save_rank: the distributed rank that writes the files.
        estimator: a ``QualityEstimator``, or the path of its JSON file (read when the engine starts, and checked to
            be fitted on the same layers and features; with ``fit_estimator``, where the fitted estimator is saved),
            or ``None``.
        fit_estimator: fit the estimator on this run's cases, which then need labels.
        profile_layers: the layers of the SA profile, probed with ``layers`` when there is an estimator; ``None``:
            :func:`~monai_protoseg.candidate_layers` of the network, chosen when the engine starts.
        tta_flip: with an estimator, also run the network (through the engine's inferer) on the input flipped, for
            the ``tta_disagreement`` feature: ``True`` flips the last spatial axis; a sequence of spatial axes (0 is
            the first spatial axis, -1 the last) flips each in turn, one extra forward pass each, and averages the
            disagreements. For axial slices of a RAS volume the left-right axis is the anatomically symmetric one.
            The passes run in eval mode with the network's forward hooks suspended, so no layer recording sees them.
        label_key: the batch key of the labels.
        guide: ``"soft"`` (prototypes weighted by the network's probabilities) or ``"binary"`` (by its binarised
            prediction).
        group: what keeps rows together in the estimator's cross-validation folds: ``None`` groups by case name; a
            string is a meta-data key of the image (e.g. a patient or volume id); a callable gets each case's
            meta-data dict (of the image) and returns its group. Slices of one volume, or augmented copies of one
            case, should share a group. The CSV then gets a ``group`` column.
        feature_sets: ``{name: [feature names]}`` compared by the estimator; ``None``: the default sets.
        alphas: the ridge penalties tried; ``None``: ``monai_protoseg.estimator.ALPHAS``.
        selection: how the estimator chooses its feature set: ``"one_se_largest"`` (the default: the set with the
            most features within one standard error of the best CV MAE), ``"one_se"`` (the fewest features within
            it) or ``"min"`` (the best CV MAE); see :data:`~monai_protoseg.estimator.SELECTIONS`.
        target: the estimator's regression target: ``"logit"`` (the default: the logit of Dice, estimates through the
            sigmoid) or ``"identity"`` (Dice); see :data:`~monai_protoseg.estimator.TARGETS`.
        per_class: with two or more scored classes, also fit one estimator per class and keep them when their nested
            MAE beats the pooled estimator's by more than one standard error (``"auto"``, the default), always
            (``True``) or never (``False``); see :data:`~monai_protoseg.estimator.PER_CLASS`.
        coverage: nominal coverage of the intervals, in (0, 1).
        class_intervals: each class gets the interval width of its own residuals (when it has enough of them).
        review_rule: ``"upper"`` flags a row whose interval's upper bound is below ``threshold`` (confidently bad);
            ``"estimate"`` a row whose estimate is below it. Where there is no interval the estimate is used.
        mode: with a ``SlidingWindowInferer``: ``"stitch"``, ``"stream"`` or ``"auto"`` (the default: stream when the
            stitched features would exceed ``memory_budget``); see :class:`~monai_protoseg.handlers.LayerProbeHandler`.
        memory_budget: bytes of stitched features above which ``mode="auto"`` streams (2 GiB by default).

    Attributes:
        layers: every probed layer (mean-SA layers, plus the profile layers with an estimator), set when the engine
            starts.
        mean_sa_layers: the layers averaged into mean SA.
        profile_layers: the SA-profile layers (``[]`` without an estimator).
        calibration: the calibration in use, or ``None``.
        estimator: the estimator in use, or ``None``.

    Example:
        >>> import csv, tempfile
        >>> import torch
        >>> from monai.engines import SupervisedEvaluator
        >>> from monai.networks.nets import UNet
        >>> from monai_protoseg import MeanSAQualityHandler
        >>> network = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2))
        >>> image = torch.zeros(2, 1, 16, 16)
        >>> image[..., 4:12, 4:12] = 1
        >>> quality = MeanSAQualityHandler(output_dir=tempfile.mkdtemp())  # no labels needed
        >>> SupervisedEvaluator(torch.device("cpu"), [{"image": image}], network, val_handlers=[quality]).run()
        >>> quality.mean_sa_layers  # the last two decoder layers
        ['model.1.submodule.1.submodule', 'model.1.submodule.2']
        >>> with open(quality.csv_path, newline="") as stream:
        ...     rows = list(csv.DictReader(stream))
        >>> len(rows), rows[0]["note"]  # one row per case and class; no calibration given
        (2, 'no calibration given: mean SA only')
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
        label_transform: Callable | None = None,
        activation: str | None = "auto",
        class_names: Sequence[str] | None = None,
        include_background: bool = False,
        image_key: str = CommonKeys.IMAGE,
        name: str = "quality",
        save_rank: int = 0,
        estimator: QualityEstimator | str | os.PathLike | None = None,
        fit_estimator: bool = False,
        profile_layers: Sequence[str] | None = None,
        tta_flip: bool | Sequence[int] = False,
        label_key: str = CommonKeys.LABEL,
        guide: str = "soft",
        mode: str = "auto",
        memory_budget: float = DEFAULT_MEMORY_BUDGET,
        group: str | Callable[[Mapping], Any] | None = None,
        feature_sets: Mapping[str, Sequence[str]] | None = None,
        alphas: Sequence[float] | None = None,
        selection: str = "one_se_largest",
        target: str = "logit",
        per_class: bool | str = "auto",
        coverage: float = 0.9,
        class_intervals: bool = False,
        review_rule: str = "estimate",
    ) -> None:
        super().__init__(None, network, activation, class_names, include_background, image_key, label_key,
                         label_transform, guide, mode, memory_budget)
        if fit_calibration and not isinstance(calibration, (str, os.PathLike, type(None))):
            raise ValueError("fit_calibration=True needs calibration to be the path to save it to, or None.")
        if fit_estimator and not isinstance(estimator, (str, os.PathLike, type(None))):
            raise ValueError("fit_estimator=True needs estimator to be the path to save it to, or None.")
        if tta_flip and estimator is None and not fit_estimator:
            raise ValueError("tta_flip=True computes a feature of the quality estimator: pass estimator=... or "
                             "fit_estimator=True.")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1] (a Dice-like score), got {threshold}.")
        if not isinstance(coverage, (int, float)) or isinstance(coverage, bool) or not 0 < coverage < 1:
            raise ValueError(f"coverage must be a number in (0, 1), got {coverage!r}.")
        if review_rule not in REVIEW_RULES:
            raise ValueError(f"review_rule must be one of {REVIEW_RULES}, got {review_rule!r}.")
        for argument, value, allowed in (("selection", selection, SELECTIONS), ("target", target, TARGETS),
                                         ("per_class", per_class, PER_CLASS)):
            if not is_option(value, allowed):
                raise ValueError(f"{argument} must be one of {allowed}, got {value!r}.")
        if group is not None and not (isinstance(group, str) or callable(group)):
            raise ValueError(f"group must be None, a meta-data key (str) or a callable of a case's meta data, got "
                             f"{type(group).__name__}.")
        self.tta_axes = _tta_axes(tta_flip)
        self.group = group
        self.feature_sets = None if feature_sets is None else {name: list(v) for name, v in feature_sets.items()}
        self.alphas = ALPHAS if alphas is None else tuple(alphas)
        self.selection = selection
        self.target = target
        self.per_class = per_class
        self.coverage = float(coverage)
        self.class_intervals = class_intervals
        self.review_rule = review_rule
        self._groups: list[str] = []
        self.csv_path = pathlib.Path(output_dir) / filename
        self.calibration_path = None if isinstance(calibration, (QualityCalibration, type(None))) else pathlib.Path(
            calibration
        )
        self.calibration = calibration if isinstance(calibration, QualityCalibration) else None
        self.fit_calibration = fit_calibration
        self.estimator_path = None if isinstance(estimator, (QualityEstimator, type(None))) else pathlib.Path(estimator)
        self.estimator = estimator if isinstance(estimator, QualityEstimator) else None
        self.fit_estimator = fit_estimator
        self.use_estimator = estimator is not None or fit_estimator
        self.mean_sa_layers = None if layers is None else layer_list(layers)
        profile = None if profile_layers is None else layer_list(profile_layers, "profile_layers")
        self.profile_layers = profile if self.use_estimator else []
        self.tta_flip = bool(self.tta_axes)
        self.threshold = threshold
        self.name = name
        self.save_rank = save_rank
        self.metric: SAScoreMetric | None = None
        self.dice = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
        self.feature_rows = Cumulative()  # (N, K, F), with an estimator
        self.feature_names: list[str] = []
        self._no_calibration = "no calibration given"
        self._no_estimator = ""
        self._mean_sa_index: list[int] = []
        self._with_labels: bool | None = None
        self._streamed = False

    def default_layers(self, network: nn.Module) -> list[str]:
        """The profile layers (with an estimator), then the mean-SA layers not among them."""
        if self.mean_sa_layers is None:
            self.mean_sa_layers = last_decoder_layers(network)
        if self.profile_layers is None:
            self.profile_layers = candidate_layers(network)
        return list(dict.fromkeys([*self.profile_layers, *self.mean_sa_layers]))

    def started(self, engine: Engine) -> None:
        """Choose the layers, register the hooks, and read the calibration and estimator files unless fitted here."""
        super().started(engine)
        if self.metric is None:
            self.metric = SAScoreMetric(self.layers)
        self._mean_sa_index = [self.layers.index(layer) for layer in self.mean_sa_layers]
        if self.calibration_path is not None and not self.fit_calibration:
            if self.calibration_path.exists():
                self.calibration = QualityCalibration.load(self.calibration_path)
            else:
                self.calibration = None
                self._no_calibration = f"no calibration file at {self.calibration_path}"
        if self.calibration is not None and not self.fit_calibration:
            self._check_network(self.calibration, self.calibration_path, self.mean_sa_layers)
        if self.use_estimator:
            self.feature_names = feature_names(self.layers, tta=self.tta_flip, prototype=True, spread=True)
            if not self.fit_estimator:
                self._read_estimator()
        if self.estimator is None and not self.fit_estimator:
            if self.use_estimator:
                self.logger.warning(f"{type(self).__name__}: {self._no_estimator}; using the calibration, if any.")
            if self.calibration is None and not self.fit_calibration:
                self.logger.warning(f"{type(self).__name__}: {self._no_calibration}; reporting mean SA alone.")

    def epoch_started(self, engine: Engine) -> None:
        """Start a new accumulation."""
        super().epoch_started(engine)
        self.metric.reset()
        self.dice.reset()
        self.feature_rows.reset()
        self._with_labels = None
        self._groups = []

    def scoring_request(self, engine: Engine) -> ScoringRequest:
        """The layers, features and guide of the batch that just ran, scored against the network's own prediction
        (by :class:`BatchScoring` with the other scoring handlers of the engine)."""
        label = self.reference_label(engine)
        if label is None and (self.fit_calibration or self.fit_estimator):
            option = "fit_calibration" if self.fit_calibration else "fit_estimator"
            source = "label_transform" if self.label_transform is not None else f"engine.state.batch[{self.label_key!r}]"
            raise ValueError(f"{type(self).__name__}({option}=True) needs labels, but found none in {source}.")
        if self._with_labels is not None and self._with_labels != (label is not None):
            raise ValueError(f"{type(self).__name__}: some batches have labels and others do not.")
        prob, features = self.probed_batch(engine, None if label is None else label.shape[2:])
        classes = slice(self.class_indices[0], self.class_indices[-1] + 1)  # contiguous: a view, not a copy
        prediction = self.binarised(prob)[:, classes]
        return ScoringRequest(self.layers, features, self.guide_weights(prob)[:, classes], prediction, None, True,
                              self.share_key(), streamed=self.streamed_inferer(),
                              context={"label": label, "channel_prob": prob})

    def iteration_completed(self, engine: Engine) -> None:
        """Score the batch that just ran against its own prediction (and its label, where there is one)."""
        request, scores = batch_scoring(engine).scores(engine, self)
        label, prob = request.context["label"], request.context["channel_prob"]
        self._with_labels = label is not None
        classes = slice(self.class_indices[0], self.class_indices[-1] + 1)
        prediction = request.target
        self.metric.extend(scores)
        if label is not None:
            one_hot = self.shared_one_hot_label(engine, label.to(prob.device), prob.shape[1])
            self.dice(prediction.float(), one_hot[:, classes].float())
        if self.use_estimator:  # after the features are read: the flipped pass runs the network again
            flipped = [flip[:, classes] for flip in self._flipped_predictions(engine)] if self.tta_flip else None
            margins, spread = self._stitched_features(request, batch_scoring(engine).guides(self))
            self.feature_rows.extend(quality_features(
                prob[:, classes], prediction, scores, self._mean_sa_index,
                channel_prob=prob if self.output_activation == "softmax" else None, tta_prediction=flipped,
                margins=margins, spread=spread,
            ))
        self.record_case_names(engine, prob.shape[0])
        if self.group is not None:
            self._groups += self._batch_groups(engine, prob.shape[0])

    def epoch_completed(self, engine: Engine) -> None:
        """Fit the calibration and the estimator if asked, estimate Dice, write the CSV and the summary metrics."""
        scores = self.metric.layer_scores()  # (N, L, K), gathered across ranks
        mean_sa = scores[:, self._mean_sa_index].nanmean(1)  # (N, K)
        cases = self.case_names()
        groups = cases if self.group is None else string_list_all_gather(self._groups)
        true_dice = self.dice.get_buffer() if self._with_labels else None
        metrics = engine.state.metrics
        if self.use_estimator:
            names, values = self.feature_names, self.feature_rows.get_buffer()  # (N, K, F), gathered across ranks
            if self._streamed:  # streamed: no features kept, no prototype or spread columns
                keep = [i for i, name in enumerate(names)
                        if name not in PROTOTYPE_FEATURES and not name.startswith(SPREAD_PREFIX)]
                names, values = [names[i] for i in keep], values[..., keep]
        else:
            names = ["mean_sa", *(f"sa_{layer}" for layer in self.layers)]
            values = torch.cat([mean_sa[..., None], scores.transpose(1, 2)], dim=-1)
        if self.fit_calibration:
            self._fit(mean_sa, true_dice, metrics)
        if self.fit_estimator:
            self._fit_estimator(names, values, true_dice, groups, metrics)
        estimated, note = self._estimate(mean_sa, names, values)
        if estimated is None:  # mean SA only: no estimate, no interval, mean SA against the threshold
            estimated = torch.full_like(mean_sa, math.nan, dtype=torch.float64)
            low = high = estimated
            bound = mean_sa
        else:
            low, high = self._interval(estimated)
            bound = torch.where(high.isnan(), estimated, high) if self.review_rule == "upper" else estimated
        review = ~(bound >= self.threshold)  # NaN is flagged
        calibrated = None if self.calibration is None else self.calibration.predict(mean_sa.double())
        metrics[f"{self.name}_mean_sa"] = mean_sa.nanmean().item()
        if self.metric_name is not None:
            metrics[self.metric_name] = metrics[f"{self.name}_mean_sa"]
        metrics[f"{self.name}_review"] = int(review.sum())
        metrics[f"{self.name}_undefined"] = int(mean_sa.isnan().sum())
        if idist.get_rank() == self.save_rank:
            self._write_csv(cases, groups, names, values, mean_sa, true_dice, (estimated, low, high), calibrated,
                            review, note)
            if self.estimator is not None:
                columns, rows = self.estimator.cv_rows()
                features = columns.index("features")  # named as the CSV's columns: by the layers' aliases
                for row in rows:
                    row[features] = " ".join(map(self._readable, row[features].split()))
                atomic_write_csv(self.csv_path.parent / CV_FILENAME, columns,
                                 [[format_number(v) if isinstance(v, float) else v for v in row] for row in rows])
            self.logger.info(
                f"{type(self).__name__}: {len(cases)} case(s), mean SA {metrics[f'{self.name}_mean_sa']:.4f}, "
                f"{metrics[f'{self.name}_review']} row(s) flagged for review; wrote {self.csv_path}"
            )

    def _read_estimator(self) -> None:
        """Load the estimator file (or check the given estimator) against this handler's layers and features."""
        if self.estimator_path is not None:
            if not self.estimator_path.exists():
                self.estimator = None
                self._no_estimator = f"no estimator file at {self.estimator_path}"
                return
            self.estimator = QualityEstimator.load(self.estimator_path, self.layers, self.mean_sa_layers)
        else:
            self.estimator.check_layers(self.layers, self.mean_sa_layers)
        fitted = list(self.estimator.feature_names)
        if (TTA_FEATURE in fitted) != self.tta_flip or not set(fitted) <= set(self.feature_names):
            source = self.estimator_path or "the quality estimator"
            advice = (f"set tta_flip={not self.tta_flip} as when it was fitted" if (TTA_FEATURE in fitted) !=
                      self.tta_flip else "refit it with this version")
            raise ValueError(
                f"{source} was fitted on the features {fitted}, but this handler computes {self.feature_names}: "
                f"{advice}."
            )
        if self.tta_flip and self.estimator.tta_axes and self.estimator.tta_axes != self.tta_axes:
            raise ValueError(
                f"{self.estimator_path or 'the quality estimator'} was fitted with tta_flip axes "
                f"{list(self.estimator.tta_axes)}, but this handler flips {list(self.tta_axes)}: set tta_flip="
                f"{list(self.estimator.tta_axes)} as when it was fitted."
            )
        self._check_network(self.estimator, self.estimator_path, self.layers)

    def _check_network(
        self, fitted: QualityCalibration | QualityEstimator, path: pathlib.Path | None, layers: Sequence[str]
    ) -> None:
        """Raise if the fingerprint of ``fitted`` (read from ``path``, if any) names another network or other layers;
        warn that a file without a fingerprint cannot be checked. Its weights are compared when it is used.

        Raises:
            ValueError: naming the file and saying it was fitted for another network.
        """
        kind, option = ("calibration", "fit_calibration") if isinstance(fitted, QualityCalibration) else (
            "quality estimator", "fit_estimator")
        if fitted.fingerprint is None:
            if path is not None:
                self.logger.warning(
                    f"{type(self).__name__}: {path} has no network fingerprint (an older monai_protoseg wrote it, or "
                    f"it was fitted outside this handler), so it cannot be checked against this network: make sure "
                    f"the {kind} was fitted for it."
                )
            return
        if fitted.fingerprint.architecture != architecture_digest(self.probed_network, layers, self.guide):
            raise ValueError(
                f"{path or f'the {kind} given'} was fitted for another network: the fingerprint of its architecture, "
                f"probed layers and guide differs from that of this {type(self.probed_network).__name__} probed at "
                f"layers {list(layers)} with guide={self.guide!r}; fit a {kind} for this network ({option}=True on its "
                f"validation cases)."
            )

    def _other_weights(self, fitted: QualityCalibration | QualityEstimator, path: pathlib.Path | None) -> str:
        """``", fitted on other weights"`` for the CSV note, and a warning, when the fingerprint of ``fitted`` (fitted
        for this network, see :meth:`_check_network`) names other weights than the network has now; else ``""``."""
        if fitted.fingerprint is None or fitted.fingerprint.weights == weights_digest(self.probed_network):
            return ""
        if idist.get_rank() == self.save_rank:
            kind = "calibration" if isinstance(fitted, QualityCalibration) else "quality estimator"
            self.logger.warning(
                f"{type(self).__name__}: {path or f'the {kind} given'} was fitted for this network but on other "
                f"weights (another checkpoint or epoch): its estimates may be off; refit it on the validation cases "
                f"with these weights to be sure."
            )
        return ", fitted on other weights"

    def _estimate(
        self, mean_sa: torch.Tensor, names: list[str], values: torch.Tensor
    ) -> tuple[torch.Tensor | None, str]:
        """The estimated Dice ``(N, K)`` (``None``: mean SA only) and the note naming the method; ``values``
        ``(N, K, F)`` hold the feature columns ``names`` (a column the estimator uses and they lack is NaN)."""
        if self.estimator is not None:
            rows = values.double().cpu()
            columns = [rows[..., names.index(name)] if name in names else torch.full(rows.shape[:-1], math.nan)
                       for name in self.estimator.feature_names]  # an older file: fewer columns
            classes = np.broadcast_to(np.array(self.class_labels()), rows.shape[:-1])
            try:
                estimated = self.estimator.predict(torch.stack(columns, -1), classes)
            except ValueError as error:  # per-class estimator, classes it was not fitted on
                raise ValueError(f"{self.estimator_path or 'the quality estimator'}: {error} Set class_names as when "
                                 "it was fitted.") from error
            other = self._other_weights(self.estimator, self.estimator_path)
            return torch.from_numpy(estimated).to(mean_sa.device), f"{self._method_note()}{other}"
        prefix = f"{self._no_estimator}; " if self.use_estimator else ""
        if self.calibration is not None:
            other = self._other_weights(self.calibration, self.calibration_path)
            return self.calibration.predict(mean_sa.double()), f"{prefix}calibration{other}"
        return None, f"{prefix}{self._no_calibration}: mean SA only"

    def _method_note(self) -> str:
        """The CSV note of the estimator in use: ``estimator (all)``, or ``estimator per class (grey: all, white:
        confidence)``."""
        if not self.estimator.per_class:
            return f"estimator ({self.estimator.chosen})"
        chosen = ", ".join(f"{label}: {model.chosen}" for label, model in self.estimator.per_class.items())
        return f"estimator per class ({chosen})"

    def _fit(self, mean_sa: torch.Tensor, true_dice: torch.Tensor, metrics: dict) -> None:
        """Fit the calibration on (mean SA, true Dice) of every case and class, save it with the network's fingerprint,
        report its fit."""
        try:
            calibration = QualityCalibration.fit(mean_sa.flatten(), true_dice.flatten())
        except ValueError as error:
            self.calibration = None
            self._no_calibration = f"calibration not fitted ({error})"
            if idist.get_rank() == self.save_rank:
                self.logger.warning(f"{type(self).__name__}: {self._no_calibration}{self._left(self.calibration_path)}")
            return
        self.calibration = dataclasses.replace(
            calibration, fingerprint=NetworkFingerprint.of(self.probed_network, self.mean_sa_layers, self.guide))
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

    def _fit_estimator(
        self, names: list[str], values: torch.Tensor, true_dice: torch.Tensor, groups: list[str], metrics: dict
    ) -> None:
        """Fit the estimator on the feature rows of every case and class, save it with the network's fingerprint, log
        its CV.

        Rows are grouped by ``group`` (by default the case name), so the folds (and the fit) do not depend on the order
        in which the ranks' cases were gathered. Fewer groups than folds is said in one line of the log.
        """
        classes = true_dice.shape[1]
        self._warn_few_groups(len(set(groups)))
        try:
            estimator = QualityEstimator.fit(
                values.reshape(len(groups) * classes, -1), true_dice.flatten(), np.repeat(np.array(groups), classes),
                feature_names=names, layers=self.layers, mean_sa_layers=self.mean_sa_layers,
                feature_sets=self.feature_sets, alphas=self.alphas, selection=self.selection, target=self.target,
                classes=np.tile(np.array(self.class_labels()), len(groups)), per_class=self.per_class,
            )
        except ValueError as error:
            self.estimator = None
            self._no_estimator = f"estimator not fitted ({error})"
            if idist.get_rank() == self.save_rank:
                self.logger.warning(f"{type(self).__name__}: {self._no_estimator}{self._left(self.estimator_path)}")
            return
        self.estimator = dataclasses.replace(
            estimator, fingerprint=NetworkFingerprint.of(self.probed_network, self.layers, self.guide),
            tta_axes=self.tta_axes)
        metrics[f"{self.name}_estimator_cv_r"] = self.estimator.nested_r
        metrics[f"{self.name}_estimator_cv_mae"] = self.estimator.nested_mae
        if idist.get_rank() != self.save_rank:
            return
        if self.estimator_path is not None:
            self.estimator.save(self.estimator_path)
        self.logger.info(
            f"{type(self).__name__}: quality estimator fitted on {self.estimator.n_rows} case-class row(s) of "
            f"{self.estimator.n_groups} group(s) ({self.estimator.n_excluded} undefined left out), "
            f"{self.estimator.n_folds}-fold cross-validation grouped by {self._group_source()}; chosen feature set "
            f"{self.estimator.chosen!r} (selection {self.selection!r}); "
            + (f"one estimator per class kept: {self._method_note().removeprefix('estimator per class ')}; "
               if self.estimator.per_class else self._per_class_skipped(true_dice))
            + f"nested cross-validation (selection inside the inner folds): r {self.estimator.nested_r:.3f}, MAE "
            f"{self.estimator.nested_mae:.3f}"
            + (f"; saved to {self.estimator_path}" if self.estimator_path else "")
            + f"; per-set table in {self.csv_path.parent / CV_FILENAME}\n{self.estimator.cv_table()}"
        )

    @staticmethod
    def _left(path: pathlib.Path | None) -> str:
        """For the warning of a failed fit: that the file at ``path`` from an earlier fit, if any, stays as it was."""
        if path is None or not path.exists():
            return ""
        return (f"; {path}, from an earlier fit, is left as it was (an inference that reads it checks its network "
                f"fingerprint)")

    def _stitched_features(self, request: ScoringRequest, guides: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """From the features the scoring pass recorded: the normalised prototype logits ``(B, L', K, *S)`` of the
        mean-SA layers (:func:`~monai_protoseg.estimator.prototype_margins`, with the scoring pass's ``guides``)
        and the activation spread ``(B, L)`` of every probed layer
        (:func:`~monai_protoseg.estimator.activation_spread`); both NaN (said once in the log) when the sliding
        window streamed and no features were stitched."""
        prob = request.prob
        if request.streamed is None:
            features = {layer: request.features[layer] for layer in self.mean_sa_layers}
            spread = activation_spread({layer: request.features[layer] for layer in self.layers})
            # request.prob already holds the guide's weights
            return prototype_margins(features, prob, guides=guides), spread
        if not self._streamed and idist.get_rank() == self.save_rank:
            self.logger.warning(
                f"{type(self).__name__}: the sliding window streamed, so the features of the layers are not kept: the "
                f"prototype features ({', '.join(PROTOTYPE_FEATURES)}) and the {SPREAD_PREFIX}{{layer}} columns are "
                "left out, and an estimator that uses them estimates NaN (fit it with the same mode).")
        self._streamed = True
        nan = math.nan
        return (torch.full((prob.shape[0], len(self.mean_sa_layers), *prob.shape[1:]), nan, device=prob.device),
                torch.full((prob.shape[0], len(self.layers)), nan, device=prob.device))

    def _flipped_predictions(self, engine: Engine) -> list[torch.Tensor]:
        """The binarised predictions ``(B, C, *S)`` for the batch's input flipped along each of ``tta_axes``, each
        flipped back."""
        output = engine.state.output
        try:
            image = output[self.image_key] if isinstance(output, dict) else as_batch(
                [item[self.image_key] for item in output])
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"{type(self).__name__}(tta_flip=True) needs the input image under '{self.image_key}' in "
                f"engine.state.output (MONAI evaluators put it there)."
            ) from error
        network = self.network if self.network is not None else engine.network
        inferer = getattr(engine, "inferer", None)
        if isinstance(inferer, ProtoSegInferer):  # its recording belongs to the main pass
            inferer = inferer.inferer
        image = image.as_subclass(torch.Tensor)
        spatial = image.ndim - 2
        predictions = []
        for axis in self.tta_axes:
            if not -spatial <= axis < spatial:
                raise ValueError(f"{type(self).__name__}: tta_flip axis {axis} is not a spatial axis of a "
                                 f"{spatial}-D image (use 0 to {spatial - 1}, or -1 for the last).")
            dims = (2 + axis % spatial,)
            amp = torch.autocast("cuda", **engine.amp_kwargs) if getattr(engine, "amp", False) else (
                contextlib.nullcontext())
            with eval_mode(network), amp, forward_hooks_suspended(network):
                flipped = torch.flip(image, dims=dims)
                logits = inferer(flipped, network) if inferer is not None else network(flipped)
            predictions.append(self.binarised(self.activate(torch.flip(logits.as_subclass(torch.Tensor), dims=dims))))
        return predictions

    def _batch_groups(self, engine: Engine, count: int) -> list[str]:
        """The group of each of the ``count`` cases of the batch that just ran, from the image's meta data."""
        batch = engine.state.batch
        items = [item for item in (batch if isinstance(batch, (list, tuple)) else [batch]) if isinstance(item, dict)]
        metas = []
        for item in items:
            image = item.get(self.image_key)
            meta = getattr(image, "meta", None) or item.get(f"{self.image_key}_meta_dict") or {}
            metas += _case_metas(meta, count // max(len(items), 1))
        if len(metas) != count:
            raise ValueError(f"{type(self).__name__}: found the meta data of {len(metas)} case(s) for {count} in the "
                             f"batch: group needs the image's meta data ({self.image_key!r}).")
        groups = []
        for meta in metas:
            if callable(self.group):
                value = self.group(meta)
            elif self.group in meta:
                value = meta[self.group]
            else:
                raise ValueError(f"{type(self).__name__}: group={self.group!r} is not a key of the image's meta data "
                                 f"(keys: {sorted(map(str, meta))}); pass a meta-data key or a callable of the meta "
                                 f"data.")
            groups.append(str(value.item() if isinstance(value, (torch.Tensor, np.ndarray)) else value))
        return groups

    def _group_source(self) -> str:
        """What the rows are grouped by, for messages."""
        if self.group is None:
            return "case name"
        return f"meta-data key {self.group!r}" if isinstance(self.group, str) else "the group callable"

    def _per_class_skipped(self, true_dice: torch.Tensor) -> str:
        """The log's words when ``per_class="auto"`` could not compare per-class estimators (a class with too few
        valid rows, so the pooled estimator is used for every class); ``""`` otherwise."""
        labels = self.class_labels()
        if self.per_class is False or len(labels) < 2 or not math.isnan(self.estimator.per_class_nested_mae):
            return ""
        valid = (~true_dice.isnan()).sum(0).tolist()
        counts = ", ".join(f"{label}: {count}" for label, count in zip(labels, valid))
        return (f"per-class estimators not compared: each class needs {MIN_ROWS} valid rows of {MIN_GROUPS} "
                f"groups, and rows with true Dice were {counts} (before leaving out undefined features); the pooled "
                "estimator estimates every class; ")

    def _warn_few_groups(self, count: int) -> None:
        """One log line when grouping leaves fewer groups than cross-validation folds, and what to set."""
        if count >= MAX_FOLDS or idist.get_rank() != self.save_rank:
            return
        effect = (f"the estimator cannot be fitted (at least {MIN_GROUPS} are needed)" if count < MIN_GROUPS
                  else f"{count}-fold cross-validation instead of {MAX_FOLDS}")
        self.logger.warning(
            f"{type(self).__name__}: grouping by {self._group_source()} leaves {count} group(s), fewer than the "
            f"{MAX_FOLDS} cross-validation folds: {effect}; set group= to a meta-data key or callable that gives each "
            f"independent volume or patient its own group (slices or copies of one case share one)."
        )

    def _interval(self, estimated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(low, high)`` interval of every estimate ``(N, K)`` with the method in use, NaN where there is none."""
        reference = estimated.detach().cpu().double().numpy()
        if self.estimator is not None:
            classes = np.broadcast_to(np.array(self.class_labels()), reference.shape) if self.class_intervals else None
            low, high = self.estimator.interval(reference, self.coverage, classes)
        elif self.calibration is not None:
            low, high = self.calibration.interval(reference, self.coverage)
        else:
            low = high = np.full(reference.shape, math.nan)
        return (torch.from_numpy(np.asarray(low, dtype=np.float64)).to(estimated.device),
                torch.from_numpy(np.asarray(high, dtype=np.float64)).to(estimated.device))

    def _readable(self, name: str) -> str:
        """A feature's name in the CSV: ``sa_{layer}`` and ``spread_{layer}`` by the layer's alias."""
        return aliased_feature(name, self.layer_aliases)

    def _write_csv(
        self,
        cases: list[str],
        groups: list[str],
        names: list[str],
        values: torch.Tensor,
        mean_sa: torch.Tensor,
        true_dice: torch.Tensor | None,
        estimate: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        calibrated: torch.Tensor | None,
        review: torch.Tensor,
        note: str,
    ) -> None:
        """One row per case and class: the value columns ``names`` of ``values`` ``(N, K, F)``, then the estimate
        ``(estimated, low, high)``, the calibrated mean SA (when there is a calibration), the flag and the note."""
        columns = ["case", "class", *(["group"] if self.group is not None else []), *map(self._readable, names)]
        columns += ["true_dice"] if true_dice is not None else []
        columns += ["estimated_dice", "estimate_low", "estimate_high"]
        columns += ["calibrated_mean_sa"] if calibrated is not None else []
        columns += ["review", "note"]
        values = values.double().cpu().numpy()
        rows = []
        for n, case in enumerate(_distinct(cases)):
            for k, class_name in enumerate(self.class_labels()):
                row_note = f"{note}; empty prediction: SA undefined" if math.isnan(mean_sa[n, k]) else note
                row = [*values[n, k]] + ([true_dice[n, k]] if true_dice is not None else [])
                row += [part[n, k] for part in estimate] + ([calibrated[n, k]] if calibrated is not None else [])
                rows.append([case, class_name, *([groups[n]] if self.group is not None else []),
                             *(format_number(v) for v in row), bool(review[n, k]), row_note])
        atomic_write_csv(self.csv_path, columns, rows)
        write_layer_names(self.csv_path.parent, self.layer_aliases)


def _tta_axes(tta_flip: bool | Sequence[int] | None) -> tuple[int, ...]:
    """The spatial axes of ``tta_flip``: ``False``/``None`` none, ``True`` the last, or the given axes."""
    if tta_flip is None or tta_flip is False:
        return ()
    if tta_flip is True:
        return (-1,)
    axes = tuple(tta_flip) if isinstance(tta_flip, Sequence) and not isinstance(tta_flip, str) else None
    if not axes or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"tta_flip must be a bool or a non-empty sequence of distinct spatial axes (ints), got "
                         f"{tta_flip!r}.")
    return axes


def _case_metas(meta: Mapping, count: int) -> list[dict]:
    """The meta data of each of the ``count`` cases of a (collated) meta-data dict: a value with one entry per case
    (the file names tell whether it is collated) is split, any other value is shared."""
    names = meta.get(Key.FILENAME_OR_OBJ)
    batched = isinstance(names, (list, tuple)) and len(names) == count
    if not batched:
        return [dict(meta) for _ in range(count)]
    cases = []
    for i in range(count):
        case = {}
        for key, value in meta.items():
            sized = isinstance(value, (list, tuple, torch.Tensor, np.ndarray)) and len(value) == count
            case[key] = value[i] if sized else value
        cases.append(case)
    return cases


def _distinct(names: list[str]) -> list[str]:
    """``names`` with every name that repeats numbered in order (``a#0``, ``a#1``, ...); unique names unchanged."""
    total = collections.Counter(names)
    seen: dict[str, int] = {}
    distinct = []
    for name in names:
        if total[name] == 1:
            distinct.append(name)
        else:
            distinct.append(f"{name}#{seen.get(name, 0)}")
            seen[name] = seen.get(name, 0) + 1
    return distinct
