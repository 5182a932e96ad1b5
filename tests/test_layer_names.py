"""layer_aliases: readable names derived from the network's structure, the same in every run, never two alike; and
the layer_names.csv that pairs them with the qualified names."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DynUNet, SegResNet, UNet
from torch import nn

from monai_protoseg import candidate_layers, layer_aliases
from monai_protoseg.layer_names import read_layer_names, role_aliases, write_layer_names
from tests.test_candidate_layers import NETWORKS


def demo_unet() -> UNet:
    """The demo bundle's network."""
    return UNet(2, 1, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2, norm="batch")


def test_aliases_of_unet_dynunet_and_segresnet():
    unet = demo_unet()
    assert layer_aliases(unet, candidate_layers(unet)) == {
        "model.0": "encoder.1",
        "model.1.submodule.0": "encoder.2",
        "model.1.submodule.1.submodule.0": "encoder.3",
        "model.1.submodule.1.submodule.1.submodule": "bottleneck",
        "model.1.submodule.1.submodule.2": "decoder.2",
        "model.1.submodule.2": "decoder.1",
        "model.2": "output",
    }
    dynunet = DynUNet(2, 1, 2, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2], filters=[4, 8, 16, 32])
    assert layer_aliases(dynunet, candidate_layers(dynunet)) == {
        "input_block": "encoder.1", "downsamples.0": "encoder.2", "downsamples.1": "encoder.3",
        "bottleneck": "bottleneck", "upsamples.0": "decoder.3", "upsamples.1": "decoder.2", "upsamples.2": "decoder.1",
        "output_block": "output",
    }
    segresnet = SegResNet(3, init_filters=8, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))
    assert layer_aliases(segresnet, candidate_layers(segresnet)) == {
        "down_layers.0": "encoder.1", "down_layers.1": "encoder.2", "down_layers.2": "encoder.3",
        "down_layers.3": "bottleneck", "up_layers.0": "decoder.3", "up_layers.1": "decoder.2",
        "up_layers.2": "decoder.1", "conv_final": "output",
    }


@pytest.mark.parametrize("name", list(NETWORKS))
def test_every_known_network_reads_as_a_u(name):
    """Encoders numbered from 1 at the input, one bottleneck at most, decoders numbered down to 1 (UNETR keeps its
    own numbers: its last decoder is decoder2), then the output; the same for a second instance (other random
    weights), and never two layers alike."""
    build = NETWORKS[name][0]
    first, second = build(), build()
    aliases = list(layer_aliases(first, candidate_layers(first)).values())
    assert aliases == list(layer_aliases(second, candidate_layers(second)).values())
    assert len(set(aliases)) == len(aliases) and aliases[-1] == "output"
    encoders = [alias for alias in aliases if alias.startswith("encoder.")]
    decoders = [alias for alias in aliases if alias.startswith("decoder.")]
    assert aliases == encoders + ["bottleneck"] * ("bottleneck" in aliases) + decoders + ["output"]
    numbers = [int(alias.split(".")[1]) for alias in decoders]
    assert numbers == sorted(numbers, reverse=True) and numbers[-1] == (2 if name.startswith("UNETR") else 1)
    assert [alias.split(".")[1] for alias in encoders] == [str(i + 1) for i in range(len(encoders))]


def test_swin_unetr_keeps_its_own_numbers():
    aliases = role_aliases(NETWORKS["SwinUNETR-2d"][0]())
    assert aliases["encoder10"] == "bottleneck" and aliases["decoder5"] == "decoder.5" and aliases["out"] == "output"
    assert role_aliases(NETWORKS["UNETR-2d"][0]())["decoder2"] == "decoder.2"


def test_wrappers_submodules_and_other_layers_of_a_known_network():
    unet = UNet(2, 1, 1, channels=(4, 8, 16), strides=(2, 2))
    layers = ["module.model.1.submodule.1.submodule", "model.1.submodule.0.conv", "model.1", "model.2"]
    assert layer_aliases(nn.DataParallel(unet), layers) == {
        "module.model.1.submodule.1.submodule": "bottleneck",
        "model.1.submodule.0.conv": "encoder.2.conv",  # named after its nearest ancestor with a role
        "model.1": "model.1",  # no role, and "1" alone is a bare index: the qualified name
        "model.2": "output",
    }


class Plain(nn.Module):
    """A network candidate_layers does not know by name."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.features = nn.ModuleDict({
            "block_a": nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
            "block_b": nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
        })
        self.head = nn.ModuleDict({"block_a": nn.Conv2d(4, 2, 1)})

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.features["block_b"](self.features["block_a"](self.stem(image)))
        return self.head["block_a"](features)


def test_other_networks_get_the_shortest_unique_suffix():
    network = Plain()
    layers = ["stem", "features.block_a", "features.block_b", "features.block_b.0", "head.block_a"]
    assert layer_aliases(network, layers) == {
        "stem": "stem",
        "features.block_a": "features.block_a",  # head.block_a ends with block_a too
        "features.block_b": "block_b",
        "features.block_b.0": "block_b.0",  # not the bare index 0
        "head.block_a": "head.block_a",
    }
    assert layer_aliases(network, ["features.block_b"]) == {"features.block_b": "block_b"}  # whichever are probed


def test_layer_names_file_adds_the_layers_of_each_writer(tmp_path):
    write_layer_names(tmp_path, {"model.0": "encoder.1", "model.2": "output"})
    path = write_layer_names(tmp_path, {"module.model.1.submodule": "bottleneck", "model.2": "output"})
    assert path.read_text() == ("layer,qualified_name\nencoder.1,model.0\noutput,model.2\n"
                                "bottleneck,model.1.submodule\n")
    assert read_layer_names(path) == {"encoder.1": "model.0", "output": "model.2", "bottleneck": "model.1.submodule"}
