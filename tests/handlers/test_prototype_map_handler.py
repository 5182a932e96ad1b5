"""PrototypeMapHandler on a bare ignite Engine and inside MONAI's evaluator (simple and sliding-window inference),
with .npz snapshots and TensorBoard images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import UNet
from monai.utils import set_determinism

import monai_protoseg.handlers.prototype_maps as prototype_maps_module
from monai_protoseg import FeatureRecorder, ProtoSegInferer, prototype_map
from monai_protoseg.handlers import PrototypeMapHandler
from monai_protoseg.maps import read_snapshot
from tests.handlers.test_sa_score_handler import LAYERS, bare_engine, hook_count, make_batches, make_network


def test_2d_maps_equal_prototype_map_on_recorded_features_and_only_num_cases_are_written(tmp_path):
    network, batches = make_network(), make_batches(count=3, batch=2, size=32)
    weights = {key: value.clone() for key, value in network.state_dict().items()}
    engine = bare_engine(network)
    handler = PrototypeMapHandler(LAYERS, network=network, num_cases=3, output_dir=tmp_path)
    handler.attach(engine)
    engine.run(batches)
    assert hook_count(network) == 0
    assert all(torch.equal(weights[key], value) for key, value in network.state_dict().items())
    files = sorted(path.name for path in (tmp_path / "prototype_maps").iterdir())
    assert files == ["case0000_class0.npz", "case0001_class0.npz", "case0002_class0.npz"]
    assert (tmp_path / "layer_names.csv").read_text().splitlines()[1:] == [
        "encoder.1,model.0", "decoder.1,model.1.submodule.2", "output,model.2"]
    images = torch.cat([batch["image"] for batch in batches[:2]])[:3]
    labels = torch.cat([batch["label"] for batch in batches[:2]])[:3]
    with torch.no_grad(), FeatureRecorder(network, LAYERS) as recorder:  # independent: one forward pass of 3 cases
        prob = torch.sigmoid(network(images))
    expected = {layer: prototype_map(recorder[layer], prob) for layer in LAYERS}
    for n in range(3):
        snapshot = read_snapshot(tmp_path / "prototype_maps" / files[n])
        assert snapshot.case == f"case{n:04d}" and snapshot.slice_index is None
        assert snapshot.layers == ("encoder.1", "decoder.1", "output")  # the layers' aliases
        np.testing.assert_array_equal(snapshot.image, images[n].numpy())
        np.testing.assert_array_equal(snapshot.label, labels[n, 0].numpy() > 0.5)
        np.testing.assert_allclose(snapshot.prob, prob[n, 0].numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(snapshot.maps, torch.stack([expected[l][n, 0] for l in LAYERS]).numpy(),
                                   atol=1e-5, rtol=0)
        assert snapshot.reference == "label" and not np.isnan(snapshot.sa).any()


def test_later_batches_cost_nothing_and_each_epoch_starts_again(monkeypatch):
    calls = []

    def counting_prototype_map(features, prob):
        calls.append(features.shape[0])
        return prototype_map(features, prob)

    monkeypatch.setattr(prototype_maps_module, "prototype_map", counting_prototype_map)
    network = make_network()
    engine = bare_engine(network)
    handler = PrototypeMapHandler(LAYERS, network=network, num_cases=3)
    handler.attach(engine)
    iterations = []  # the calls made by the end of each iteration
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: iterations.append(len(calls)))
    engine.run(make_batches(count=4, batch=2), max_epochs=2)
    # each epoch: two cases of the first batch, one of the second, nothing afterwards
    assert calls == [2] * len(LAYERS) + [1] * len(LAYERS) + [2] * len(LAYERS) + [1] * len(LAYERS)
    assert iterations == [3, 6, 6, 6, 9, 12, 12, 12]
    assert [snapshot.case for snapshot in handler.snapshots] == ["case0000", "case0001", "case0002"]


def test_3d_sliding_window_uses_whole_volume_features_and_the_most_foreground_slice(tmp_path):
    set_determinism(seed=0)
    network = UNet(3, 1, 1, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    gen = torch.Generator().manual_seed(0)
    label = torch.zeros(2, 1, 16, 16, 16)
    label[0, :, 3:9, 4:12, 2:5] = 1
    label[0, :, 2:12, 2:14, 10] = 1  # the largest slice of case 0
    label[1, :, 6:14, 5:13, 7:13] = 1
    image = label + 0.2 * torch.randn(label.shape, generator=gen)
    data = [{"image": image, "label": label}]
    window = SlidingWindowInferer(roi_size=(16, 16, 8), sw_batch_size=2)
    handler = PrototypeMapHandler(LAYERS, output_dir=tmp_path)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data, network=network,
                                    inferer=window, val_handlers=[handler])
    evaluator.run()
    assert evaluator.inferer is window and hook_count(network) == 0
    reference = ProtoSegInferer(SlidingWindowInferer(roi_size=(16, 16, 8), sw_batch_size=2), LAYERS)
    network.eval()
    with torch.no_grad():
        prob = torch.sigmoid(reference(image, network))  # independent: features rebuilt from the same windows
    expected_slices = label[:, 0].sum(dim=(1, 2)).argmax(1).tolist()  # (B, D) foreground per slice
    assert expected_slices == [10, 7]
    for n, snapshot in enumerate(handler.snapshots):
        assert snapshot.slice_index == expected_slices[n] and snapshot.spatial_shape == (16, 16, 16)
        z = expected_slices[n]
        want = torch.stack([prototype_map(reference.features[l], prob)[n, 0, ..., z] for l in LAYERS])
        np.testing.assert_allclose(snapshot.maps, want.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(snapshot.label, label[n, 0, ..., z].numpy() > 0.5)
        read = read_snapshot(tmp_path / "prototype_maps" / f"case{n:04d}_class0.npz")
        assert read.slice_index == z and np.array_equal(read.maps, snapshot.maps, equal_nan=True)


def test_tensorboard_images_per_case_and_class_at_the_trainer_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    network = make_network()
    batches = make_batches(count=2, batch=2, size=32)
    named = [{"image": MetaTensor(b["image"], meta={"filename_or_obj": [f"/data/img_{i}{j}.nii.gz" for j in range(2)]}),
              "label": b["label"]} for i, b in enumerate(batches)]
    writer = SummaryWriter(log_dir=str(tmp_path))
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=named, network=network,
                                    val_handlers=[PrototypeMapHandler(LAYERS, summary_writer=writer)])
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=2, train_data_loader=batches, network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1), loss_function=torch.nn.BCEWithLogitsLoss(),
        train_handlers=[ValidationHandler(interval=1, validator=evaluator, epoch_level=True)],
    )
    trainer.run()
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["images"]) == {"prototype_maps/img_00/class0", "prototype_maps/img_01/class0"}
    images = events.Images("prototype_maps/img_00/class0")
    assert [image.step for image in images] == [1, 2]
    panels = 3 + len(LAYERS)
    assert (images[0].height, images[0].width) == (32, 32 * panels + 2 * (panels - 1))
    assert hook_count(network) == 0


def test_inference_without_labels_softmax_classes(tmp_path):
    network = make_network(out_channels=3)
    engine = Engine(lambda e, batch: {"pred": network(batch["image"])})
    handler = PrototypeMapHandler(LAYERS, network=network, activation="softmax", class_names=["left", "right"],
                                  num_cases=2, output_dir=tmp_path, name="maps")
    handler.attach(engine)
    batches = [{"image": batch["image"]} for batch in make_batches(count=2, classes=3)]  # inference: no label
    with torch.no_grad():
        engine.run(batches)
    assert [(s.case, s.class_name) for s in handler.snapshots] == [
        ("case0000", "left"), ("case0000", "right"), ("case0001", "left"), ("case0001", "right")]
    assert len(list((tmp_path / "maps").iterdir())) == 4
    snapshot = read_snapshot(tmp_path / "maps" / "case0001_right.npz")
    assert snapshot.label is None and snapshot.reference == "prediction"
    with torch.no_grad(), FeatureRecorder(network, LAYERS) as recorder:
        prob = torch.softmax(network(batches[0]["image"]), 1)
    own = prob.argmax(1) == 2  # the argmax prediction of class "right" is the SA reference
    for i, layer in enumerate(LAYERS):
        soft = prototype_map(recorder[layer], prob[:, 2:3])[1, 0]
        np.testing.assert_allclose(snapshot.maps[i], soft.numpy(), atol=1e-5, rtol=0)
        dice = 2 * ((soft > 0.5) & own[1]).sum() / ((soft > 0.5).sum() + own[1].sum())
        assert snapshot.sa[i] == pytest.approx(dice.item(), abs=1e-6)
    assert hook_count(network) == 0


def test_a_slice_index_for_2d_cases_is_named():
    network = make_network()
    engine = bare_engine(network)
    PrototypeMapHandler(LAYERS, network=network, slice_index=3).attach(engine)
    with pytest.raises(ValueError, match="slice_index is for 3D cases"):
        engine.run(make_batches(count=1))
    assert hook_count(network) == 0


def test_hooks_removed_when_the_engine_raises_and_the_error_propagates():
    network = make_network()
    engine = bare_engine(network)
    handler = PrototypeMapHandler(LAYERS, network=network)
    handler.attach(engine)
    handler.attach(engine)
    assert len(engine._event_handlers[Events.ITERATION_COMPLETED]) == 1

    def fail(engine: Engine) -> None:
        if engine.state.iteration == 2:
            raise RuntimeError("boom")

    engine.add_event_handler(Events.ITERATION_COMPLETED, fail)
    with pytest.raises(RuntimeError, match="boom"):
        engine.run(make_batches())
    assert hook_count(network) == 0


def test_bad_arguments_and_batches_are_named():
    with pytest.raises(ValueError, match="num_cases must be at least 1"):
        PrototypeMapHandler(LAYERS, num_cases=0)
    with pytest.raises(ValueError, match="activation must be"):
        PrototypeMapHandler(LAYERS, activation="relu")
    network = make_network()
    engine = bare_engine(network)
    PrototypeMapHandler(LAYERS, network=network, image_key="img").attach(engine)
    with pytest.raises(KeyError, match="image_key 'img' is not in the batch"):
        engine.run(make_batches(count=1))
    assert hook_count(network) == 0
