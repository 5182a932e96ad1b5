"""Ignite handler that writes each probed layer's whole-volume prototype maps as NIfTI files in the original image's
space, beside the prediction, with MONAI's ``Invertd`` and ``SaveImaged``: what 3D Slicer and ITK-SNAP open."""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
from ignite.engine import Engine
from monai.data import MetaTensor, decollate_batch
from monai.transforms import InvertibleTransform, Invertd, SaveImaged
from monai.utils import CommonKeys
from torch import nn

from ..inferers import DEFAULT_MEMORY_BUDGET
from ..protoseg import _rescaled_sigmoid, _resize, prototype_map
from ..recorder import candidate_layers
from .batch import batch_value
from .probe import LayerProbeHandler

__all__ = ["PrototypeMapSaver", "map_postfix"]


def map_postfix(layer: str, class_name: str) -> str:
    """The file name postfix of one layer's map of one class: ``map_{layer}_{class}``.

    Every character other than a letter, a digit, ``.``, ``-`` or ``_`` becomes ``_``, so any name makes a file name.

    Args:
        layer: the name the files show (the layer's readable alias, :func:`~monai_protoseg.layer_aliases`).
        class_name: the class name.

    Returns:
        The postfix that ``SaveImaged`` appends to the image's file name (``{stem}_{postfix}.nii.gz``).

    Example:
        >>> map_postfix("decoder.1", "TC")
        'map_decoder.1_TC'
        >>> map_postfix("model.1/submodule", "left lung")
        'map_model.1_submodule_left_lung'
    """
    return "_".join(["map", *(re.sub(r"[^A-Za-z0-9._-]+", "_", part) for part in (layer, class_name))])


class PrototypeMapSaver(LayerProbeHandler):
    """Each probed layer's prototype map of every case, written as NIfTI in the original image's space.

    For every case, probed layer and scored class, the prototype map over the whole image (prototypes guided by the
    network's soft output; a ``SlidingWindowInferer`` is handled as by :class:`~monai_protoseg.SAScoreHandler`) is
    put on the network's grid in a ``MetaTensor`` carrying the input image's meta data and applied transforms,
    mapped back to the original image by MONAI's ``Invertd`` with the preprocessing ``transform`` (as a bundle's
    ``Invertd(keys="pred", orig_keys="image")`` maps the prediction; linear interpolation), and written by
    ``SaveImaged``: ``output_dir/{image stem}_map_{layer}_{class}.nii.gz`` (see :func:`map_postfix`; the layer's
    readable alias), float32 in [0, 1] (NaN where a prototype does not exist), on the input's grid with its affine.
    With the evaluator's own ``SaveImaged(keys="pred", output_postfix="seg", separate_folder=False)`` writing to the
    same folder, the image, ``{stem}_seg.nii.gz`` and the maps load together in 3D Slicer or ITK-SNAP. Maps are
    computed, inverted and written one layer at a time, so the extra memory is one layer's maps of the batch.

    Args:
        layers: qualified names of the layers to probe; ``None``: :func:`~monai_protoseg.candidate_layers` of the
            network, chosen when the engine starts.
        transform: the preprocessing whose inverse maps the network's grid back to the original image (the
            dataset's transform, as given to ``Invertd``); the batch's image must carry its applied operations.
        output_dir: the folder of the files (the prediction's, so that they load together).
        network: the network; by default ``engine.network`` when the engine starts.
        activation: ``"auto"`` (from the evaluator's postprocessing, else the output's channel count; logged),
            ``"sigmoid"``, ``"softmax"`` or ``None`` (the network outputs probabilities already).
        class_names: one name per scored class; default ``"class{index}"`` with the output channel index.
        include_background: write output channel 0's maps too. A single-channel output is always written.
        image_key: the batch key of the network's input, whose meta data names the files and whose applied
            operations ``Invertd`` inverts.
        guide: ``"soft"`` (prototypes weighted by the network's probabilities) or ``"binary"`` (by its binarised
            prediction).
        output_ext: the file extension, ``".nii.gz"`` by default (any ``SaveImaged`` writes).
        mode: with a ``SlidingWindowInferer``: ``"stitch"``, ``"stream"`` or ``"auto"`` (the default: stream when the
            stitched features would exceed ``memory_budget``); see :class:`~monai_protoseg.handlers.LayerProbeHandler`.
        memory_budget: bytes of stitched features above which ``mode="auto"`` streams (2 GiB by default).

    Example:
        >>> import os, tempfile
        >>> import nibabel as nib
        >>> import numpy as np
        >>> import torch
        >>> from monai.data import DataLoader, Dataset
        >>> from monai.engines import SupervisedEvaluator
        >>> from monai.networks.nets import UNet
        >>> from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd
        >>> folder = tempfile.mkdtemp()
        >>> affine = np.diag([-1.5, -1.0, 2.0, 1.0])  # LPS, anisotropic
        >>> nib.save(nib.Nifti1Image(np.random.rand(16, 24, 8).astype(np.float32), affine), f"{folder}/case.nii.gz")
        >>> preprocessing = Compose([LoadImaged("image"), EnsureChannelFirstd("image"),
        ...                          Orientationd("image", axcodes="RAS"), Spacingd("image", pixdim=1.5)])
        >>> loader = DataLoader(Dataset([{"image": f"{folder}/case.nii.gz"}], preprocessing))
        >>> network = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 8), strides=(2,))
        >>> saver = PrototypeMapSaver(["model.0", "model.2"], transform=preprocessing, output_dir=folder)
        >>> SupervisedEvaluator(torch.device("cpu"), loader, network, val_handlers=[saver]).run()
        >>> sorted(name for name in os.listdir(folder) if "_map_" in name)
        ['case_map_encoder.1_class0.nii.gz', 'case_map_output_class0.nii.gz']
        >>> saved = nib.load(f"{folder}/case_map_output_class0.nii.gz")
        >>> saved.shape, bool(np.allclose(saved.affine, affine))  # the input's grid
        ((16, 24, 8), True)
    """

    def __init__(
        self,
        layers: Sequence[str] | None,
        transform: InvertibleTransform | Callable,
        output_dir: str | os.PathLike,
        network: nn.Module | None = None,
        activation: str | None = "auto",
        class_names: Sequence[str] | None = None,
        include_background: bool = False,
        image_key: str = CommonKeys.IMAGE,
        guide: str = "soft",
        output_ext: str = ".nii.gz",
        mode: str = "auto",
        memory_budget: float = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        super().__init__(layers, network, activation, class_names, include_background, image_key, CommonKeys.LABEL,
                         None, guide, mode, memory_budget)
        self.transform = transform
        self.output_dir = pathlib.Path(output_dir)
        self.output_ext = output_ext

    def default_layers(self, network: nn.Module) -> list[str]:
        """:func:`~monai_protoseg.candidate_layers` of the network."""
        return candidate_layers(network)

    def epoch_completed(self, engine: Engine) -> None:
        """Nothing to do: every batch's files are written when it completes."""

    def iteration_completed(self, engine: Engine) -> None:
        """Compute, invert and write the maps of the batch that just ran, one layer at a time."""
        prob, features = self.probed_batch(engine)
        guide = self.guide_weights(prob)[:, self.class_indices]  # (B, K', *S)
        streamed = self.streamed_inferer()
        logits = streamed.prototype_logits(guide) if streamed is not None else None  # at the layers' own scales
        images = self._case_images(engine)
        for layer in self.layers:
            if logits is not None:  # one whole-size map at a time
                maps = _rescaled_sigmoid(_resize(logits.pop(layer), prob.shape[2:]), streamed.logit_scales[layer])
            else:
                maps = torch.cat([prototype_map(features[layer], guide[:, k:k + 1]) for k in range(guide.shape[1])], 1)
            for image, case_maps in zip(images, maps.float().cpu()):
                self._write(image, self.layer_aliases[layer], case_maps)

    def _case_images(self, engine: Engine) -> list[MetaTensor]:
        """The network's input of each case of the batch, with its meta data and applied operations."""
        images = batch_value(engine.state.batch, self.image_key)
        if isinstance(images, torch.Tensor):
            images = decollate_batch(images)
        if not images or not all(isinstance(image, MetaTensor) and image.applied_operations for image in images):
            raise ValueError(
                f"PrototypeMapSaver needs engine.state.batch[{self.image_key!r}] as a MetaTensor holding the "
                "transforms applied to it (load it with LoadImaged, keep track_meta on), so that Invertd can map the "
                "prototype maps back to the original image."
            )
        return images

    def _write(self, image: MetaTensor, layer: str, maps: torch.Tensor) -> None:
        """Invert one case's maps of one layer ``(K', *S)`` to the original image and write one file per class."""
        postfixes = [map_postfix(layer, class_name) for class_name in self.class_labels()]
        data = {self.image_key: image}
        for postfix, class_map in zip(postfixes, maps):  # on the network's grid, as the image
            data[postfix] = MetaTensor(class_map[None], meta=image.meta, applied_operations=image.applied_operations)
        data = Invertd(keys=postfixes, transform=self.transform, orig_keys=self.image_key, nearest_interp=False)(data)
        for postfix in postfixes:
            SaveImaged(keys=postfix, output_dir=self.output_dir, output_postfix=postfix, output_ext=self.output_ext,
                       output_dtype=np.float32, resample=False, separate_folder=False, print_log=False)(data)
