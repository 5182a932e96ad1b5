"""ProtoSeg: the authors' module interface gives the reference formulation's numbers."""

from __future__ import annotations

import pytest
import torch

from monai_protoseg import ProtoSeg, prototype_map, sa_score


def reference_protoseg(xfeat: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The reference formulation, written out: weighted mean prototypes, softmax over the negative squared
    distances, ``[background, foreground]``; features on the prediction's grid, soft weights allowed."""
    weights = torch.ones_like(pred) if mask is None else mask
    spatial = tuple(range(2, xfeat.ndim))
    fg = (xfeat * pred * weights).sum(spatial) / (pred * weights).sum(spatial)
    bg = (xfeat * (1 - pred) * weights).sum(spatial) / ((1 - pred) * weights).sum(spatial)
    shape = (*fg.shape, *(1,) * len(spatial))
    dist_fg = ((xfeat - fg.view(shape)) ** 2).sum(1, keepdim=True)
    dist_bg = ((xfeat - bg.view(shape)) ** 2).sum(1, keepdim=True)
    return torch.softmax(torch.cat([-dist_bg, -dist_fg], dim=1), dim=1)


@pytest.mark.parametrize("size", [(40,), (16, 20), (8, 10, 12)])
@pytest.mark.parametrize("masked", [None, "binary", "soft"])
def test_output_equals_the_reference_formulation(size, masked):
    gen = torch.Generator().manual_seed(len(size))
    pred = torch.rand(2, 1, *size, generator=gen, dtype=torch.float64)
    xfeat = torch.randn(2, 6, *size, generator=gen, dtype=torch.float64) + 2 * pred
    mask = {None: None, "binary": (torch.rand(2, 1, *size, generator=gen) > 0.3).double(),
            "soft": torch.rand(2, 1, *size, generator=gen, dtype=torch.float64)}[masked]
    output = ProtoSeg(len(size))(xfeat, pred, mask)
    assert output.shape == (2, 2, *size)
    torch.testing.assert_close(output, reference_protoseg(xfeat, pred, mask), rtol=0, atol=1e-12)
    if masked != "soft":
        torch.testing.assert_close(output[:, 1:], prototype_map(xfeat, pred, mask), rtol=0, atol=1e-12)


def test_argmax_binarisation_is_the_map_sa_score_scores():
    gen = torch.Generator().manual_seed(0)
    pred = torch.zeros(1, 1, 24, 24)
    pred[..., 5:15, 6:18] = 0.9
    xfeat = torch.cat([pred, 1 - pred], 1) + 0.4 * torch.randn(1, 2, 24, 24, generator=gen)
    binary = ProtoSeg(2)(xfeat, pred).argmax(dim=1, keepdim=True) == 1  # the authors' README
    assert 0 < binary.sum() < binary.numel()
    target = pred > 0.5
    dice = 2 * (binary & target).sum() / (binary.sum() + target.sum())
    torch.testing.assert_close(sa_score(xfeat, pred, target), dice.reshape(1))


@pytest.mark.parametrize("call, message", [
    (lambda: ProtoSeg(4), "ndims must be 1, 2 or 3"),
    (lambda: ProtoSeg(3)(torch.rand(1, 2, 8, 8), torch.rand(1, 1, 8, 8)), r"ProtoSeg\(3\) needs xfeat .* \(1, 2, 8, 8\)"),
    (lambda: ProtoSeg(2)(torch.rand(1, 2, 8, 8), 2 * torch.rand(1, 1, 8, 8)), "prob must be"),
    (lambda: ProtoSeg(2)(torch.rand(1, 2, 8, 8), torch.rand(1, 1, 8, 8), torch.full((1, 1, 8, 8), float("nan"))),
     "mask must hold finite weights"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
