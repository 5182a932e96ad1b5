"""Quality estimator: an estimated Dice from the SA profile and the confidence of a prediction, without ground truth.

Mean SA is one number; the SA of every probed layer against the network's own prediction (the *SA profile*) and the
network's confidence carry more. Per case and scored class, :func:`quality_features` turns what the quality handler
already has into one feature row (names from :func:`feature_names`):

- ``mean_sa``: the mean SA of the chosen layers (the paper's mean SA; NaN where every layer's SA is undefined);
- ``sa_{layer}``: the SA of each probed layer against the network's own binarised prediction (the SA profile);
- ``fg_prob``: the mean foreground probability of the class inside its predicted mask (NaN for an empty prediction);
- ``max_prob``: the mean max-probability: for a softmax network the mean over all pixels of the maximum over all
  output channels (the same for every class of a case); otherwise, per class, the mean over pixels of
  ``max(p, 1 - p)``;
- ``volume``: the predicted foreground fraction of the image (predicted pixels / all pixels). Measured against its
  ``log10`` on synthetic cases (2 seeds, 192 cases each), the fraction gave the lower cross-validated MAE of the
  ``all`` set (0.064 vs 0.067, 0.070 vs 0.073), so the fraction it is;
- ``entropy``: the mean over all pixels of the binary entropy of the class's probability, in bits
  (``-p log2 p - (1 - p) log2 (1 - p)``, in [0, 1]);
- ``boundary_margin``: the mean probability margin ``|2 p - 1|`` on the prediction's boundary pixels (a pixel whose
  prediction differs from that of a face neighbour, on either side of the edge); NaN without a boundary (an empty or
  full prediction);
- ``spread_{layer}`` (optional, from the recorded features of every probed layer): the activation spread of the
  layer, the mean over its channels of the standard deviation of its features over the image
  (:func:`activation_spread`); the same for every class of a case. Noise, blur and intensity changes move it while
  the probabilities hardly show them: on the real-anatomy benchmark it lowered the test MAE from 0.047 to 0.043
  (0.041 to 0.039 with ``tta_disagreement``);
- ``proto_in``, ``proto_out``, ``proto_near`` (optional, from the features of the mean-SA layers): the feature-space
  confidence of the prototypes. With ``d = c_fg - c_bg`` and ``m = (c_fg + c_bg) / 2`` the prototype logit
  ``||f - c_bg||^2 - ||f - c_fg||^2`` divided by ``||d||^2`` is ``z = 2 (f - m) . d / ||d||^2``: +1 at the foreground
  prototype, -1 at the background one, 0 on ProtoSeg's decision boundary, whatever the features' scale
  (:func:`prototype_margins`). ``proto_in`` / ``proto_out`` are the mean ``|z|`` inside / outside the network's
  prediction, ``proto_near`` the fraction of pixels with ``|z| < NEAR_BOUNDARY``, each averaged over the layers;
- ``tta_disagreement`` (optional): ``1 - Dice`` between the prediction and the prediction for the input flipped along
  a spatial axis, flipped back (0 when both are empty), averaged over the flips (``MeanSAQualityHandler``'s
  ``tta_flip`` chooses the axes).

:class:`QualityEstimator` fits a ridge regression of true Dice (by default of its logit) on such rows from validation
cases with ground truth, for each of several feature sets (mean SA alone, the SA profile, confidence alone, all),
chooses the penalty and the set by cross-validation grouped by case (by default the largest set within one standard
error of the best), measures the whole procedure by nested cross-validation (the selection repeated inside every
outer training part), and keeps the nested out-of-fold residuals: :func:`conformal_halfwidth` turns them into
split-conformal intervals of a stated coverage. With rows of several classes it also fits one estimator per class and
keeps them when they beat the pooled one (``per_class``). It predicts an estimated Dice in [0, 1] and saves to / loads
from JSON.

Rows with an undefined (NaN) feature cannot be estimated: they are left out of the fit (and counted), and
``predict`` gives NaN where a feature the chosen set uses is NaN; nothing is imputed.

Pure numpy/torch and the standard library: no ignite, no MONAI, no scikit-learn.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from .conformal import conformal_halfwidth, conformal_interval
from .fingerprint import NetworkFingerprint
from .io import read_json, write_json
from .quality import _fingerprint, _is_int, _number

__all__ = [
    "QualityEstimator",
    "FeatureSetScore",
    "quality_features",
    "feature_names",
    "default_feature_sets",
    "group_folds",
    "SELECTIONS",
    "TARGETS",
    "PER_CLASS",
    "is_option",
    "ESTIMATOR_FORMAT",
    "ESTIMATOR_VERSION",
    "ALPHAS",
    "MIN_ROWS",
    "MIN_GROUPS",
    "MAX_FOLDS",
    "PREDICTION_FEATURES",
    "CONFIDENCE_FEATURES",
    "TTA_FEATURE",
    "MARGIN_FEATURES",
    "PROTOTYPE_FEATURES",
    "SPREAD_PREFIX",
    "NEAR_BOUNDARY",
    "prototype_margins",
    "activation_spread",
    "aliased_feature",
]

ESTIMATOR_FORMAT = "monai_protoseg.QualityEstimator"
"""The ``"format"`` field of a saved estimator."""

ESTIMATOR_VERSION = 3
"""The ``"version"`` field written by ``QualityEstimator.save``; ``load`` reads this version and older (version 1 files
have no nested cross-validation, residuals or selection rule: their intervals are undefined; version 2 files have no
per-class estimators)."""

SELECTIONS = ("one_se_largest", "one_se", "min")
"""How ``QualityEstimator.fit`` chooses the feature set:

- ``"one_se_largest"`` (the default): the set with the most features whose CV MAE is within one standard error (over
  the folds) of the smallest. The ridge penalty already shrinks what a big set does not need, so a smaller set is
  chosen only when it is better by more than the noise of the folds: a choice that does not switch on noise;
- ``"one_se"``: the set with the fewest features within one standard error of the smallest (Breiman's rule);
- ``"min"``: the smallest CV MAE.

On the real-anatomy benchmark (``benchmarks/bench_quality.py --task mni152``, 3 seeds x 2 splits, default feature
sets, logit target) the test MAE was 0.047 with ``"one_se_largest"`` (``all`` chosen in every run), 0.048 with
``"min"`` (which switched to ``confidence`` once) and 0.054 with ``"one_se"`` (which chose ``mean_sa`` or
``confidence`` in 3 of 6 runs, dropping features the held-out part needed)."""

PER_CLASS = ("auto", True, False)
"""``QualityEstimator.fit``'s ``per_class``: fit one estimator per class beside the pooled one and keep them when their
nested MAE beats the pooled one's by more than one standard error (``"auto"``), always (``True``) or never
(``False``)."""

TARGETS = ("logit", "identity")
"""What the ridge regression fits: ``"logit"`` (the default), ``logit(clip(Dice, LOGIT_EPS, 1 - LOGIT_EPS))`` with
estimates mapped back by the sigmoid, so they stay inside (0, 1) and bend toward its ends as Dice does; or
``"identity"``, Dice itself (estimates clipped to [0, 1]). On the real-anatomy benchmark (default sets and selection,
no TTA) the logit gave a test MAE of 0.047 against 0.048, r +0.830 against +0.830."""

LOGIT_EPS = 0.01
"""Dice is clipped to ``[LOGIT_EPS, 1 - LOGIT_EPS]`` before the logit of ``target="logit"``."""

ALPHAS = tuple(float(alpha) for alpha in np.logspace(-3, 3, 13))
"""The ridge penalties tried by cross-validation (on standardised features; the intercept is not penalised)."""

MIN_ROWS = 10
"""Fewest valid rows (no NaN feature, true Dice defined) ``QualityEstimator.fit`` accepts."""

MIN_GROUPS = 3
"""Fewest groups (cases) among the valid rows ``QualityEstimator.fit`` accepts: grouped cross-validation needs 3."""

MAX_FOLDS = 5
"""Cross-validation uses ``min(MAX_FOLDS, number of groups)`` folds."""

PREDICTION_FEATURES = ("fg_prob", "max_prob", "volume")
"""The features computed from the prediction alone, in row order after the SA features."""

CONFIDENCE_FEATURES = ("fg_prob", "max_prob")
"""The features of the ``"confidence"`` feature set."""

MARGIN_FEATURES = ("entropy", "boundary_margin")
"""The uncertainty features of the prediction, in row order after :data:`PREDICTION_FEATURES`."""

PROTOTYPE_FEATURES = ("proto_in", "proto_out", "proto_near")
"""The feature-space confidence of the prototypes (needs the mean-SA layers' features), after
:data:`MARGIN_FEATURES`."""

NEAR_BOUNDARY = 0.5
"""``proto_near`` counts the pixels whose normalised prototype logit ``|z|`` is below this: nearer to ProtoSeg's
decision boundary (``z = 0``) than halfway to either prototype (``|z| = 1``)."""

SPREAD_PREFIX = "spread_"
"""The prefix of the activation-spread columns: ``spread_{layer}`` (see :func:`activation_spread`)."""

SPREAD_CHUNK_ELEMENTS = 2**20
"""Feature elements per step of :func:`activation_spread` (4 MiB of float32 deviations at a time)."""

LAYER_FEATURE_PREFIXES = ("sa_", SPREAD_PREFIX)
"""The prefixes of the columns that belong to one probed layer: ``sa_{layer}`` and ``spread_{layer}``."""

TTA_FEATURE = "tta_disagreement"
"""The optional last feature: disagreement with the prediction for the flipped input."""

_CONSTANT = 1e-12
"""A feature whose standard deviation over the training rows is at most this is constant: it is centred, not scaled.
Estimates or Dice values that vary by at most this are constant: their Pearson r is NaN."""

ArrayLike = Sequence | np.ndarray | torch.Tensor


def feature_names(
    layers: Sequence[str], *, tta: bool = False, prototype: bool = False, spread: bool = False
) -> list[str]:
    """The names of the columns of :func:`quality_features`, in order.

    Args:
        layers: the probed layers, in the order of the SA axis.
        tta: whether the rows end with ``tta_disagreement``.
        prototype: whether the rows hold the :data:`PROTOTYPE_FEATURES` (``margins`` given).
        spread: whether the rows hold a ``spread_{layer}`` column per layer (``spread`` given).

    Example:
        >>> feature_names(["model.1.submodule.2", "model.2"])
        ['mean_sa', 'sa_model.1.submodule.2', 'sa_model.2', 'fg_prob', 'max_prob', 'volume', 'entropy', 'boundary_margin']
    """
    return ["mean_sa", *(f"sa_{layer}" for layer in layers), *PREDICTION_FEATURES, *MARGIN_FEATURES,
            *(f"{SPREAD_PREFIX}{layer}" for layer in (layers if spread else ())),
            *(PROTOTYPE_FEATURES if prototype else ()), *([TTA_FEATURE] if tta else [])]


def aliased_feature(name: str, aliases: Mapping[str, str]) -> str:
    """A feature's name with its layer named by its alias: ``sa_{layer}`` and ``spread_{layer}`` become
    ``sa_{alias}`` and ``spread_{alias}`` where ``aliases`` (``{layer: alias}``) has the layer; any other name as it is.

    Example:
        >>> [aliased_feature(name, {"model.2": "output"}) for name in ("spread_model.2", "sa_model.0", "fg_prob")]
        ['spread_output', 'sa_model.0', 'fg_prob']
    """
    for prefix in LAYER_FEATURE_PREFIXES:
        if name.startswith(prefix) and name[len(prefix):] in aliases:
            return f"{prefix}{aliases[name[len(prefix):]]}"
    return name


def activation_spread(features: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The activation spread of every layer and image: the mean over channels of the (population) standard
    deviation of the features over the image, at the layer's own resolution.

    Two passes (the mean, then the norm of the deviations, :data:`SPREAD_CHUNK_ELEMENTS` at a time): no copy of the
    features is made (half-precision ones are converted a chunk at a time).

    Args:
        features: ``{layer: (B, C, *S_f)}`` features of the layers.

    Returns:
        ``(B, L)`` float64, layers in the order of ``features``.

    Example:
        >>> features = torch.tensor([0.0, 2.0, 0.0, 2.0]).view(1, 1, 2, 2)
        >>> activation_spread({"a": features, "b": 3 * features}).tolist()
        [[1.0, 3.0]]
    """
    spreads = []
    for layer_features in features.values():
        values = layer_features.as_subclass(torch.Tensor).flatten(2)  # (B, C, P)
        dtype = values.dtype if values.dtype in (torch.float32, torch.float64) else torch.float32
        mean = values.mean(-1, keepdim=True, dtype=dtype)
        squares = torch.zeros(values.shape[:2], dtype=torch.float64, device=values.device)
        step = max(1, SPREAD_CHUNK_ELEMENTS // max(1, values.shape[0] * values.shape[1]))
        for start in range(0, values.shape[-1], step):
            deviation = values[..., start:start + step].to(dtype) - mean
            squares += torch.linalg.vector_norm(deviation, dim=-1).double().square()
        spreads.append((squares / values.shape[-1]).sqrt().mean(1))
    return torch.stack(spreads, 1)


def prototype_margins(
    features: Mapping[str, torch.Tensor], prob: torch.Tensor, *, guide: str = "soft", guides: dict | None = None
) -> torch.Tensor:
    """The normalised prototype logit ``z = 2 (f - m) . d / ||d||^2`` of every layer and class at ``prob``'s grid.

    ``d = c_fg - c_bg`` and ``m = (c_fg + c_bg) / 2`` from :func:`~monai_protoseg.prototypes` (one-vs-rest per
    class); ``z`` is ProtoSeg's logit ``||f - c_bg||^2 - ||f - c_fg||^2`` over ``||d||^2``: 1 at the foreground
    prototype, -1 at the background one, 0 on the decision boundary. ``z`` is linear in ``f``, so it is computed at
    the features' resolution and resized linearly (``align_corners=False``), as resizing the features first would give.

    Args:
        features: ``{layer: (B, C, *S_f)}`` features of the layers.
        prob: ``(B, K, *S)`` foreground probability of each class, in [0, 1] (guides the prototypes).
        guide: ``"soft"`` or ``"binary"`` prototype weights (see :func:`~monai_protoseg.prototypes`).
        guides: the prototype weights per features' dtype that an SA pass over the same ``prob``, ``guide`` and no
            mask built (the handlers' shared scoring pass keeps them, so each feature grid's weights are made once
            a batch); those missing are built here and added. ``None``: built here.

    Returns:
        ``(B, L, K, *S)`` float32 (float64 for float64 features); NaN for an image and class whose prototypes do not
        exist or coincide.

    Raises:
        ValueError: a shape does not match, ``prob`` is not in [0, 1] or the features are not finite; the message
            names the layer.

    Example:
        >>> prob = torch.zeros(1, 1, 4, 4); prob[..., :2] = 1
        >>> prototype_margins({"a": prob}, prob)[0, 0, 0, 0].tolist()  # features = prob: fg 1, bg 0
        [1.0, 1.0, -1.0, -1.0]
    """
    from .protoseg import _layer_logits, _resize  # here: the package imports this module while initialising

    layers = []
    for logits, fg, bg, _ in _layer_logits(features, prob, guide=guide, guides=guides).values():
        norm = (fg - bg).square().sum(-1)  # ||d||^2 of the scaled features: (B, K)
        norm = torch.where(norm > 0, norm, math.nan)  # logits are 2 (f - m) . d: z does not change with the scale
        layers.append(_resize(logits / norm.view(*norm.shape, *(1,) * (logits.ndim - 2)), prob.shape[2:]))
    return torch.stack(layers, 1)


def quality_features(
    prob: torch.Tensor,
    prediction: torch.Tensor,
    layer_sa: torch.Tensor,
    mean_sa_layers: Sequence[int],
    *,
    channel_prob: torch.Tensor | None = None,
    tta_prediction: torch.Tensor | None = None,
    margins: torch.Tensor | None = None,
    spread: torch.Tensor | None = None,
) -> torch.Tensor:
    """One feature row per case and scored class (see the module docstring for each feature).

    Args:
        prob: ``(B, K, *S)`` foreground probability of each of the ``K`` scored classes.
        prediction: ``(B, K, *S)`` the network's own binarised prediction of each class (boolean or 0/1).
        layer_sa: ``(B, L, K)`` SA of each probed layer against ``prediction``; NaN where undefined.
        mean_sa_layers: indices (into ``L``) of the layers averaged into ``mean_sa``.
        channel_prob: the full ``(B, C, *S)`` softmax output of a softmax network (all channels, background
            included): ``max_prob`` is then its maximum over channels; ``None`` for sigmoid (or probability) outputs:
            ``max_prob`` is ``max(p, 1 - p)`` of each class.
        tta_prediction: ``(B, K, *S)`` binarised prediction for the flipped input, flipped back, or a sequence of
            them (one per flip: their disagreements are averaged); ``None``: no ``tta_disagreement`` column.
        margins: ``(B, L', K, *S)`` normalised prototype logits of the mean-SA layers (:func:`prototype_margins`)
            for the :data:`PROTOTYPE_FEATURES` columns; ``None``: no such columns.
        spread: ``(B, L)`` activation spread of each probed layer (:func:`activation_spread`), the same for every
            class; ``None``: no ``spread_{layer}`` columns.

    Returns:
        ``(B, K, F)`` float64 on ``prob``'s device, columns as :func:`feature_names` names them.

    Raises:
        ValueError: a shape does not match, or ``mean_sa_layers`` is empty or out of range.

    Example:
        >>> prob = torch.tensor([[[0.2, 0.7, 0.9, 0.4]]])  # (B=1, K=1, S=4)
        >>> rows = quality_features(prob, prob > 0.5, torch.tensor([[[0.8]], [[0.6]]]).view(1, 2, 1), [0, 1])
        >>> [round(value, 4) for value in rows[0, 0].tolist()]  # every pixel is on the boundary
        [0.7, 0.8, 0.6, 0.8, 0.75, 0.5, 0.7608, 0.5]
    """
    if prob.ndim < 3 or prediction.shape != prob.shape:
        raise ValueError(
            f"prob and prediction must both be (B, K, *S), got {tuple(prob.shape)} and {tuple(prediction.shape)}."
        )
    batch, classes = prob.shape[:2]
    if layer_sa.ndim != 3 or layer_sa.shape[0] != batch or layer_sa.shape[2] != classes:
        raise ValueError(f"layer_sa must be (B={batch}, L, K={classes}), got {tuple(layer_sa.shape)}.")
    mean_sa_layers = list(mean_sa_layers)
    if not mean_sa_layers or not all(0 <= index < layer_sa.shape[1] for index in mean_sa_layers):
        raise ValueError(f"mean_sa_layers must be indices in [0, {layer_sa.shape[1]}), got {mean_sa_layers}.")
    if channel_prob is not None and (channel_prob.shape[0] != batch or channel_prob.shape[2:] != prob.shape[2:]):
        raise ValueError(f"channel_prob must be (B={batch}, C, *S={tuple(prob.shape[2:])}), got "
                         f"{tuple(channel_prob.shape)}.")
    flips = [tta_prediction] if isinstance(tta_prediction, torch.Tensor) else list(tta_prediction or [])
    if tta_prediction is not None and (not flips or any(flip.shape != prob.shape for flip in flips)):
        raise ValueError(f"tta_prediction must be {tuple(prob.shape)} like prob (or a non-empty sequence of such), got "
                         f"{[tuple(flip.shape) for flip in flips]}.")
    if margins is not None and (margins.ndim != prob.ndim + 1 or margins.shape[0] != batch
                                or margins.shape[2:] != prob.shape[1:]):
        raise ValueError(f"margins must be (B={batch}, L, K={classes}, *S={tuple(prob.shape[2:])}), got "
                         f"{tuple(margins.shape)}.")
    if spread is not None and (spread.ndim != 2 or spread.shape != (batch, layer_sa.shape[1])):
        raise ValueError(f"spread must be (B={batch}, L={layer_sa.shape[1]}) like the SA axis of layer_sa, got "
                         f"{tuple(spread.shape)}.")
    from .protoseg import SUM_BLOCK  # here: the package imports this module while initialising

    # per pixel in the probabilities' dtype (float32 at least): no float64 copy of a volume is made
    p = prob.as_subclass(torch.Tensor).flatten(2)  # (B, K, P)
    p = p if p.dtype in (torch.float32, torch.float64) else p.float()
    predicted = prediction.as_subclass(torch.Tensor).bool().flatten(2)
    boundary = _boundary(prediction.as_subclass(torch.Tensor).bool()).flatten(2)
    pixels = p.shape[-1]

    def total(values: torch.Tensor) -> torch.Tensor:
        """The sum over pixels (the last axis), float64; the number of true pixels of a bool tensor.

        Blocks of ``SUM_BLOCK`` pixels are summed in the values' dtype and their sums added in float64: as fast as a
        float32 sum, and the same on any number of threads (torch splits the single sum of an image across threads,
        which changes its seventh digit).
        """
        if values.dtype == torch.bool:
            return values.count_nonzero(-1).double()
        whole = values.shape[-1] // SUM_BLOCK * SUM_BLOCK
        blocks = values[..., :whole].unflatten(-1, (-1, SUM_BLOCK)).sum(-1).double().sum(-1)
        return blocks + values[..., whole:].sum(-1, dtype=torch.float64)

    count = total(predicted)  # (B, K)
    layer_sa = layer_sa.as_subclass(torch.Tensor).to(device=prob.device, dtype=torch.float64)
    mean_sa = layer_sa[:, mean_sa_layers].nanmean(1)
    fg_prob = torch.where(count > 0, total(p * predicted) / count.clamp_min(1), math.nan)
    if channel_prob is None:
        max_prob = total(torch.maximum(p, 1 - p)) / pixels
    else:  # softmax: the maximum over all channels, the same for every class of a case
        top = total(channel_prob.as_subclass(torch.Tensor).amax(1).flatten(1)) / pixels
        max_prob = top[:, None].expand(-1, classes)
    volume = count / pixels
    tiny = torch.finfo(p.dtype).tiny
    r = 1 - p
    entropy = -total(p * p.clamp_min(tiny).log() + r * r.clamp_min(tiny).log()) / (pixels * math.log(2))  # 0 log 0 = 0
    edge = total(boundary)
    boundary_margin = torch.where(edge > 0, total((2 * p - 1).abs_().mul_(boundary)) / edge.clamp_min(1), math.nan)
    columns = [mean_sa[..., None], layer_sa.transpose(1, 2), fg_prob[..., None], max_prob[..., None], volume[..., None],
               entropy[..., None], boundary_margin[..., None]]
    if spread is not None:
        spread = spread.as_subclass(torch.Tensor).to(device=prob.device, dtype=torch.float64)
        columns.append(spread[:, None].expand(-1, classes, -1))
    if margins is not None:
        z = margins.as_subclass(torch.Tensor).to(prob.device).flatten(3).abs()  # (B, L, K, P)
        z = z if z.dtype in (torch.float32, torch.float64) else z.float()
        inside, count_in = predicted[:, None], count[:, None]  # (B, 1, K, P), (B, 1, K)
        count_out = pixels - count_in
        sum_all, sum_in = total(z), total(z * inside)  # NaN where the layer's map is (undefined prototypes)
        proto_in = torch.where(count_in > 0, sum_in / count_in.clamp_min(1), math.nan).mean(1)
        proto_out = torch.where(count_out > 0, (sum_all - sum_in) / count_out.clamp_min(1), math.nan).mean(1)
        proto_near = torch.where(sum_all.isnan(), math.nan, total(z < NEAR_BOUNDARY) / pixels).mean(1)
        columns += [proto_in[..., None], proto_out[..., None], proto_near[..., None]]
    if flips:
        disagreement = torch.zeros_like(count)
        for flip in flips:
            other = flip.as_subclass(torch.Tensor).to(prob.device).bool().flatten(2)
            both = count + total(other)
            overlap = total(predicted & other)
            disagreement += torch.where(both > 0, 1 - 2 * overlap / both.clamp_min(1), 0.0)
        columns.append((disagreement / len(flips))[..., None])
    return torch.cat(columns, dim=-1)


def _boundary(prediction: torch.Tensor) -> torch.Tensor:
    """Bool ``(B, K, *S)``: the pixels whose prediction differs from that of a face neighbour (both sides of an
    edge)."""
    boundary = torch.zeros_like(prediction)
    for axis in range(2, prediction.ndim):
        n = prediction.shape[axis]
        differs = prediction.narrow(axis, 1, n - 1) != prediction.narrow(axis, 0, n - 1)
        boundary.narrow(axis, 1, n - 1).logical_or_(differs)
        boundary.narrow(axis, 0, n - 1).logical_or_(differs)
    return boundary


def default_feature_sets(names: Sequence[str]) -> dict[str, list[str]]:
    """The feature sets compared by ``QualityEstimator.fit``: mean SA alone, the SA profile, confidence alone, all.

    ``all`` holds every column (the ``spread_{layer}`` ones included) but the :data:`PROTOTYPE_FEATURES`: on the
    real-anatomy benchmark (``benchmarks/bench_quality.py --task mni152``) they did not lower the test MAE (see the
    README's table); they stay in the rows (and the CSV): name them in ``feature_sets`` to use them. A set whose
    features are absent from ``names`` is left out (``MeanSAQualityHandler`` leaves out the columns taken from
    stitched features when a sliding window streams).

    Example:
        >>> default_feature_sets(feature_names(["a", "b"], spread=True))["all"][-4:]
        ['entropy', 'boundary_margin', 'spread_a', 'spread_b']
    """
    sets = {
        "mean_sa": [name for name in names if name == "mean_sa"],
        "sa_profile": [name for name in names if name.startswith("sa_")],
        "confidence": [name for name in names if name in CONFIDENCE_FEATURES],
        "all": [name for name in names if name not in PROTOTYPE_FEATURES],
    }
    return {name: columns for name, columns in sets.items() if columns}


def group_folds(groups: ArrayLike, n_folds: int) -> np.ndarray:
    """Cross-validation folds that never split a group, balanced by size (GroupKFold's rule).

    Groups are taken from the largest to the smallest (equal sizes in sorted order of their labels), each into the
    fold with the fewest rows so far (the first such fold on ties). Equal-size groups labelled ``0, 1, 2, ...`` go
    round-robin: group ``g`` into fold ``g % n_folds``.

    Args:
        groups: one group label per row (a case id: the slices or patches of one case share it).
        n_folds: number of folds, at most the number of groups.

    Returns:
        ``(n,)`` int array: the fold of each row.

    Example:
        >>> group_folds([7, 7, 8, 9, 9, 9], 2).tolist()
        [1, 1, 1, 0, 0, 0]
    """
    labels, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    if not 2 <= n_folds <= labels.size:
        raise ValueError(f"n_folds must be between 2 and the number of groups ({labels.size}), got {n_folds}.")
    load = np.zeros(n_folds, dtype=np.int64)
    fold_of_group = np.empty(labels.size, dtype=np.int64)
    for group in np.argsort(-counts, kind="stable"):
        fold = int(np.argmin(load))
        fold_of_group[group] = fold
        load[fold] += counts[group]
    return fold_of_group[inverse.reshape(-1)]


@dataclass(frozen=True)
class FeatureSetScore:
    """Cross-validated quality of one feature set.

    Attributes:
        features: the feature names of the set.
        alpha: the ridge penalty with the smallest cross-validated MAE.
        cv_r: Pearson r between the out-of-fold (clipped) estimates and true Dice; NaN if either is constant (up to
            rounding).
        cv_mae: mean absolute error of the out-of-fold (clipped) estimates.
        cv_mae_se: its standard error: the standard deviation of the folds' MAEs over the square root of the number
            of folds (NaN in files of version 1).
    """

    features: tuple[str, ...]
    alpha: float
    cv_r: float
    cv_mae: float
    cv_mae_se: float = math.nan


@dataclass(frozen=True)
class QualityEstimator:
    """Ridge regression of true Dice on quality features, fitted on validation cases with ground truth.

    Build it with ``QualityEstimator.fit`` (or ``load`` / ``from_dict``), then ``predict`` an estimated Dice.

    Fitting, for every feature set and every penalty of ``alphas``: each fold's rows are estimated by a ridge
    regression fitted on the other folds (features standardised with the training rows' mean and population standard
    deviation; intercept unpenalised; to the logit of Dice with ``target="logit"``), mapped back to [0, 1]; the penalty
    with the smallest mean absolute error of these out-of-fold estimates wins (ties: the larger penalty). The feature
    set is chosen by ``selection`` (see :data:`SELECTIONS`; ties: the earlier set) and refitted on all valid rows with
    its penalty. The per-set CV figures
    (``feature_sets``) are optimistic for the chosen set, which was picked because they were good: the honest figures
    are ``nested_r`` and ``nested_mae``, where every outer fold's rows are estimated by the whole procedure (penalty
    and set chosen by an inner grouped CV) run on the other outer folds. The absolute nested out-of-fold errors are
    kept as ``residuals`` for the intervals (:meth:`interval`). The fields above ``nested_r`` describe the pooled
    estimator; with ``per_class`` kept, the nested figures and residuals are those of the per-class procedure, the one
    ``predict`` uses.

    Attributes:
        feature_names: the columns of the rows it was fitted on and ``predict`` takes, in order.
        layers: the probed layers whose SA columns the rows hold.
        mean_sa_layers: the layers averaged into ``mean_sa``.
        chosen: the name of the chosen feature set.
        features: the features of the chosen set.
        alpha: its ridge penalty.
        mean: the mean of each chosen feature over the fitted rows.
        scale: its standard deviation (1 for a constant feature).
        coef: the ridge coefficients of the standardised features.
        intercept: the intercept (the mean regression target of the fitted rows: true Dice, or its logit).
        feature_sets: the cross-validated score of every feature set, by name.
        n_rows: the number of valid rows fitted.
        n_groups: the number of groups (cases) among them.
        n_excluded: rows left out because a feature or the true Dice was NaN.
        n_folds: the number of cross-validation folds.
        versions: the monai_protoseg, torch and numpy versions it was fitted with.
        fingerprint: the network (and probed layers) it was fitted for, when ``MeanSAQualityHandler`` fitted it;
            ``None`` otherwise (``fit`` knows no network).
        selection: the rule that chose the feature set (:data:`SELECTIONS`).
        target: what the regression fits (:data:`TARGETS`).
        nested_r: Pearson r of the nested out-of-fold estimates (NaN: not computed or constant).
        nested_mae: their mean absolute error (NaN: not computed).
        residuals: the absolute nested out-of-fold errors of the valid rows (``()``: not computed).
        residual_classes: the class of each residual, when ``fit`` was given classes (``()`` otherwise).
        tta_axes: the spatial axes the ``tta_disagreement`` feature flipped (set by ``MeanSAQualityHandler``).
        per_class: one estimator per class, by class name, when ``fit`` kept them (``{}``: the pooled estimator
            estimates every row).
        pooled_nested_mae: the pooled procedure's nested MAE when per-class estimators were compared (NaN: not
            compared).
        per_class_nested_mae: the per-class procedure's nested MAE (NaN: not compared).
        per_class_se: the standard error, over the groups, of the per-row difference of the two (NaN: not compared).
    """

    feature_names: tuple[str, ...]
    layers: tuple[str, ...]
    mean_sa_layers: tuple[str, ...]
    chosen: str
    features: tuple[str, ...]
    alpha: float
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    feature_sets: dict[str, FeatureSetScore]
    n_rows: int
    n_groups: int
    n_excluded: int
    n_folds: int
    versions: dict[str, str]
    fingerprint: NetworkFingerprint | None = None
    selection: str = "min"
    target: str = "identity"
    nested_r: float = math.nan
    nested_mae: float = math.nan
    residuals: tuple[float, ...] = ()
    residual_classes: tuple[str, ...] = ()
    tta_axes: tuple[int, ...] = ()
    per_class: dict[str, QualityEstimator] = field(default_factory=dict)
    pooled_nested_mae: float = math.nan
    per_class_nested_mae: float = math.nan
    per_class_se: float = math.nan

    @classmethod
    def fit(
        cls,
        features: ArrayLike,
        dice: ArrayLike,
        groups: ArrayLike | None = None,
        *,
        feature_names: Sequence[str],
        layers: Sequence[str],
        mean_sa_layers: Sequence[str] | None = None,
        feature_sets: Mapping[str, Sequence[str]] | None = None,
        alphas: Sequence[float] = ALPHAS,
        selection: str = "one_se_largest",
        target: str = "logit",
        classes: ArrayLike | None = None,
        nested: bool = True,
        per_class: bool | str = "auto",
    ) -> QualityEstimator:
        """Fit on validation rows with ground truth; choose the penalty and the feature set by grouped CV, and measure
        the whole procedure by nested grouped CV.

        Args:
            features: ``(n, F)`` one row per case (and class, slice or patch), columns named by ``feature_names``.
            dice: ``(n,)`` true Dice of each row's prediction, in [0, 1] or NaN.
            groups: ``(n,)`` the group of each row (a case, a volume): rows of one group never straddle folds.
                ``None``: one per row.
            feature_names: the ``F`` column names (see :func:`feature_names`).
            layers: the probed layers the SA columns belong to (checked when the estimator is loaded).
            mean_sa_layers: the layers averaged into ``mean_sa``; default ``layers``.
            feature_sets: ``{name: [feature names]}`` to compare; default :func:`default_feature_sets`.
            alphas: the ridge penalties to try (positive).
            selection: how the feature set is chosen (:data:`SELECTIONS`).
            target: what the regression fits (:data:`TARGETS`).
            classes: ``(n,)`` the class of each row, kept with the residuals for per-class intervals; ``None``: none.
            nested: run the nested cross-validation (``nested_r``, ``nested_mae``, ``residuals``); ``False`` leaves
                them undefined (faster; no intervals).
            per_class: with ``classes`` of two or more classes, also fit one estimator per class (the same
                procedure on the class's rows; see :data:`PER_CLASS`): ``"auto"`` keeps them when their nested MAE
                is lower than the pooled one's by more than one standard error of the paired difference (over the
                groups), ``True`` always (an error if a class has too few rows), ``False`` never. Without ``nested``
                there is no comparison: ``"auto"`` keeps the pooled estimator, ``True`` is an error.

        Returns:
            The fitted estimator.

        Raises:
            ValueError: inputs of wrong shape, Inf, Dice outside [0, 1], unknown feature names or options, or fewer
                than ``MIN_ROWS`` valid rows or ``MIN_GROUPS`` groups (the message says how many and why; with
                ``per_class=True``, of which class).
        """
        x = _as_array(features, "features", 2)
        y = _as_array(dice, "dice", 1)
        names = list(feature_names)
        if x.shape[1] != len(names) or len(set(names)) != len(names):
            raise ValueError(f"feature_names must be {x.shape[1]} distinct names (one per column), got {names}.")
        if y.size != x.shape[0]:
            raise ValueError(f"features has {x.shape[0]} rows but dice {y.size} values.")
        groups = np.arange(y.size) if groups is None else np.asarray(groups).reshape(-1)
        if groups.size != y.size:
            raise ValueError(f"groups has {groups.size} labels for {y.size} rows.")
        classes = None if classes is None else np.asarray(classes).astype(str).reshape(-1)
        if classes is not None and classes.size != y.size:
            raise ValueError(f"classes has {classes.size} labels for {y.size} rows.")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}.")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
        if not is_option(per_class, PER_CLASS):
            raise ValueError(f"per_class must be one of {PER_CLASS}, got {per_class!r}.")
        if per_class is True and not nested:
            raise ValueError("per_class=True keeps the per-class estimators' nested cross-validation: it needs "
                             "nested=True (or per_class='auto' / False).")
        if np.isinf(x).any() or np.isinf(y).any():
            raise ValueError("features and dice must be finite or NaN (undefined), got Inf.")
        if ((y < 0) | (y > 1)).any():
            raise ValueError(f"dice must be in [0, 1], got values in [{np.nanmin(y):.4g}, {np.nanmax(y):.4g}].")
        alphas = [float(alpha) for alpha in sorted(alphas)]
        if not alphas or alphas[0] <= 0:
            raise ValueError(f"alphas must be positive penalties, got {alphas}.")
        sets = {name: list(columns) for name, columns in (feature_sets or default_feature_sets(names)).items()}
        for name, columns in sets.items():
            unknown = [column for column in columns if column not in names]
            if not columns or unknown:
                raise ValueError(f"feature set {name!r} must name features of {names}; unknown: {unknown}.")
        valid = ~(np.isnan(x).any(1) | np.isnan(y))
        _check_enough(y[valid], groups[valid], valid)
        common = dict(feature_names=tuple(names), layers=tuple(layers), selection=selection, target=target,
                      mean_sa_layers=tuple(layers if mean_sa_layers is None else mean_sa_layers), versions=_versions())
        rules = dict(index={name: [names.index(column) for column in columns] for name, columns in sets.items()},
                     sets=sets, alphas=alphas, selection=selection, target=target, nested=nested)
        pooled, estimates = _fit_rows(x[valid], y[valid], groups[valid], valid, **rules)
        models: dict[str, QualityEstimator] = {}
        comparison = (math.nan, math.nan, math.nan)
        if per_class is not False and nested and classes is not None and np.unique(classes[valid]).size > 1:
            models, comparison, estimates = cls._fit_per_class(x, y, groups, classes, valid, per_class, estimates,
                                                               common, rules)
        return cls(**common, **pooled, **_nested_record(estimates, y[valid]),
                   residual_classes=() if classes is None or not nested else tuple(classes[valid].tolist()),
                   per_class=models, pooled_nested_mae=comparison[0], per_class_nested_mae=comparison[1],
                   per_class_se=comparison[2])

    @classmethod
    def _fit_per_class(
        cls, x: np.ndarray, y: np.ndarray, groups: np.ndarray, classes: np.ndarray, valid: np.ndarray,
        per_class: bool | str, pooled_estimates: np.ndarray, common: dict, rules: dict,
    ) -> tuple[dict[str, QualityEstimator], tuple[float, float, float], np.ndarray]:
        """One estimator per class and the comparison with the pooled one: ``(models, (pooled nested MAE, per-class
        nested MAE, SE of the difference), nested estimates of the procedure kept)``; ``models`` is empty when the
        pooled estimator is kept (or, with ``per_class="auto"``, a class has too few rows)."""
        models, estimates = {}, np.empty(int(valid.sum()))
        for label in sorted(set(classes[valid].tolist())):
            rows = classes == label
            try:
                _check_enough(y[rows & valid], groups[rows & valid], valid[rows])
            except ValueError as error:
                if per_class is True:
                    raise ValueError(f"per_class=True: class {label!r}: {error}") from error
                return {}, (math.nan, math.nan, math.nan), pooled_estimates
            own = rows[valid]
            fitted, estimates[own] = _fit_rows(x[rows & valid], y[rows & valid], groups[rows & valid], valid[rows],
                                               **rules)
            models[label] = cls(**common, **fitted, **_nested_record(estimates[own], y[rows & valid]),
                                residual_classes=(label,) * int(own.sum()))
        y, groups = y[valid], groups[valid]
        difference = np.abs(estimates - y) - np.abs(pooled_estimates - y)
        by_group = np.array([difference[groups == group].mean() for group in np.unique(groups)])
        se = float(by_group.std(ddof=1) / math.sqrt(by_group.size))
        comparison = (float(np.abs(pooled_estimates - y).mean()), float(np.abs(estimates - y).mean()), se)
        if per_class is True or difference.mean() + se < 0:
            return models, comparison, estimates
        return {}, comparison, pooled_estimates

    def predict(self, features: ArrayLike, classes: ArrayLike | None = None) -> np.ndarray:
        """Estimated Dice, in [0, 1]; NaN where a feature of the chosen set is NaN.

        Args:
            features: ``(..., F)`` rows with the columns of ``feature_names`` (all of them, in order; only the
                chosen set's are used), e.g. ``(N, K, F)`` from :func:`quality_features`.
            classes: the class of each row (shape ``features.shape[:-1]``); needed, and used, only when the
                estimator holds one estimator per class (``per_class``): each row is estimated by its class's.

        Returns:
            ``(...)`` float64 array.

        Raises:
            ValueError: ``features`` has the wrong number of columns; a per-class estimator got no ``classes``, or
                classes of the wrong shape or that it was not fitted on (the message names them).
        """
        x = _as_array(features, "features")
        if x.ndim < 1 or x.shape[-1] != len(self.feature_names):
            raise ValueError(
                f"features must have {len(self.feature_names)} columns ({list(self.feature_names)}) in the last "
                f"dimension, got shape {x.shape}."
            )
        if not self.per_class:
            index = [self.feature_names.index(name) for name in self.features]
            standardised = (x[..., index] - np.array(self.mean)) / np.array(self.scale)
            return _backward(self.intercept + standardised @ np.array(self.coef), self.target)
        if classes is None:
            raise ValueError(f"this quality estimator holds one estimator per class ({', '.join(self.per_class)}): "
                             "pass the class of each row (classes=...).")
        classes = np.asarray(classes).astype(str)
        if classes.shape != x.shape[:-1]:
            raise ValueError(f"classes must have the shape of the rows {x.shape[:-1]}, got {classes.shape}.")
        unknown = sorted(set(classes.reshape(-1).tolist()) - set(self.per_class))
        if unknown:
            raise ValueError(f"classes {unknown} have no estimator: this one was fitted per class on "
                             f"{list(self.per_class)}.")
        estimate = np.empty(x.shape[:-1])
        for label, model in self.per_class.items():
            estimate[classes == label] = model.predict(x[classes == label])
        return estimate

    def interval(
        self, estimate: ArrayLike, coverage: float, classes: ArrayLike | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Split-conformal intervals ``estimate +/- q`` clipped to [0, 1], ``q`` from the nested residuals
        (:func:`conformal_halfwidth`).

        Args:
            estimate: estimates from :meth:`predict`, any shape; NaN gives a NaN interval.
            coverage: the nominal coverage, in (0, 1).
            classes: the class of each estimate (same shape): each class gets the half-width of its own residuals
                when the estimator was fitted with classes and that class has enough residuals for a finite one,
                else that of all residuals. ``None``: all residuals.

        Returns:
            ``(low, high)`` float64 arrays of the estimate's shape; NaN everywhere when the estimator has no
            residuals (fitted with ``nested=False`` or read from a version 1 file).
        """
        estimate = _as_array(estimate, "estimate")
        if not self.residuals:
            conformal_halfwidth([], coverage)  # checks coverage
            nan = np.full(estimate.shape, math.nan)
            return nan, nan.copy()
        pooled = conformal_halfwidth(self.residuals, coverage)
        width = np.full(estimate.shape, pooled)
        if classes is not None and self.residual_classes:
            classes = np.asarray(classes).astype(str)
            if classes.shape != estimate.shape:
                raise ValueError(f"classes must have the shape of estimate {estimate.shape}, got {classes.shape}.")
            residuals, labels = np.array(self.residuals), np.array(self.residual_classes)
            for name in np.unique(classes):
                own = conformal_halfwidth(residuals[labels == name], coverage)
                if math.isfinite(own):
                    width[classes == name] = own
        return conformal_interval(estimate, width)

    def check_layers(self, layers: Sequence[str], mean_sa_layers: Sequence[str] | None = None) -> None:
        """Raise unless the estimator was fitted on these probed layers (and these mean-SA layers, if given).

        Raises:
            ValueError: naming both layer lists.
        """
        same = list(layers) == list(self.layers)
        if mean_sa_layers is not None:
            same = same and list(mean_sa_layers) == list(self.mean_sa_layers)
        if not same:
            given = list(layers) if mean_sa_layers is None else f"{list(layers)} (mean SA of {list(mean_sa_layers)})"
            raise ValueError(
                f"the quality estimator was fitted on the SA of layers {list(self.layers)} (mean SA of "
                f"{list(self.mean_sa_layers)}), but this network is probed at layers {given}: a network with other "
                f"layers needs its own estimator (fit one on its validation cases)."
            )

    def cv_table(self) -> str:
        """The cross-validated score of every feature set, one line each, the chosen one marked with ``*``, then the
        nested cross-validation of the whole procedure (the honest figures); then the per-class estimators, if any,
        the same way, and the comparison of pooled and per-class nested MAE."""
        lines = [f"  {'feature set':12s} {'features':>8s} {'alpha':>8s} {'CV r':>7s} {'CV MAE':>7s} {'SE':>6s}"]
        for label, model in [("", self), *self.per_class.items()]:
            prefix = f"{label}: " if label else ""
            for name, score in model.feature_sets.items():
                mark = "*" if name == model.chosen and (label or not self.per_class) else " "
                lines.append(f"{mark} {prefix + name:12s} {len(score.features):8d} {score.alpha:8.3g} "
                             f"{score.cv_r:7.3f} {score.cv_mae:7.3f} {score.cv_mae_se:6.3f}")
        lines.append(f"  {'nested CV':12s} {'':8s} {'':8s} {self.nested_r:7.3f} {self.nested_mae:7.3f}  "
                     f"(selection by {self.selection!r} repeated inside every outer fold"
                     f"{', one estimator per class' if self.per_class else ''})")
        if not math.isnan(self.per_class_nested_mae):
            lines.append(f"  nested CV MAE pooled {self.pooled_nested_mae:.3f}, per class {self.per_class_nested_mae:.3f} "
                         f"(SE of the difference {self.per_class_se:.3f}): "
                         f"{'per class' if self.per_class else 'pooled'} kept")
        return "\n".join(lines)

    def cv_rows(self) -> tuple[list[str], list[list]]:
        """The per-set CV table as CSV columns and rows (``quality_cv.csv``): one row per feature set (``cv``:
        ``"grouped"``, selection-biased for the chosen one), then the nested CV of the whole procedure (``cv``:
        ``"nested"``, feature set ``"selected"``). With per-class estimators, each class's sets and nested row follow
        (``class`` the class name; the pooled rows have ``class`` ``"pooled"``), and the procedure in use, last, has
        ``class`` ``"per class"``; when the two were compared, the pooled procedure's nested MAE has a row too."""
        columns = ["feature_set", "features", "n_features", "alpha", "cv_r", "cv_mae", "cv_mae_se", "chosen", "cv",
                   "n_rows", "n_groups", "n_folds", "selection", "target", "class"]
        rows = []
        for label, model in [("pooled", self), *self.per_class.items()]:
            common = [model.n_rows, model.n_groups, model.n_folds, model.selection, model.target, label]
            in_use = label != "pooled" or not self.per_class
            rows += [[name, " ".join(score.features), len(score.features), score.alpha, score.cv_r, score.cv_mae,
                      score.cv_mae_se, in_use and name == model.chosen, "grouped", *common]
                     for name, score in model.feature_sets.items()]
            if label != "pooled":
                rows.append(["selected", " ".join(model.features), len(model.features), model.alpha, model.nested_r,
                             model.nested_mae, math.nan, True, "nested", *common])
        common = [self.n_rows, self.n_groups, self.n_folds, self.selection, self.target]
        if self.per_class:
            rows.append(["selected", " ".join(self.features), len(self.features), self.alpha, math.nan,
                         self.pooled_nested_mae, math.nan, False, "nested", *common, "pooled"])
        elif not math.isnan(self.per_class_nested_mae):
            rows.append(["selected", "", 0, math.nan, math.nan, self.per_class_nested_mae, math.nan, False, "nested",
                         *common, "per class"])
        if self.per_class:  # each class has its own set and penalty (in its rows above)
            rows.append(["selected", "", 0, math.nan, self.nested_r, self.nested_mae, math.nan, True, "nested",
                         *common, "per class"])
        else:
            rows.append(["selected", " ".join(self.features), len(self.features), self.alpha, self.nested_r,
                         self.nested_mae, math.nan, True, "nested", *common, "pooled"])
        return columns, rows

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict, with ``format`` and ``version``; NaN becomes ``None``; the ``fingerprint``
        only when there is one."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("fingerprint", "per_class")}
        values["per_class"] = {label: model.to_dict() for label, model in self.per_class.items()}
        values["feature_sets"] = {
            name: {"features": list(score.features), "alpha": score.alpha, "cv_r": _nan_to_none(score.cv_r),
                   "cv_mae": _nan_to_none(score.cv_mae), "cv_mae_se": _nan_to_none(score.cv_mae_se)}
            for name, score in self.feature_sets.items()
        }
        for name in ("feature_names", "layers", "mean_sa_layers", "features", "mean", "scale", "coef", "residuals",
                     "residual_classes", "tta_axes"):
            values[name] = list(values[name])
        for name in ("nested_r", "nested_mae", "pooled_nested_mae", "per_class_nested_mae", "per_class_se"):
            values[name] = _nan_to_none(values[name])
        if self.fingerprint is not None:
            values["fingerprint"] = self.fingerprint.to_dict()
        return {"format": ESTIMATOR_FORMAT, "version": ESTIMATOR_VERSION, **values}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QualityEstimator:
        """The estimator described by ``data``, as written by ``to_dict``; extra keys are ignored.

        Every value that ``predict`` uses is checked, so that a hand-edited file cannot give silently wrong estimates:
        distinct ``feature_names``, the chosen ``features`` distinct and among them, finite ``mean`` and ``coef``,
        each ``scale`` finite and > 0, ``intercept`` (the mean true Dice of the fitted rows) in [0, 1] (finite for the
        logit target); the cross-validation record: penalties > 0, ``cv_mae`` in [0, 1], ``cv_r`` in [-1, 1] or
        ``None``; the optional ``fingerprint`` two sha256 digests; and every per-class estimator the same way, on the
        same ``feature_names``.

        Raises:
            ValueError: ``data`` is not a mapping, has another ``format`` or a newer ``version``, misses fields, or
                a field has the wrong type or value; the message names the field (``scale[2]``).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a QualityEstimator must be a JSON object / mapping, got {type(data).__name__}.")
        if data.get("format") != ESTIMATOR_FORMAT:
            raise ValueError(f"format must be {ESTIMATOR_FORMAT!r}, got {data.get('format')!r}.")
        version = data.get("version")
        if not _is_int(version) or not 1 <= version <= ESTIMATOR_VERSION:
            raise ValueError(
                f"version {version!r} is not supported: this monai_protoseg reads versions 1 to {ESTIMATOR_VERSION} "
                f"(a newer monai_protoseg may have written it)."
            )
        optional = {"fingerprint", "selection", "target", "nested_r", "nested_mae", "residuals", "residual_classes",
                    "tta_axes",  # absent from version 1 files
                    "per_class", "pooled_nested_mae", "per_class_nested_mae", "per_class_se"}  # and version 2
        missing = [f.name for f in fields(cls) if f.name not in optional and f.name not in data]
        if missing:
            raise ValueError(f"missing field(s): {', '.join(missing)}.")
        values: dict[str, Any] = {}
        for name in ("feature_names", "layers", "mean_sa_layers", "features"):
            values[name] = _strings(data[name], name)
        for name in ("feature_names", "features"):
            twice = sorted({item for item in values[name] if values[name].count(item) > 1})
            if twice:
                raise ValueError(f"{name} must be distinct, but {twice} appear more than once.")
        for name in ("mean", "scale", "coef"):
            values[name] = tuple(_number(value, f"{name}[{i}]", positive=name == "scale")
                                 for i, value in enumerate(_list(data[name], name)))
        values["alpha"] = _number(data["alpha"], "alpha", positive=True)
        values["selection"] = data.get("selection", "min")
        values["target"] = data.get("target", "identity")
        for name, allowed in (("selection", SELECTIONS), ("target", TARGETS)):
            if values[name] not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {values[name]!r}.")
        logit = values["target"] == "logit"  # the intercept is then a mean logit, not a Dice
        values["intercept"] = _number(data["intercept"], "intercept", low=-math.inf if logit else 0,
                                      high=math.inf if logit else 1)
        values["nested_r"] = _number(data.get("nested_r"), "nested_r", nullable=True, low=-1, high=1)
        values["nested_mae"] = _number(data.get("nested_mae"), "nested_mae", nullable=True, low=0, high=1)
        for name in ("pooled_nested_mae", "per_class_nested_mae", "per_class_se"):
            values[name] = _number(data.get(name), name, nullable=True, low=0, high=1)
        per_class = data.get("per_class", {})
        if not isinstance(per_class, Mapping):
            raise ValueError(f"per_class must map class names to estimators, got {per_class!r}.")
        values["per_class"] = {}
        for label, model in per_class.items():
            try:
                values["per_class"][label] = cls.from_dict(model)
            except ValueError as error:
                raise ValueError(f"per_class[{label!r}]: {error}") from error
            if values["per_class"][label].per_class or values["per_class"][label].feature_names != tuple(
                    _strings(data["feature_names"], "feature_names")):
                raise ValueError(f"per_class[{label!r}] must be a single estimator on the same feature_names.")
        values["residuals"] = tuple(_number(value, f"residuals[{i}]", low=0, high=1)
                                    for i, value in enumerate(_list(data.get("residuals", []), "residuals")))
        values["residual_classes"] = _strings(data.get("residual_classes", []), "residual_classes")
        if values["residual_classes"] and len(values["residual_classes"]) != len(values["residuals"]):
            raise ValueError(f"residual_classes must have one class per residual ({len(values['residuals'])}), got "
                             f"{len(values['residual_classes'])}.")
        tta_axes = _list(data.get("tta_axes", []), "tta_axes")
        if not all(_is_int(axis) for axis in tta_axes):
            raise ValueError(f"tta_axes must be a list of integers, got {tta_axes!r}.")
        values["tta_axes"] = tuple(int(axis) for axis in tta_axes)
        for name in ("n_rows", "n_groups", "n_excluded", "n_folds"):
            if not _is_int(data[name]) or data[name] < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {data[name]!r}.")
            values[name] = int(data[name])
        chosen, sets = data["chosen"], data["feature_sets"]
        if not isinstance(sets, Mapping) or not isinstance(chosen, str) or chosen not in sets:
            raise ValueError(f"feature_sets must be a mapping that contains the chosen set {chosen!r}.")
        values["chosen"] = chosen
        values["feature_sets"] = {name: _feature_set_score(name, score) for name, score in sets.items()}
        if not isinstance(data["versions"], Mapping) or not all(isinstance(v, str) for v in data["versions"].values()):
            raise ValueError(f"versions must map package names to version strings, got {data['versions']!r}.")
        values["versions"] = dict(data["versions"])
        unknown = [name for name in values["features"] if name not in values["feature_names"]]
        if unknown or not len(values["mean"]) == len(values["scale"]) == len(values["coef"]) == len(values["features"]):
            raise ValueError(
                f"features must be among feature_names (unknown: {unknown}) with one mean, scale and coef each."
            )
        if values["features"] != values["feature_sets"][values["chosen"]].features:
            raise ValueError(f"features must be those of the chosen feature set {values['chosen']!r}.")
        return cls(**values, fingerprint=_fingerprint(data))

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Write the estimator to ``path`` as JSON, atomically (see ``monai_protoseg.io.write_json``).

        Returns:
            ``path`` as a ``pathlib.Path``.
        """
        return write_json(path, self.to_dict())

    @classmethod
    def load(
        cls, path: str | os.PathLike, layers: Sequence[str] | None = None, mean_sa_layers: Sequence[str] | None = None
    ) -> QualityEstimator:
        """Read an estimator written by ``save``; with ``layers``, check it was fitted on them (:meth:`check_layers`).

        Raises:
            FileNotFoundError: ``path`` does not exist (the message names it).
            ValueError: the file is not a valid estimator, or was fitted on other layers; the message names the file.
        """
        data = read_json(path, "QualityEstimator")
        try:
            estimator = cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path} is not a valid QualityEstimator file: {error}") from error
        if layers is not None:
            try:
                estimator.check_layers(layers, mean_sa_layers)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from error
        return estimator


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Ridge regression on standardised columns with an unpenalised intercept: ``(mean, scale, coef, intercept)``.

    With centred columns the intercept is the mean of ``y``, and the coefficients solve
    ``(Z^T Z + alpha I) w = Z^T (y - mean y)``.
    """
    mean = x.mean(0)
    std = x.std(0)
    scale = np.where(std > _CONSTANT, std, 1.0)
    z = (x - mean) / scale
    intercept = float(y.mean())
    coef = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - intercept))
    return mean, scale, coef, intercept


def _forward(y: np.ndarray, target: str) -> np.ndarray:
    """The regression target of Dice ``y`` (:data:`TARGETS`)."""
    if target == "identity":
        return y
    clipped = np.clip(y, LOGIT_EPS, 1 - LOGIT_EPS)
    return np.log(clipped / (1 - clipped))


def _backward(values: np.ndarray, target: str) -> np.ndarray:
    """Dice from regression outputs: clipped to [0, 1], or the sigmoid of a logit."""
    if target == "identity":
        return np.clip(values, 0, 1)
    return 1 / (1 + np.exp(-values))


def _cross_validate(
    x: np.ndarray, y: np.ndarray, folds: np.ndarray, alphas: Sequence[float], columns: tuple[str, ...],
    target: str = "identity",
) -> FeatureSetScore:
    """Out-of-fold estimates for every penalty; the penalty with the smallest MAE, its Pearson r and the standard
    error of its MAE over the folds."""
    estimates = np.empty((len(alphas), y.size))
    goal = _forward(y, target)
    n_folds = int(folds.max()) + 1
    for fold in range(n_folds):
        test = folds == fold
        for a, alpha in enumerate(alphas):
            mean, scale, coef, intercept = _ridge(x[~test], goal[~test], alpha)
            estimates[a, test] = intercept + ((x[test] - mean) / scale) @ coef
    estimates = _backward(estimates, target)
    errors = np.abs(estimates - y)
    mae = errors.mean(1)
    best = len(alphas) - 1 - int(np.argmin(mae[::-1]))  # the largest penalty among the smallest errors
    fold_mae = np.array([errors[best, folds == fold].mean() for fold in range(n_folds)])
    se = float(fold_mae.std(ddof=1) / math.sqrt(n_folds))
    return FeatureSetScore(columns, alphas[best], _pearson(estimates[best], y), float(mae[best]), se)


def _select(
    x: np.ndarray, y: np.ndarray, folds: np.ndarray, index: Mapping[str, list[int]],
    sets: Mapping[str, list[str]], alphas: Sequence[float], selection: str, target: str,
) -> tuple[dict[str, FeatureSetScore], str]:
    """Every feature set's CV score on ``folds`` and the name of the set ``selection`` chooses."""
    scores = {name: _cross_validate(x[:, index[name]], y, folds, alphas, tuple(sets[name]), target) for name in sets}
    best = min(scores, key=lambda name: scores[name].cv_mae)
    if selection == "min":
        return scores, best
    limit = scores[best].cv_mae + scores[best].cv_mae_se
    within = [name for name in scores if scores[name].cv_mae <= limit]
    size = {name: len(scores[name].features) for name in within}
    if selection == "one_se":
        return scores, min(within, key=size.__getitem__)  # ties: the earlier set
    return scores, max(within, key=lambda name: (size[name], -within.index(name)))  # ties: the earlier set


def _nested_estimates(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: np.ndarray, index: Mapping[str, list[int]],
    sets: Mapping[str, list[str]], alphas: Sequence[float], selection: str, target: str,
) -> np.ndarray:
    """Out-of-fold estimates of the whole procedure: for every outer fold, the penalty and set chosen by grouped CV
    on the other folds' rows (``min(MAX_FOLDS, their groups)`` inner folds), refitted there, estimate the fold."""
    estimates = np.empty(y.size)
    for fold in range(int(folds.max()) + 1):
        test = folds == fold
        train_groups = groups[~test]
        inner = group_folds(train_groups, min(MAX_FOLDS, int(np.unique(train_groups).size)))
        scores, chosen = _select(x[~test], y[~test], inner, index, sets, alphas, selection, target)
        columns = index[chosen]
        mean, scale, coef, intercept = _ridge(x[~test][:, columns], _forward(y[~test], target), scores[chosen].alpha)
        estimates[test] = _backward(intercept + ((x[test][:, columns] - mean) / scale) @ coef, target)
    return estimates


def is_option(value: Any, allowed: Sequence[Any]) -> bool:
    """Whether ``value`` is one of ``allowed``: strings by equality (a config's ``"auto"`` is another object than the
    literal), ``True`` and ``False`` by identity (so that ``1`` is not ``True``).

    Example:
        >>> is_option("".join(["au", "to"]), PER_CLASS), is_option(1, PER_CLASS), is_option(False, PER_CLASS)
        (True, False, True)
    """
    return any(value is option if isinstance(option, bool) else (isinstance(value, str) and value == option)
               for option in allowed)


def _check_enough(y: np.ndarray, groups: np.ndarray, valid: np.ndarray) -> None:
    """Raise unless the valid rows ``y`` (of the ``valid`` mask over all rows) hold ``MIN_ROWS`` rows from
    ``MIN_GROUPS`` groups; the message says how many and how many were excluded."""
    n_groups = int(np.unique(groups).size)
    if y.size < MIN_ROWS or n_groups < MIN_GROUPS:
        raise ValueError(
            f"cannot fit a quality estimator on {y.size} valid row(s) from {n_groups} group(s) "
            f"({int((~valid).sum())} of {valid.size} excluded because a feature or the true Dice is undefined): "
            f"at least {MIN_ROWS} rows from {MIN_GROUPS} groups are needed."
        )


def _fit_rows(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, valid: np.ndarray, *, index: Mapping[str, list[int]],
    sets: Mapping[str, list[str]], alphas: Sequence[float], selection: str, target: str, nested: bool,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """The fitted fields of a :class:`QualityEstimator` on valid rows (penalty and set chosen by grouped CV, refitted
    on all of them) and the nested out-of-fold estimates (``None`` without ``nested``); ``valid`` is the mask of the
    rows among all given, for ``n_excluded``."""
    n_groups = int(np.unique(groups).size)
    folds = group_folds(groups, min(MAX_FOLDS, n_groups))
    scores, chosen = _select(x, y, folds, index, sets, alphas, selection, target)
    mean, scale, coef, intercept = _ridge(x[:, index[chosen]], _forward(y, target), scores[chosen].alpha)
    fitted = dict(chosen=chosen, features=tuple(sets[chosen]), alpha=scores[chosen].alpha, mean=tuple(mean.tolist()),
                  scale=tuple(scale.tolist()), coef=tuple(coef.tolist()), intercept=intercept, feature_sets=scores,
                  n_rows=int(y.size), n_groups=n_groups, n_excluded=int((~valid).sum()), n_folds=int(folds.max() + 1))
    if not nested:
        return fitted, None
    return fitted, _nested_estimates(x, y, groups, folds, index, sets, alphas, selection, target)


def _nested_record(estimates: np.ndarray | None, y: np.ndarray) -> dict[str, Any]:
    """``nested_r``, ``nested_mae`` and ``residuals`` of nested out-of-fold ``estimates`` (undefined for ``None``)."""
    if estimates is None:
        return dict(nested_r=math.nan, nested_mae=math.nan, residuals=())
    errors = np.abs(estimates - y)
    return dict(nested_r=_pearson(estimates, y), nested_mae=float(errors.mean()), residuals=tuple(errors.tolist()))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either varies by at most ``_CONSTANT`` (constant up to rounding)."""
    if np.ptp(x) <= _CONSTANT or np.ptp(y) <= _CONSTANT:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    return float(np.clip(xc @ yc / math.sqrt(float(xc @ xc) * float(yc @ yc)), -1, 1))


def _versions() -> dict[str, str]:
    from . import __version__  # here, not at import time: the package imports this module while initialising

    return {"monai_protoseg": __version__, "torch": torch.__version__, "numpy": np.__version__}


def _as_array(values: ArrayLike, name: str, ndim: int | None = None) -> np.ndarray:
    """``values`` as a float64 numpy array (of ``ndim`` dimensions if given); ValueError naming it otherwise."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().as_subclass(torch.Tensor).to(torch.float64).numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numbers, got {type(values).__name__}: {error}") from error
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}.")
    return array


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _list(value: Any, name: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{name} must be a list, got {value!r}.")
    return value


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if not all(isinstance(item, str) for item in _list(value, name)):
        raise ValueError(f"{name} must be a list of strings, got {value!r}.")
    return tuple(value)


def _feature_set_score(name: str, value: Any) -> FeatureSetScore:
    if not isinstance(value, Mapping) or not {"features", "alpha", "cv_r", "cv_mae"} <= set(value):
        raise ValueError(f"feature_sets[{name!r}] must have features, alpha, cv_r and cv_mae, got {value!r}.")
    return FeatureSetScore(
        features=_strings(value["features"], f"feature_sets[{name!r}].features"),
        alpha=_number(value["alpha"], f"feature_sets[{name!r}].alpha", positive=True),
        cv_r=_number(value["cv_r"], f"feature_sets[{name!r}].cv_r", nullable=True, low=-1, high=1),
        cv_mae=_number(value["cv_mae"], f"feature_sets[{name!r}].cv_mae", low=0, high=1),
        cv_mae_se=_number(value.get("cv_mae_se"), f"feature_sets[{name!r}].cv_mae_se", nullable=True, low=0),
    )
