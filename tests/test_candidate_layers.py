"""candidate_layers and last_decoder_layers: the blocks a person would probe, each a feature map on the image grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import (
    UNETR,
    AttentionUnet,
    BasicUNet,
    DiNTS,
    DynUNet,
    FlexibleUNet,
    SegResNet,
    SegResNetDS,
    SwinUNETR,
    TopologyInstance,
    UNet,
)
from monai.utils import set_determinism
from torch import nn

from monai_protoseg import ProtoSegInferer, candidate_layers, last_decoder_layers, sa_score



def tiny_dints(spatial_dims: int, all_paths: bool = False) -> DiNTS:
    """A DiNTS over 3 resolutions (1/2, 1/4, 1/8 of the input). The searched code has 3 blocks; block 1's path 6 is a
    skip cell reading node 2 (1/8), which block 0 left empty: its output is a scalar, no feature map."""
    if all_paths:  # 2 blocks, every path active
        arch_code = [np.ones((2, 7), dtype=int), np.ones((2, 7), dtype=int)]
        space = TopologyInstance(arch_code, channel_mul=0.125, num_blocks=2, num_depths=3, spatial_dims=spatial_dims)
        return DiNTS(space, in_channels=1, num_classes=3, spatial_dims=spatial_dims)
    arch_code_a = np.array([[1, 0, 1, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0, 1], [1, 0, 0, 1, 0, 0, 0]])
    arch_code_c = np.ones((3, 7), dtype=int)  # the first convolution
    arch_code_c[1, 6] = 0  # skip_connect
    space = TopologyInstance(channel_mul=0.125, num_blocks=3, num_depths=3, spatial_dims=spatial_dims,
                             arch_code=[arch_code_a, arch_code_c])
    node_a = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 0]])  # the last block ends at 1/2 and 1/4
    return DiNTS(space, in_channels=1, num_classes=3, spatial_dims=spatial_dims, node_a=node_a)


UNET_3D = ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule.0",
           "model.1.submodule.1.submodule.1.submodule", "model.1.submodule.1.submodule.2", "model.1.submodule.2",
           "model.2"]
BASIC_UNET = ["conv_0", "down_1", "down_2", "down_3", "down_4", "upcat_4", "upcat_3", "upcat_2", "upcat_1",
              "final_conv"]
SEGRESNET = ["down_layers.0", "down_layers.1", "down_layers.2", "down_layers.3", "up_layers.0", "up_layers.1",
             "up_layers.2", "conv_final"]
DYNUNET = ["input_block", "downsamples.0", "downsamples.1", "bottleneck", "upsamples.0", "upsamples.1", "upsamples.2",
           "output_block"]
FLEXIBLE_DECODER = [f"decoder.blocks.{i}" for i in range(5)] + ["segmentation_head"]
RESNET = ["encoder.layer1", "encoder.layer2", "encoder.layer3", "encoder.layer4"]
ATTENTION_UNET = ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule.0",
                  "model.1.submodule.1.submodule.1.submodule", "model.1.submodule.1.submodule.1", "model.1.submodule.1",
                  "model.1", "model.2"]
SEGRESNET_DS = ["encoder.layers.0.blocks", "encoder.layers.1.blocks", "encoder.layers.2.blocks",
                "encoder.layers.3.blocks", "up_layers.0.blocks", "up_layers.1.blocks", "up_layers.2.blocks",
                "up_layers.2.head"]
SWIN_UNETR = ["encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "decoder5", "decoder4", "decoder3",
              "decoder2", "decoder1", "out"]
UNETR_LAYERS = ["encoder1", "encoder2", "encoder3", "encoder4", "decoder5", "decoder4", "decoder3", "decoder2", "out"]
DINTS_STEMS_DOWN = ["stem_down.0.mod", "stem_down.1.mod", "stem_down.2.mod"]
DINTS_SEARCHED = DINTS_STEMS_DOWN + ["stem_up.1.mod", "stem_up.0.mod", "stem_finals"]  # no cell: node summands
DINTS_ALL_PATHS = DINTS_STEMS_DOWN + ["stem_up.2.mod", "stem_up.1.mod", "stem_up.0.mod", "stem_finals"]

# name: (build, input shape, candidate layers, last_decoder_layers)
NETWORKS = {
    "UNet-3d": (lambda: UNet(3, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2)), (2, 1, 16, 16, 16), UNET_3D,
                UNET_3D[4:6]),
    "UNet-2d": (lambda: UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1), (2, 1, 16, 16),
                ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule", "model.1.submodule.2", "model.2"],
                ["model.1.submodule.1.submodule", "model.1.submodule.2"]),
    "BasicUNet-2d": (lambda: BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4)), (2, 1, 32, 32), BASIC_UNET,
                     ["upcat_2", "upcat_1"]),
    "BasicUNet-3d": (lambda: BasicUNet(3, 1, 2, features=(4, 4, 4, 4, 8, 4)), (2, 1, 32, 32, 32), BASIC_UNET,
                     ["upcat_2", "upcat_1"]),
    "SegResNet-3d": (lambda: SegResNet(blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=8, in_channels=4,
                                       out_channels=3), (2, 4, 16, 16, 16), SEGRESNET, ["up_layers.1", "up_layers.2"]),
    "SegResNet-2d": (lambda: SegResNet(2, init_filters=8, blocks_down=(1, 1, 1, 1)), (2, 1, 32, 32), SEGRESNET,
                     ["up_layers.1", "up_layers.2"]),
    "DynUNet-2d": (lambda: DynUNet(2, 1, 2, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2], filters=[4, 8, 16, 32]).eval(),
                   (2, 1, 32, 32), DYNUNET, ["upsamples.1", "upsamples.2"]),
    "DynUNet-3d-deep-supervision": (
        lambda: DynUNet(3, 1, 2, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2], filters=[4, 8, 16, 32],
                        deep_supervision=True, deep_supr_num=2),
        (2, 1, 16, 16, 16), DYNUNET, ["upsamples.1", "upsamples.2"]),
    "FlexibleUNet-resnet-2d": (
        lambda: FlexibleUNet(1, 2, "resnet10", spatial_dims=2, decoder_channels=(16, 8, 8, 4, 4)),
        (2, 1, 64, 64), RESNET + FLEXIBLE_DECODER, ["decoder.blocks.3", "decoder.blocks.4"]),
    "FlexibleUNet-resnet-3d": (
        lambda: FlexibleUNet(1, 2, "resnet10", spatial_dims=3, decoder_channels=(8, 8, 4, 4, 4)),
        (2, 1, 32, 32, 32), RESNET + FLEXIBLE_DECODER, ["decoder.blocks.3", "decoder.blocks.4"]),
    "FlexibleUNet-efficientnet-2d": (
        lambda: FlexibleUNet(1, 2, "efficientnet-b0", spatial_dims=2, decoder_channels=(16, 8, 8, 4, 4)),
        (2, 1, 64, 64),
        ["encoder._blocks.0", "encoder._blocks.1", "encoder._blocks.2", "encoder._blocks.4", "encoder._blocks.6"]
        + FLEXIBLE_DECODER, ["decoder.blocks.3", "decoder.blocks.4"]),
    "AttentionUnet-2d": (lambda: AttentionUnet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2)), (2, 1, 32, 32),
                         ATTENTION_UNET, ["model.1.submodule.1", "model.1"]),
    "AttentionUnet-3d": (lambda: AttentionUnet(3, 1, 2, channels=(4, 8), strides=(2,)), (2, 1, 16, 16, 16),
                         ["model.0", "model.1.submodule", "model.1", "model.2"], ["model.1.submodule", "model.1"]),
    "SegResNetDS-2d-deep-supervision": (  # in training mode, it returns a list of outputs
        lambda: SegResNetDS(2, init_filters=4, blocks_down=(1, 1, 1, 1), dsdepth=2), (2, 1, 32, 32), SEGRESNET_DS,
        ["up_layers.1.blocks", "up_layers.2.blocks"]),
    "SegResNetDS-3d": (lambda: SegResNetDS(3, init_filters=4, blocks_down=(1, 2, 2, 4)), (2, 1, 16, 16, 16),
                       SEGRESNET_DS, ["up_layers.1.blocks", "up_layers.2.blocks"]),
    "SwinUNETR-2d": (lambda: SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=2),
                     (2, 1, 64, 64), SWIN_UNETR, ["decoder2", "decoder1"]),
    "SwinUNETR-3d": (lambda: SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=3,
                                       depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4),
                     (1, 1, 64, 64, 64), SWIN_UNETR, ["decoder2", "decoder1"]),
    "UNETR-2d": (lambda: UNETR(1, 2, (32, 32), feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4,
                               spatial_dims=2), (2, 1, 32, 32), UNETR_LAYERS, ["decoder3", "decoder2"]),
    "UNETR-3d": (lambda: UNETR(1, 2, (32, 32, 32), feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4),
                 (2, 1, 32, 32, 32), UNETR_LAYERS, ["decoder3", "decoder2"]),
    "DiNTS-2d": (lambda: tiny_dints(2), (2, 1, 32, 32), DINTS_SEARCHED, ["stem_up.1.mod", "stem_up.0.mod"]),
    "DiNTS-3d": (lambda: tiny_dints(3), (2, 1, 32, 32, 32), DINTS_SEARCHED, ["stem_up.1.mod", "stem_up.0.mod"]),
    "DiNTS-2d-all-paths": (lambda: tiny_dints(2, all_paths=True), (2, 1, 32, 32), DINTS_ALL_PATHS,
                           ["stem_up.1.mod", "stem_up.0.mod"]),
}


PARAMS = [pytest.param(*case, id=name) for name, case in NETWORKS.items()]


def hook_count(network: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in network.modules())


def outputs_in_call_order(network: nn.Module, image: torch.Tensor, layers: list[str]) -> tuple[dict, object]:
    """Each layer's output in a forward pass (its first call), keyed in the order the layers ran; the prediction."""
    outputs = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            outputs.setdefault(name, output)

        return hook

    modules = dict(network.named_modules())
    handles = [modules[name].register_forward_hook(record(name)) for name in layers]
    try:
        with torch.no_grad():
            prediction = network(image)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, prediction


def assert_feature_maps_on_the_grid(outputs: dict, shape: tuple[int, ...]) -> None:
    """Each output is a (B, C, *S) tensor whose size is the input's over a power of two along every spatial axis."""
    for layer, output in outputs.items():
        assert isinstance(output, torch.Tensor) and output.ndim == len(shape), (layer, type(output))
        assert output.shape[0] == shape[0], (layer, output.shape)
        for size, out in zip(shape[2:], output.shape[2:]):
            ratio = size // out
            assert size % out == 0 and ratio & (ratio - 1) == 0, (layer, tuple(output.shape), shape)


@pytest.mark.parametrize("build, shape, expected, last_two", PARAMS)
def test_candidate_layers_of_monai_networks(build, shape, expected, last_two):
    set_determinism(seed=0)
    network = build()
    assert candidate_layers(network) == expected
    assert last_decoder_layers(network) == last_two
    outputs, prediction = outputs_in_call_order(network, torch.rand(shape), expected)
    assert list(outputs) == expected  # every layer ran, in this order
    assert_feature_maps_on_the_grid(outputs, shape)
    # the last layer is the output block: its output is the prediction (the first one under deep supervision)
    final = prediction if isinstance(prediction, torch.Tensor) else prediction[0]
    if isinstance(network, DynUNet) and network.training:
        final = prediction[:, 0]  # DynUNet stacks its deep-supervision outputs behind the prediction
    assert torch.equal(outputs[expected[-1]], final)
    compiled = torch.compile(network, backend="eager")
    for wrapped, prefix in ((nn.DataParallel(network), "module."), (compiled, "_orig_mod.")):
        assert candidate_layers(wrapped) == [prefix + name for name in expected]
        assert last_decoder_layers(wrapped) == [prefix + name for name in last_two]


def test_protoseg_inferer_runs_on_swin_unetr_with_sliding_windows():
    set_determinism(seed=0)
    network = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=2).eval()
    image = torch.rand(1, 1, 96, 96)
    inferer = ProtoSegInferer(SlidingWindowInferer((64, 64), overlap=0.5), candidate_layers(network))
    with torch.no_grad():
        prediction = inferer(image, network)
        expected = SlidingWindowInferer((64, 64), overlap=0.5)(image, network)
    torch.testing.assert_close(prediction, expected)
    sizes = {layer: features.shape[2] for layer, features in inferer.features.items()}
    assert sizes == {"encoder1": 96, "encoder2": 48, "encoder3": 24, "encoder4": 12, "encoder10": 3, "decoder5": 6,
                     "decoder4": 12, "decoder3": 24, "decoder2": 48, "decoder1": 96, "out": 96}
    prob = torch.softmax(prediction, dim=1)[:, 1:]
    for features in inferer.features.values():
        assert torch.isfinite(sa_score(features, prob, prob > 0.5)).all()


class Tokens(nn.Module):
    """A transformer-like block whose output is tokens ``(B, H * W, C)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.flatten(2).transpose(1, 2))


class ChannelsLast(nn.Module):
    """A block whose output is channels-last ``(B, H, W, C)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1))


class HybridNet(nn.Module):
    """Convolution blocks on the grid, a squeeze-excitation gate ``(B, C, 1, 1)``, a token and a channels-last block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.Sigmoid())
        self.tokens = Tokens(8)
        self.channels_last = ChannelsLast(8)
        self.up = nn.Sequential(nn.ConvTranspose2d(8, 8, 2, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.stem(x))
        x = x * self.gate(x)
        b, c, h, w = x.shape
        x = self.tokens(x).transpose(1, 2).reshape(b, c, h, w)
        x = self.channels_last(x).permute(0, 3, 1, 2)
        return self.head(self.up(x))


def test_fallback_keeps_the_blocks_on_the_grid_and_leaves_the_network_as_it_was():
    set_determinism(seed=0)
    network = HybridNet().train()
    network.stem[1].eval()  # a frozen norm stays frozen
    seen = []
    network.down.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    buffers = {name: buffer.clone() for name, buffer in network.named_buffers()}
    modes = {name: module.training for name, module in network.named_modules()}
    hooks = hook_count(network)

    layers = candidate_layers(network)

    assert layers == ["stem", "down", "up", "head"]  # not the gate (1 x 1), the tokens nor the channels-last block
    assert not seen and hook_count(network) == hooks  # the dummy passes ran no hook; the hook is still there
    assert {name: module.training for name, module in network.named_modules()} == modes
    assert all(torch.equal(buffer, buffers[name]) for name, buffer in network.named_buffers())
    assert last_decoder_layers(network) == ["down", "up"]  # the last grid block is taken as the output block
    assert candidate_layers(nn.DataParallel(network)) == ["module." + name for name in layers]
    network.eval()
    outputs, _ = outputs_in_call_order(network, torch.rand(2, 1, 32, 48), layers)
    assert_feature_maps_on_the_grid(outputs, (2, 1, 32, 48))
    assert candidate_layers(network, example_input=torch.rand(2, 1, 16, 24)) == layers
    assert len(seen) == 1


def test_fallback_of_plain_sequential_networks():
    block = lambda c_in, c_out: nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU())  # noqa: E731
    network = nn.Sequential(block(1, 4), nn.Sequential(block(4, 8), block(8, 8)), nn.Conv2d(8, 1, 1))
    assert candidate_layers(network) == ["0", "1.0", "1.1"]
    assert candidate_layers(nn.Conv2d(1, 1, 1)) == []
    assert candidate_layers(nn.Sequential(nn.Conv3d(1, 2, 1), nn.ReLU())) == ["0", "1"]


def test_fallback_says_to_pass_an_example_input_when_the_dummy_input_is_refused():
    fixed_size = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()), nn.Flatten(),
                               nn.Linear(4 * 32 * 32, 2)).train()
    message = r"candidate_layers does not know Sequential.*shape \(1, 1, 64, 64\).*pass example_input="
    with pytest.raises(ValueError, match=message):  # zeros (1, 1, 32, 32) pass, their double does not
        candidate_layers(fixed_size)
    assert fixed_size.training and all(module.training for module in fixed_size.modules())
    assert hook_count(fixed_size) == 0
    with pytest.raises(ValueError, match=r"shape \(1, 1, 8, 8\)"):
        last_decoder_layers(fixed_size, example_input=torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="finds no nn.ConvNd"):
        candidate_layers(nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU())))


def test_fallback_on_a_swin_unetr_under_another_name():
    class Segmenter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    network = Segmenter()
    with pytest.raises(ValueError, match=r"does not know Segmenter.*\(1, 1, 32, 32\)"):  # a 1 x 1 bottleneck
        candidate_layers(network)
    layers = candidate_layers(network, example_input=torch.zeros(1, 1, 64, 64))
    assert "net.swinViT.patch_embed" in layers and "net.encoder1.layer.conv1" in layers
    leaf_most = [name for name, module in network.named_modules()
                 if name and any(module.children()) and not any(any(c.children()) for c in module.children())]
    dropped = set(leaf_most) - set(layers)
    assert "net.swinViT.layers1.0.blocks.0.attn" in dropped  # (windows, tokens, channels)
    assert "net.swinViT.layers1.0.blocks.0.mlp" in dropped  # channels-last
    outputs, _ = outputs_in_call_order(network.eval(), torch.rand(2, 1, 64, 64), layers)
    assert list(outputs) == layers
    assert_feature_maps_on_the_grid(outputs, (2, 1, 64, 64))
