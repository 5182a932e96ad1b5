"""Network fingerprints: which network (and which weights) a quality calibration or estimator was fitted for.

``MeanSAQualityHandler`` saves a :class:`NetworkFingerprint` with the calibration and the estimator it fits, and checks
it when it reads them back: an estimate from a fit for another network is meaningless, and one from a fit on other
weights of the same network (another checkpoint) may be off.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["NetworkFingerprint", "architecture_digest", "weights_digest"]

_DIGEST = re.compile(r"[0-9a-f]{64}")


def architecture_digest(network: nn.Module, layers: Sequence[str], guide: str = "soft") -> str:
    """The sha256 (hex) of what a fit depends on besides the weights: the network's class name, the name and shape of
    each parameter and buffer, the probed layers, in order, and the guide of their prototypes.

    Args:
        network: the network.
        layers: the layers whose SA the fit used.
        guide: what weighted the features into prototypes (``"soft"`` or ``"binary"``, see
            :func:`~monai_protoseg.prototypes`): the SA features differ with it.

    Returns:
        64 hexadecimal digits; equal for two instances of one architecture, whatever their weights or device.
    """
    description = {
        "class": type(network).__name__,
        "parameters": [[name, list(value.shape)] for name, value in network.named_parameters()],
        "buffers": [[name, list(value.shape)] for name, value in network.named_buffers()],
        "layers": list(layers),
        "guide": guide,
    }
    return hashlib.sha256(json.dumps(description).encode("utf-8")).hexdigest()


def weights_digest(network: nn.Module) -> str:
    """The sha256 (hex) of the values of the network's parameters (with their names, dtypes and shapes).

    Buffers (batch-norm statistics) are left out: they change only while training, with the parameters.

    Args:
        network: the network.

    Returns:
        64 hexadecimal digits; equal for the same weights on any device, different when any value differs.
    """
    digest = hashlib.sha256()
    for name, value in network.named_parameters():
        value = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{value.dtype}:{value.numel()}:".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class NetworkFingerprint:
    """What a quality calibration or estimator was fitted for, as two sha256 digests.

    Attributes:
        architecture: :func:`architecture_digest` of the network, the layers and the guide the fit used. Another
            value means another network, other layers or another guide: the fit does not apply.
        weights: :func:`weights_digest` of the network. Another value means the same network with other weights,
            such as the best checkpoint of a training run, often from an earlier epoch than the last fit: the fit
            applies, less exactly.

    Example:
        >>> network = nn.Conv2d(1, 2, 3)
        >>> fingerprint = NetworkFingerprint.of(network, ["weight"])
        >>> NetworkFingerprint.from_dict(fingerprint.to_dict()) == fingerprint
        True
    """

    architecture: str
    weights: str

    @classmethod
    def of(cls, network: nn.Module, layers: Sequence[str], guide: str = "soft") -> NetworkFingerprint:
        """The fingerprint of ``network`` probed at ``layers`` with prototypes guided by ``guide``."""
        return cls(architecture_digest(network, layers, guide), weights_digest(network))

    def to_dict(self) -> dict[str, str]:
        """Both digests, for JSON."""
        return {"architecture": self.architecture, "weights": self.weights}

    @classmethod
    def from_dict(cls, data: Any) -> NetworkFingerprint:
        """The fingerprint written by ``to_dict``.

        Raises:
            ValueError: ``data`` is not a mapping with both digests (64 hexadecimal digits each); the message names
                the field (``fingerprint.weights``).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"fingerprint must be an object with architecture and weights, got {data!r}.")
        for name in ("architecture", "weights"):
            if not isinstance(data.get(name), str) or not _DIGEST.fullmatch(data[name]):
                raise ValueError(f"fingerprint.{name} must be a sha256 digest (64 hexadecimal digits), got "
                                 f"{data.get(name)!r}.")
        return cls(data["architecture"], data["weights"])
