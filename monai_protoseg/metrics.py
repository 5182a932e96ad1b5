"""SA scores accumulated across images, iterations and distributed ranks, as a MONAI metric."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.metrics import CumulativeIterationMetric

from .protoseg import GUIDES, sa_scores

__all__ = ["SAScoreMetric"]


class SAScoreMetric(CumulativeIterationMetric):
    """Per-image, per-layer, per-class segmentation-ability scores.

    Each call scores one batch: for every layer and every class ``k`` (one-vs-rest),
    ``sa_score(features[layer], y_pred[:, k], y[:, k], mask)``, with the probabilities, reference and mask checked
    once and their prototype weights shared by all layers and classes. Scores are buffered like MONAI's ``DiceMetric``
    (``get_buffer()`` gathers them across ranks, uneven splits included) and averaged by ``aggregate()``.

    Args:
        layers: the layer names, in the order of the buffered layer axis.
        unit_wise: also buffer unit-wise scores, one buffer per layer (see :meth:`unit_scores`).
        ignore_empty: empty-target rule of :func:`~monai_protoseg.sa_score`.
        guide: ``"soft"`` (prototypes weighted by ``y_pred``) or ``"binary"`` (by ``y_pred > 0.5``).

    Example:
        >>> metric = SAScoreMetric(["layer"])
        >>> prob = torch.zeros(2, 1, 8, 8); prob[..., 2:6, 2:6] = 1
        >>> metric(prob, prob > 0.5, features={"layer": torch.cat([prob, 1 - prob], 1)})
        tensor([[[1.]],
        <BLANKLINE>
                [[1.]]])
        >>> metric.aggregate()
        tensor([[1.]])
    """

    def __init__(
        self,
        layers: Sequence[str],
        *,
        unit_wise: bool = False,
        ignore_empty: bool = True,
        guide: str = "soft",
    ) -> None:
        super().__init__()
        if guide not in GUIDES:
            raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}.")
        self.guide = guide
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("SAScoreMetric needs at least one layer.")
        self.unit_wise = unit_wise
        self.ignore_empty = ignore_empty

    def _compute_tensor(  # type: ignore[override]
        self,
        y_pred: torch.Tensor,
        y: torch.Tensor | None = None,
        features: Mapping[str, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Score one batch.

        Args:
            y_pred: ``(B, K, *S)`` foreground probability of each of the ``K`` classes.
            y: binary ``(B, K, *S)`` reference of each class (ground truth, or the binarised prediction).
            features: ``{layer: (B, C, *S_f)}`` for every layer of ``self.layers``.
            mask: optional binary ``(B, 1, *S)`` mask restricting the pixels that feed the prototypes.

        Returns:
            ``(B, L, K)`` layer-wise scores; with ``unit_wise``, followed by one ``(B, K, C_l)`` tensor per layer.
        """
        if y is None or features is None:
            raise ValueError("SAScoreMetric needs y (the reference) and features ({layer: tensor}).")
        if y_pred.shape != y.shape:
            raise ValueError(
                f"the probabilities {tuple(y_pred.shape)} and the reference {tuple(y.shape)} must have one channel "
                f"per class and the same spatial size."
            )
        missing = [layer for layer in self.layers if layer not in features]
        if missing:
            raise ValueError(f"no features for layers {missing}; got features for {list(features)}.")
        probed = {layer: features[layer] for layer in self.layers}
        options = {"ignore_empty": self.ignore_empty, "guide": self.guide}
        scores = torch.stack(list(sa_scores(probed, y_pred, y, mask, **options).values()), 1)
        if not self.unit_wise:
            return scores  # (B, L, K)
        units = sa_scores(probed, y_pred, y, mask, unit_wise=True, **options)
        return (scores, *units.values())

    def layer_scores(self) -> torch.Tensor:
        """All buffered layer-wise scores, gathered across ranks: ``(N, L, K)``, NaN where undefined."""
        buffers = self.get_buffer()
        buffer = buffers[0] if isinstance(buffers, list) else buffers
        if buffer is None:
            raise RuntimeError("SAScoreMetric has no scores yet: call it on a batch first.")
        return buffer

    def aggregate(self) -> torch.Tensor:
        """Mean layer-wise score over the images, undefined (NaN) scores ignored.

        Returns:
            ``(L, K)``: one mean per layer and class, NaN where every image's score was undefined.
        """
        return self.layer_scores().nanmean(0)

    def unit_scores(self) -> dict[str, torch.Tensor]:
        """Mean unit-wise score over the images, NaN ignored: ``{layer: (K, C_l)}``."""
        if not self.unit_wise:
            raise RuntimeError("unit-wise scores were not computed: create SAScoreMetric(..., unit_wise=True).")
        buffers = self.get_buffer()
        return {layer: buffer.nanmean(0) for layer, buffer in zip(self.layers, buffers[1:])}
