"""COIN: the generator, each loss term against its formula, a training step that leaves the classifier alone,
resuming from a checkpoint, and the counterfactual mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.networks.nets import Discriminator
from torch import nn
from torch.utils.data import DataLoader

import pytest

from monai_protoseg.weak import CoinGenerator, CoinLoss, CoinTrainer, counterfactual_mask, latest_checkpoint
from monai_protoseg.weak.coin import total_variation

SIZE = 32


def networks(seed: int = 0) -> tuple[CoinGenerator, nn.Module, nn.Module]:
    torch.manual_seed(seed)
    generator = CoinGenerator(2, features=(4, 4, 8, 8, 16, 4))
    discriminator = Discriminator((1, SIZE, SIZE), (4, 8), (2, 2), num_res_units=0, dropout=0.0, last_act=None)
    classifier = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                               nn.Flatten(), nn.Linear(4, 2))
    return generator, discriminator, classifier


def loader(cases: int = 8, batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    data = [{"image": torch.rand(1, SIZE, SIZE, generator=generator), "label": torch.tensor(i % 2)}
            for i in range(cases)]
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def trainer_for(generator, discriminator, classifier, epochs: int = 1, **kwargs) -> CoinTrainer:
    g_optimizer = torch.optim.Adam(generator.parameters(), 1e-3)
    d_optimizer = torch.optim.Adam(discriminator.parameters(), 1e-3)
    return CoinTrainer("cpu", epochs, loader(), generator, discriminator, classifier, g_optimizer, d_optimizer,
                       **kwargs)


def test_the_untrained_generator_is_the_identity_and_the_condition_matters():
    generator, _, _ = networks()
    images = torch.rand(2, 1, SIZE, SIZE)
    torch.testing.assert_close(generator(images, torch.tensor([0, 1])), images)
    nn.init.normal_(generator.head.weight)
    assert not torch.allclose(generator(images, torch.tensor([0, 0])), generator(images, torch.tensor([1, 1])))


@pytest.mark.parametrize("target, message", [(torch.tensor([0]), "1 entries for a batch of 2"),
                                             (torch.tensor([0, 2]), "target_class must be in")])
def test_bad_target_classes_are_named(target, message):
    generator, _, _ = networks()
    with pytest.raises(ValueError, match=message):
        generator(torch.rand(2, 1, SIZE, SIZE), target)


def test_loss_weights_are_checked():
    with pytest.raises(ValueError, match="cycle loss must be a non-negative number"):
        CoinLoss(cycle=-1.0)
    assert CoinLoss(adversarial=2).weights() == {"adversarial": 2.0, "classifier": 1.0, "reconstruction": 10.0,
                                                 "cycle": 10.0, "total_variation": 10.0}


def test_total_variation_against_loops():
    images = torch.rand(2, 1, 5, 4)
    expected = sum(abs(float(images[b, 0, i + 1, j] - images[b, 0, i, j])) for b in range(2) for i in range(4)
                   for j in range(4)) / (2 * 4 * 4)
    expected += sum(abs(float(images[b, 0, i, j + 1] - images[b, 0, i, j])) for b in range(2) for i in range(5)
                    for j in range(3)) / (2 * 5 * 3)
    assert float(total_variation(images)) == pytest.approx(expected, rel=1e-6)


def test_each_generator_loss_is_its_formula():
    generator, discriminator, classifier = networks()
    nn.init.normal_(generator.head.weight, std=0.1)
    trainer = trainer_for(generator, discriminator, classifier)
    discriminator.eval()  # no dropout: the same logits in both computations
    images, labels = torch.rand(4, 1, SIZE, SIZE), torch.tensor([0, 1, 1, 0])
    counterfactuals = generator(images, torch.zeros(4, dtype=torch.long))
    terms = trainer.generator_losses(images, labels, counterfactuals)
    fake = discriminator(counterfactuals)
    classifier.eval()
    expected = {
        "adversarial": F.binary_cross_entropy(torch.sigmoid(fake), torch.ones_like(fake)),
        "classifier": -torch.log_softmax(classifier(counterfactuals), 1)[:, 0].mean(),
        "reconstruction": (counterfactuals - images).abs().mean(),
        "cycle": (generator(counterfactuals, labels) - images).abs().mean(),
        "total_variation": total_variation(counterfactuals - images),
    }
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert all(value > 0 for value in terms.values())


def test_a_zero_weight_switches_its_term_off():
    generator, discriminator, classifier = networks()
    trainer = trainer_for(generator, discriminator, classifier, loss_weights={"cycle": 0.0, "adversarial": 0.0})
    terms = trainer.generator_losses(torch.rand(2, 1, SIZE, SIZE), torch.tensor([0, 1]),
                                     generator(torch.rand(2, 1, SIZE, SIZE), torch.tensor([0, 0])))
    assert float(terms["cycle"]) == 0.0 and float(terms["adversarial"]) == 0.0


def test_training_updates_generator_and_discriminator_and_leaves_the_classifier_as_it_was():
    generator, discriminator, classifier = networks()
    classifier.train()
    before = {name: value.clone() for name, value in classifier.state_dict().items()}
    g_before = [p.clone() for p in generator.parameters()]
    d_before = [p.clone() for p in discriminator.parameters()]
    trainer = trainer_for(generator, discriminator, classifier, epochs=2)
    trainer.run()
    for name, value in classifier.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)  # BatchNorm statistics included
    assert classifier.training and all(p.requires_grad and p.grad is None for p in classifier.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(g_before, generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d_before, discriminator.parameters()))
    metrics = trainer.state.metrics
    assert set(metrics) == {f"{name}_loss" for name in ("adversarial", "classifier", "reconstruction", "cycle",
                                                        "total_variation", "generator", "discriminator")}
    weights = CoinLoss().weights()
    weighted = sum(weights[name] * metrics[f"{name}_loss"] for name in weights)
    assert metrics["generator_loss"] == pytest.approx(weighted, rel=1e-5)  # the epoch means of a weighted sum


def test_a_batch_without_labels_is_named():
    generator, discriminator, classifier = networks()
    trainer = CoinTrainer("cpu", 1, DataLoader([{"image": torch.rand(1, SIZE, SIZE)}] * 2, batch_size=2), generator,
                          discriminator, classifier, torch.optim.Adam(generator.parameters()),
                          torch.optim.Adam(discriminator.parameters()))
    with pytest.raises(ValueError, match="dict with 'image' and 'label'"):
        trainer.run()


def state_of(trainer: CoinTrainer) -> dict:
    return {"trainer": trainer, "generator": trainer.generator, "discriminator": trainer.discriminator,
            "g_optimizer": trainer.g_optimizer, "d_optimizer": trainer.d_optimizer}


def test_resuming_from_a_checkpoint_continues_where_training_stopped(tmp_path):
    straight = trainer_for(*networks(), epochs=3)
    torch.manual_seed(5)
    straight.run()

    first = trainer_for(*networks(), epochs=2)
    CheckpointSaver(str(tmp_path), state_of(first), save_interval=1, n_saved=1).attach(first)
    torch.manual_seed(5)
    first.run()
    path = latest_checkpoint(tmp_path)
    assert path is not None and path.endswith("checkpoint_epoch=2.pt")

    generator, discriminator, _ = networks(seed=9)  # other initial weights: they must come from the checkpoint
    resumed = trainer_for(generator, discriminator, networks()[2], epochs=3)  # the same frozen classifier
    CheckpointLoader(path, state_of(resumed)).attach(resumed)
    resumed.run()
    assert resumed.state.epoch == 3 and resumed.state.iteration == 6
    for name in ("generator", "discriminator"):
        for expected, actual in zip(getattr(straight, name).parameters(), getattr(resumed, name).parameters()):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_latest_checkpoint_takes_the_highest_epoch(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for name in ("checkpoint_epoch=2.pt", "checkpoint_epoch=10.pt", "checkpoint_key_metric=0.9.pt", "other.pt"):
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_epoch=10.pt")


def test_counterfactual_mask_keeps_the_changed_region_and_drops_speckle():
    images = torch.zeros(2, 1, 20, 20)
    counterfactuals = images.clone()
    counterfactuals[0, 0, 4:10, 5:12] = -0.5  # the inpainted lesion
    counterfactuals[0, 0, 1, 18] = 0.9  # one noisy pixel: removed by the opening
    counterfactuals[0, 0, 14:18, 14:18] = 0.9  # a smaller separate change: not the largest component
    mask = counterfactual_mask(images, counterfactuals, threshold=0.1)
    expected = torch.zeros_like(mask)
    expected[0, 0, 4:10, 5:12] = True
    assert torch.equal(mask, expected)  # the second case changed nowhere: empty
    with pytest.raises(ValueError, match="the same shape"):
        counterfactual_mask(images, counterfactuals[:1])
