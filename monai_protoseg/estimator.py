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
- ``tta_disagreement`` (optional): ``1 - Dice`` between the prediction and the prediction for the input flipped along
  its last spatial axis, flipped back (0 when both are empty).

:class:`QualityEstimator` fits a ridge regression of true Dice on such rows from validation cases with ground truth,
for each of several feature sets (mean SA alone, the SA profile, confidence alone, all), chooses the penalty and the
set by cross-validation grouped by case, predicts an estimated Dice clipped to [0, 1], and saves to / loads from JSON.

Rows with an undefined (NaN) feature cannot be estimated: they are left out of the fit (and counted), and
``predict`` gives NaN where a feature the chosen set uses is NaN; nothing is imputed.

Pure numpy/torch and the standard library: no ignite, no MONAI, no scikit-learn.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

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
    "ESTIMATOR_FORMAT",
    "ESTIMATOR_VERSION",
    "ALPHAS",
    "MIN_ROWS",
    "MIN_GROUPS",
    "MAX_FOLDS",
    "PREDICTION_FEATURES",
    "CONFIDENCE_FEATURES",
    "TTA_FEATURE",
]

ESTIMATOR_FORMAT = "monai_protoseg.QualityEstimator"
"""The ``"format"`` field of a saved estimator."""

ESTIMATOR_VERSION = 1
"""The ``"version"`` field written by ``QualityEstimator.save``; ``load`` reads this version and older."""

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

TTA_FEATURE = "tta_disagreement"
"""The optional last feature: disagreement with the prediction for the flipped input."""

_CONSTANT = 1e-12
"""A feature whose standard deviation over the training rows is at most this is constant: it is centred, not scaled.
Estimates or Dice values that vary by at most this are constant: their Pearson r is NaN."""

ArrayLike = Sequence | np.ndarray | torch.Tensor


def feature_names(layers: Sequence[str], *, tta: bool = False) -> list[str]:
    """The names of the columns of :func:`quality_features`, in order.

    Args:
        layers: the probed layers, in the order of the SA axis.
        tta: whether the rows end with ``tta_disagreement``.

    Example:
        >>> feature_names(["model.1.submodule.2", "model.2"])
        ['mean_sa', 'sa_model.1.submodule.2', 'sa_model.2', 'fg_prob', 'max_prob', 'volume']
    """
    return ["mean_sa", *(f"sa_{layer}" for layer in layers), *PREDICTION_FEATURES, *([TTA_FEATURE] if tta else [])]


def quality_features(
    prob: torch.Tensor,
    prediction: torch.Tensor,
    layer_sa: torch.Tensor,
    mean_sa_layers: Sequence[int],
    *,
    channel_prob: torch.Tensor | None = None,
    tta_prediction: torch.Tensor | None = None,
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
        tta_prediction: ``(B, K, *S)`` binarised prediction for the flipped input, flipped back; ``None``: no
            ``tta_disagreement`` column.

    Returns:
        ``(B, K, F)`` float64 on ``prob``'s device, columns as :func:`feature_names` names them.

    Raises:
        ValueError: a shape does not match, or ``mean_sa_layers`` is empty or out of range.

    Example:
        >>> prob = torch.tensor([[[0.2, 0.7, 0.9, 0.4]]])  # (B=1, K=1, S=4)
        >>> rows = quality_features(prob, prob > 0.5, torch.tensor([[[0.8]], [[0.6]]]).view(1, 2, 1), [0, 1])
        >>> [round(value, 4) for value in rows[0, 0].tolist()]
        [0.7, 0.8, 0.6, 0.8, 0.75, 0.5]
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
    if tta_prediction is not None and tta_prediction.shape != prob.shape:
        raise ValueError(f"tta_prediction must be {tuple(prob.shape)} like prob, got {tuple(tta_prediction.shape)}.")
    p = prob.as_subclass(torch.Tensor).double().flatten(2)  # (B, K, P)
    predicted = prediction.as_subclass(torch.Tensor).bool().flatten(2)
    count = predicted.sum(-1).double()  # (B, K)
    layer_sa = layer_sa.as_subclass(torch.Tensor).to(device=prob.device, dtype=torch.float64)
    mean_sa = layer_sa[:, mean_sa_layers].nanmean(1)
    fg_prob = torch.where(count > 0, (p * predicted).sum(-1) / count.clamp_min(1), math.nan)
    if channel_prob is None:
        max_prob = torch.maximum(p, 1 - p).mean(-1)
    else:  # softmax: the maximum over all channels, the same for every class of a case
        top = channel_prob.as_subclass(torch.Tensor).double().amax(1).flatten(1).mean(-1)
        max_prob = top[:, None].expand(-1, classes)
    volume = count / p.shape[-1]
    columns = [mean_sa[..., None], layer_sa.transpose(1, 2), fg_prob[..., None], max_prob[..., None], volume[..., None]]
    if tta_prediction is not None:
        other = tta_prediction.as_subclass(torch.Tensor).bool().flatten(2)
        total = count + other.sum(-1).double()
        overlap = (predicted & other).sum(-1).double()
        disagreement = torch.where(total > 0, 1 - 2 * overlap / total.clamp_min(1), 0.0)
        columns.append(disagreement[..., None])
    return torch.cat(columns, dim=-1)


def default_feature_sets(names: Sequence[str]) -> dict[str, list[str]]:
    """The feature sets compared by ``QualityEstimator.fit``: mean SA alone, the SA profile, confidence alone, all.

    A set whose features are absent from ``names`` is left out.

    Example:
        >>> default_feature_sets(feature_names(["a", "b"]))["sa_profile"]
        ['sa_a', 'sa_b']
    """
    sets = {
        "mean_sa": [name for name in names if name == "mean_sa"],
        "sa_profile": [name for name in names if name.startswith("sa_")],
        "confidence": [name for name in names if name in CONFIDENCE_FEATURES],
        "all": list(names),
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
    """

    features: tuple[str, ...]
    alpha: float
    cv_r: float
    cv_mae: float


@dataclass(frozen=True)
class QualityEstimator:
    """Ridge regression of true Dice on quality features, fitted on validation cases with ground truth.

    Build it with ``QualityEstimator.fit`` (or ``load`` / ``from_dict``), then ``predict`` an estimated Dice.

    Fitting, for every feature set and every penalty of ``alphas``: each fold's rows are estimated by a ridge
    regression fitted on the other folds (features standardised with the training rows' mean and population standard
    deviation; intercept unpenalised), clipped to [0, 1]; the penalty with the smallest mean absolute error of these
    out-of-fold estimates wins (ties: the larger penalty), and the feature set with the smallest such error is chosen
    (ties: the earlier set). The chosen set is refitted on all valid rows with its penalty. The reported CV metrics
    are those of the chosen penalty, so slightly optimistic (no nested cross-validation).

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
        intercept: the intercept (the mean true Dice of the fitted rows).
        feature_sets: the cross-validated score of every feature set, by name.
        n_rows: the number of valid rows fitted.
        n_groups: the number of groups (cases) among them.
        n_excluded: rows left out because a feature or the true Dice was NaN.
        n_folds: the number of cross-validation folds.
        versions: the monai_protoseg, torch and numpy versions it was fitted with.
        fingerprint: the network (and probed layers) it was fitted for, when ``MeanSAQualityHandler`` fitted it;
            ``None`` otherwise (``fit`` knows no network).
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
    ) -> QualityEstimator:
        """Fit on validation rows with ground truth; choose the penalty and the feature set by grouped CV.

        Args:
            features: ``(n, F)`` one row per case (and class, slice or patch), columns named by ``feature_names``.
            dice: ``(n,)`` true Dice of each row's prediction, in [0, 1] or NaN.
            groups: ``(n,)`` the case of each row: rows of one case never straddle folds. ``None``: one per row.
            feature_names: the ``F`` column names (see :func:`feature_names`).
            layers: the probed layers the SA columns belong to (checked when the estimator is loaded).
            mean_sa_layers: the layers averaged into ``mean_sa``; default ``layers``.
            feature_sets: ``{name: [feature names]}`` to compare; default :func:`default_feature_sets`.
            alphas: the ridge penalties to try (positive).

        Returns:
            The fitted estimator.

        Raises:
            ValueError: inputs of wrong shape, Inf, Dice outside [0, 1], unknown feature names, or fewer than
                ``MIN_ROWS`` valid rows or ``MIN_GROUPS`` groups (the message says how many and why).
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
        x, y, groups = x[valid], y[valid], groups[valid]
        n_groups = int(np.unique(groups).size)
        if y.size < MIN_ROWS or n_groups < MIN_GROUPS:
            raise ValueError(
                f"cannot fit a quality estimator on {y.size} valid row(s) from {n_groups} case(s) "
                f"({int((~valid).sum())} of {valid.size} excluded because a feature or the true Dice is undefined): "
                f"at least {MIN_ROWS} rows from {MIN_GROUPS} cases are needed."
            )
        folds = group_folds(groups, min(MAX_FOLDS, n_groups))
        scores = {}
        for name, columns in sets.items():
            index = [names.index(column) for column in columns]
            scores[name] = _cross_validate(x[:, index], y, folds, alphas, tuple(columns))
        chosen = min(scores, key=lambda name: scores[name].cv_mae)
        index = [names.index(column) for column in sets[chosen]]
        mean, scale, coef, intercept = _ridge(x[:, index], y, scores[chosen].alpha)
        return cls(
            feature_names=tuple(names),
            layers=tuple(layers),
            mean_sa_layers=tuple(layers if mean_sa_layers is None else mean_sa_layers),
            chosen=chosen,
            features=tuple(sets[chosen]),
            alpha=scores[chosen].alpha,
            mean=tuple(mean.tolist()),
            scale=tuple(scale.tolist()),
            coef=tuple(coef.tolist()),
            intercept=intercept,
            feature_sets=scores,
            n_rows=int(y.size),
            n_groups=n_groups,
            n_excluded=int((~valid).sum()),
            n_folds=int(folds.max() + 1),
            versions=_versions(),
        )

    def predict(self, features: ArrayLike) -> np.ndarray:
        """Estimated Dice, clipped to [0, 1]; NaN where a feature of the chosen set is NaN.

        Args:
            features: ``(..., F)`` rows with the columns of ``feature_names`` (all of them, in order; only the
                chosen set's are used), e.g. ``(N, K, F)`` from :func:`quality_features`.

        Returns:
            ``(...)`` float64 array.
        """
        x = _as_array(features, "features")
        if x.ndim < 1 or x.shape[-1] != len(self.feature_names):
            raise ValueError(
                f"features must have {len(self.feature_names)} columns ({list(self.feature_names)}) in the last "
                f"dimension, got shape {x.shape}."
            )
        index = [self.feature_names.index(name) for name in self.features]
        standardised = (x[..., index] - np.array(self.mean)) / np.array(self.scale)
        return np.clip(self.intercept + standardised @ np.array(self.coef), 0, 1)

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
        """The cross-validated score of every feature set, one line each, the chosen one marked with ``*``."""
        lines = [f"  {'feature set':12s} {'features':>8s} {'alpha':>8s} {'CV r':>7s} {'CV MAE':>7s}"]
        for name, score in self.feature_sets.items():
            mark = "*" if name == self.chosen else " "
            lines.append(f"{mark} {name:12s} {len(score.features):8d} {score.alpha:8.3g} {score.cv_r:7.3f} "
                         f"{score.cv_mae:7.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict, with ``format`` and ``version``; NaN becomes ``None``; the ``fingerprint``
        only when there is one."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "fingerprint"}
        values["feature_sets"] = {
            name: {"features": list(score.features), "alpha": score.alpha, "cv_r": _nan_to_none(score.cv_r),
                   "cv_mae": _nan_to_none(score.cv_mae)}
            for name, score in self.feature_sets.items()
        }
        for name in ("feature_names", "layers", "mean_sa_layers", "features", "mean", "scale", "coef"):
            values[name] = list(values[name])
        if self.fingerprint is not None:
            values["fingerprint"] = self.fingerprint.to_dict()
        return {"format": ESTIMATOR_FORMAT, "version": ESTIMATOR_VERSION, **values}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QualityEstimator:
        """The estimator described by ``data``, as written by ``to_dict``; extra keys are ignored.

        Every value that ``predict`` uses is checked, so that a hand-edited file cannot give silently wrong estimates:
        distinct ``feature_names``, the chosen ``features`` distinct and among them, finite ``mean`` and ``coef``,
        each ``scale`` finite and > 0, ``intercept`` (the mean true Dice of the fitted rows) in [0, 1]; and the
        cross-validation record: penalties > 0, ``cv_mae`` in [0, 1], ``cv_r`` in [-1, 1] or ``None``; the optional
        ``fingerprint`` two sha256 digests.

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
        missing = [f.name for f in fields(cls) if f.name != "fingerprint" and f.name not in data]
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
        values["intercept"] = _number(data["intercept"], "intercept", low=0, high=1)
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


def _cross_validate(
    x: np.ndarray, y: np.ndarray, folds: np.ndarray, alphas: Sequence[float], columns: tuple[str, ...]
) -> FeatureSetScore:
    """Out-of-fold clipped estimates for every penalty; the penalty with the smallest MAE and its Pearson r."""
    estimates = np.empty((len(alphas), y.size))
    for fold in range(int(folds.max()) + 1):
        test = folds == fold
        for a, alpha in enumerate(alphas):
            mean, scale, coef, intercept = _ridge(x[~test], y[~test], alpha)
            estimates[a, test] = intercept + ((x[test] - mean) / scale) @ coef
    estimates = np.clip(estimates, 0, 1)
    mae = np.abs(estimates - y).mean(1)
    best = len(alphas) - 1 - int(np.argmin(mae[::-1]))  # the largest penalty among the smallest errors
    return FeatureSetScore(columns, alphas[best], _pearson(estimates[best], y), float(mae[best]))


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
    )
