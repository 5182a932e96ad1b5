"""COIN, counterfactual inpainting (seed 004): a generator that makes an abnormal image look normal to a classifier.

A class-conditional generator ``G(X, c)`` (MONAI's ``BasicUNet``: encoder-decoder with skip connections, the target
class given as one constant one-hot channel per class) predicts a residual, ``X_cf = X + G(X, c)``. Trained with the
target class "normal" for every image, against a discriminator and a frozen classifier, it inpaints the lesion of an
abnormal image and leaves a normal image as it is; the lesion mask is then ``|X - X_cf|`` thresholded and cleaned (see
:func:`counterfactual_mask`). Only image-level labels are used. The losses of one iteration (weights in
:class:`CoinLoss`):

- discriminator: binary cross-entropy of ``D`` on the real images (real) and their counterfactuals (fake);
- adversarial: ``D`` should take the counterfactuals for real;
- classifier consistency: the frozen classifier should label every counterfactual normal (cross-entropy);
- L1 reconstruction: ``mean |X_cf - X|``, the smallest change that does it (for a normal image: the identity);
- cycle: ``mean |G(X_cf, y) - X|`` with ``y`` the image's own label: turned back, the original comes out;
- total variation of the difference ``X_cf - X``: one smooth region rather than scattered pixels.

2D and 3D share every line (``spatial_dims`` of the generator).
"""

from __future__ import annotations

import copy
import glob
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch
from monai.networks.layers import Conv
from monai.networks.nets import BasicUNet
from torch import nn
from torch.utils.data import DataLoader

from ..attribution.base import check_inputs, errors_named
from .masks import clean_mask, threshold_maps

__all__ = ["CoinGenerator", "CoinLoss", "CoinTrainer", "counterfactual_mask", "latest_checkpoint", "total_variation"]


class CoinGenerator(nn.Module):
    """Class-conditional residual generator: ``forward(image, target_class) = image + head(UNet([image, onehot(c)]))``.

    The encoder-decoder with skip connections is MONAI's ``BasicUNet``, by default with non-trainable (linear)
    upsampling: transposed convolutions leave a checkerboard in the difference ``X_cf - X``, which a classifier can
    be fooled by and which the mask would then trace. ``head`` is a 1x1 convolution initialised to zero, so the
    untrained generator is the identity and training starts from "change nothing" (the smallest counterfactual).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: number of image-level classes (the condition is a one-hot map of this many channels).
        features: ``BasicUNet``'s six feature sizes (image edges must be multiples of 16, at least 32: the
            instance norm of the 1/16 bottleneck needs more than one voxel).
        upsample: ``BasicUNet``'s upsampling: ``"nontrainable"``, ``"deconv"`` or ``"pixelshuffle"``.

    Example:
        >>> generator = CoinGenerator(2, features=(4, 4, 8, 8, 16, 4))
        >>> generator(torch.rand(2, 1, 32, 32), torch.tensor([0, 1])).shape
        torch.Size([2, 1, 32, 32])
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        num_classes: int = 2,
        features: Sequence[int] = (16, 16, 32, 64, 128, 16),
        upsample: str = "nontrainable",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        self.num_classes = num_classes
        self.unet = BasicUNet(spatial_dims, in_channels + num_classes, features[-1], features=features,
                              upsample=upsample)
        self.head = Conv[Conv.CONV, spatial_dims](features[-1], in_channels, kernel_size=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, image: torch.Tensor, target_class: torch.Tensor) -> torch.Tensor:
        """The counterfactual of ``image`` (``(B, C, *S)``) for ``target_class`` (``(B,)`` class indices)."""
        target_class = torch.as_tensor(target_class, device=image.device).long().reshape(-1)
        if target_class.shape[0] != image.shape[0]:
            raise ValueError(f"target_class has {target_class.shape[0]} entries for a batch of {image.shape[0]} "
                             f"images of shape {tuple(image.shape)}.")
        if (target_class < 0).any() or (target_class >= self.num_classes).any():
            raise ValueError(f"target_class must be in [0, {self.num_classes}), got {target_class.tolist()}.")
        condition = F.one_hot(target_class, self.num_classes).to(image.dtype)
        condition = condition.reshape(*condition.shape, *(1,) * (image.ndim - 2)).expand(-1, -1, *image.shape[2:])
        return image + self.head(self.unet(torch.cat([image, condition], dim=1)))


@dataclass
class CoinLoss:
    """The weights of COIN's generator losses (see the module docstring); a zero weight switches a term off.

    Example:
        >>> CoinLoss(cycle=0.0).weights()["cycle"]
        0.0
    """

    adversarial: float = 1.0
    classifier: float = 1.0
    reconstruction: float = 10.0
    cycle: float = 10.0
    total_variation: float = 10.0

    def __post_init__(self) -> None:
        for name, weight in asdict(self).items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight >= 0:
                raise ValueError(f"the weight of the {name} loss must be a non-negative number, got {weight!r}.")

    def weights(self) -> dict[str, float]:
        """Each term's weight, by name."""
        return {name: float(weight) for name, weight in asdict(self).items()}


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbours along every spatial axis, summed over axes, ``(B, C, *S)`` -> ()."""
    return sum(images.diff(dim=axis).abs().mean() for axis in range(2, images.ndim))


class CoinTrainer(Trainer):
    """Train COIN's generator and discriminator against a frozen classifier, one ignite iteration per batch.

    Each iteration updates the discriminator once, then the generator once, with the losses of the module docstring.
    The classifier is copied and frozen (eval mode, no gradients to its parameters): the network passed in is never
    changed. ``engine.state.output`` holds each loss term (floats) under ``"losses"``, handy for a progress bar; each
    epoch's mean of every term goes to ``engine.state.metrics`` as ``"{term}_loss"`` (``generator_loss`` is the weighted
    sum, ``discriminator_loss`` the discriminator's), which ``StatsHandler`` logs at the epoch's end. Checkpoint
    ``trainer``, ``generator``, ``discriminator`` and both optimizers with MONAI's ``CheckpointSaver``; load them with
    ``CheckpointLoader`` to resume (the epoch and iteration come back with the trainer's state).

    Args:
        device: where the networks run.
        max_epochs: training epochs.
        train_data_loader: batches of dicts with ``image_key`` and ``label_key`` (image-level class indices).
        generator: a :class:`CoinGenerator` (or any ``(image, target_class) -> image`` module).
        discriminator: ``(B, C, *S) -> (B, ...)`` real/fake logits, for example MONAI's
            ``Discriminator(last_act=None)``.
        classifier: the trained classifier, ``(B, C, *S) -> (B, num_classes)`` logits.
        g_optimizer: the generator's optimizer.
        d_optimizer: the discriminator's optimizer.
        loss_weights: a :class:`CoinLoss`, or a dict of its fields.
        normal_class: the target class of every counterfactual.
        image_key: the images' key in a batch.
        label_key: the image-level labels' key in a batch.
        train_handlers: handlers to attach (``CheckpointSaver``, ``StatsHandler``, ...).
        epoch_length: iterations per epoch; None: the loader's length.

    Example:
        >>> from monai.networks.nets import Discriminator
        >>> from monai_protoseg.weak import CoinGenerator
        >>> data = [{"image": torch.rand(1, 32, 32), "label": torch.tensor(i % 2)} for i in range(4)]
        >>> generator = CoinGenerator(2, features=(4, 4, 8, 8, 16, 4))
        >>> discriminator = Discriminator((1, 32, 32), (4, 8), (2, 2), last_act=None)
        >>> classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 2))
        >>> g_optimizer = torch.optim.Adam(generator.parameters())
        >>> d_optimizer = torch.optim.Adam(discriminator.parameters())
        >>> trainer = CoinTrainer("cpu", 1, DataLoader(data, batch_size=2), generator, discriminator, classifier,
        ...                       g_optimizer, d_optimizer)
        >>> trainer.run()
        >>> sorted(trainer.state.output["losses"])
        ['adversarial', 'classifier', 'cycle', 'discriminator', 'generator', 'reconstruction', 'total_variation']
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        generator: nn.Module,
        discriminator: nn.Module,
        classifier: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        loss_weights: CoinLoss | dict | None = None,
        normal_class: int = 0,
        image_key: str = "image",
        label_key: str = "label",
        train_handlers: Sequence | None = None,
        epoch_length: int | None = None,
    ) -> None:
        if not isinstance(train_data_loader, DataLoader):
            raise ValueError(f"train_data_loader must be a torch DataLoader, got {type(train_data_loader).__name__}.")
        super().__init__(device=torch.device(device), max_epochs=max_epochs, data_loader=train_data_loader,
                         epoch_length=epoch_length, prepare_batch=default_prepare_batch, decollate=False)
        self._loss_sums: dict[str, float] = {}
        self.add_event_handler(Events.EPOCH_STARTED, lambda engine: self._loss_sums.clear())
        self.add_event_handler(Events.ITERATION_COMPLETED, self._add_losses)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._store_mean_losses)
        if train_handlers:  # after the loss means, so that an epoch-level handler sees this epoch's
            self._register_handlers(train_handlers)
        self.generator = generator
        self.discriminator = discriminator
        self.classifier = copy.deepcopy(classifier).to(self.state.device).eval().requires_grad_(False)
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        if isinstance(loss_weights, dict):
            loss_weights = CoinLoss(**loss_weights)
        self.loss_weights = (loss_weights or CoinLoss()).weights()
        self.normal_class = normal_class
        self.image_key = image_key
        self.label_key = label_key

    def _iteration(self, engine: CoinTrainer, batchdata: dict) -> dict:
        """One discriminator step and one generator step; returns ``{"losses": {term: float}}``."""
        if not isinstance(batchdata, dict) or self.image_key not in batchdata or self.label_key not in batchdata:
            keys = list(batchdata) if isinstance(batchdata, dict) else type(batchdata).__name__
            raise ValueError(f"a COIN batch must be a dict with {self.image_key!r} and {self.label_key!r}, got {keys}.")
        images = batchdata[self.image_key].to(engine.state.device).as_subclass(torch.Tensor).float()
        check_inputs(images, f"CoinTrainer: the batch's {self.image_key!r}")  # NaN would spread to every weight
        labels = torch.as_tensor(batchdata[self.label_key]).to(engine.state.device).long().reshape(-1)
        normal = torch.full_like(labels, self.normal_class)
        self.generator.train()
        self.discriminator.train()

        counterfactuals = self.generator(images, normal)
        real_logits = self.discriminator(images)
        fake_logits = self.discriminator(counterfactuals.detach())
        d_loss = 0.5 * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                        + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
        self.d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.d_optimizer.step()

        terms = self.generator_losses(images, labels, counterfactuals)
        g_loss = sum(self.loss_weights[name] * value for name, value in terms.items())
        self.g_optimizer.zero_grad(set_to_none=True)
        g_loss.backward()
        self.g_optimizer.step()
        losses = {name: float(value.detach()) for name, value in terms.items()}
        losses.update(generator=float(g_loss.detach()), discriminator=float(d_loss.detach()))
        return {"losses": losses}

    def _add_losses(self, engine: CoinTrainer) -> None:
        for name, value in engine.state.output["losses"].items():
            self._loss_sums[name] = self._loss_sums.get(name, 0.0) + value

    def _store_mean_losses(self, engine: CoinTrainer) -> None:
        iterations = engine.state.epoch_length
        for name, total in self._loss_sums.items():
            engine.state.metrics[f"{name}_loss"] = total / iterations

    def generator_losses(
        self, images: torch.Tensor, labels: torch.Tensor, counterfactuals: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Each generator loss term (unweighted); a term of zero weight is a constant zero and costs nothing.

        Args:
            images: ``(B, C, *S)`` the real images.
            labels: ``(B,)`` their image-level classes.
            counterfactuals: ``(B, C, *S)`` ``G(images, normal)``, attached to the generator's graph.

        Returns:
            ``{"adversarial", "classifier", "reconstruction", "cycle", "total_variation"}`` scalars.
        """
        zero = counterfactuals.new_zeros(())
        weights = self.loss_weights
        terms = dict.fromkeys(weights, zero)
        if weights["adversarial"] > 0:
            fake_logits = self.discriminator(counterfactuals)
            terms["adversarial"] = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
        if weights["classifier"] > 0:
            normal = torch.full_like(labels, self.normal_class)
            terms["classifier"] = F.cross_entropy(self.classifier(counterfactuals), normal)
        if weights["reconstruction"] > 0:
            terms["reconstruction"] = (counterfactuals - images).abs().mean()
        if weights["cycle"] > 0:
            terms["cycle"] = (self.generator(counterfactuals, labels) - images).abs().mean()
        if weights["total_variation"] > 0:
            terms["total_variation"] = total_variation(counterfactuals - images)
        return terms


def counterfactual_mask(
    images: torch.Tensor,
    counterfactuals: torch.Tensor,
    threshold: str | float = 0.1,
    open_size: int = 3,
    close_size: int = 3,
    largest_component: bool = True,
) -> torch.Tensor:
    """COIN's lesion mask: ``|X - X_cf|`` (summed over channels) thresholded, opened, closed, largest component kept.

    Args:
        images: ``(B, C, *S)`` the images, ``B >= 1``, finite.
        counterfactuals: ``(B, C, *S)`` their counterfactuals, finite.
        threshold: a fixed threshold on the absolute difference (image intensity units), or ``"otsu"`` per case.
        open_size: edge of the opening's structuring element (1: no opening).
        close_size: edge of the closing's structuring element (1: no closing).
        largest_component: keep only each case's largest connected component.

    Returns:
        ``(B, 1, *S)`` bool.

    Raises:
        ValueError: shapes that differ, ``images`` or ``counterfactuals`` not finite (a NaN difference is never
            above the threshold: it would vanish into the background), or bad cleaning arguments.

    Example:
        >>> images = torch.zeros(1, 1, 16, 16)
        >>> counterfactuals = images.clone()
        >>> counterfactuals[..., 4:9, 4:9] = 1.0
        >>> int(counterfactual_mask(images, counterfactuals).sum())
        25
    """
    if images.shape != counterfactuals.shape:
        raise ValueError(f"images {tuple(images.shape)} and counterfactuals {tuple(counterfactuals.shape)} must have "
                         f"the same shape.")
    with errors_named("counterfactual_mask"):
        check_inputs(images, "images")
        check_inputs(counterfactuals, "counterfactuals")
    difference = (images - counterfactuals).abs().sum(dim=1, keepdim=True)
    return clean_mask(threshold_maps(difference, threshold), open_size, close_size, largest_component)


def latest_checkpoint(folder: str | os.PathLike, prefix: str = "checkpoint") -> str | None:
    """The checkpoint of the highest epoch that MONAI's ``CheckpointSaver`` wrote in ``folder``, None if there is none.

    Args:
        folder: the ``save_dir`` of the ``CheckpointSaver``.
        prefix: the file name prefix (``CheckpointSaver`` names epoch checkpoints ``checkpoint_epoch=N.pt``).

    Returns:
        the path, or None.

    Example:
        >>> import tempfile
        >>> latest_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    pattern = re.compile(rf"{re.escape(prefix)}_epoch=(\d+)\.pt$")
    found = [(int(match.group(1)), path) for path in glob.glob(os.path.join(glob.escape(str(folder)), f"{prefix}_*.pt"))
             if (match := pattern.search(os.path.basename(path)))]
    return max(found)[1] if found else None


