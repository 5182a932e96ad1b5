"""``monai-protoseg attach`` and :mod:`monai_protoseg.attach` on the model zoo's own configs (copied from shared/zoo):
what it detects, the overlay it writes, and how it refuses what it cannot attach to."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil

import pytest
import torch
from monai.bundle import ConfigParser
from monai.handlers import CheckpointLoader, MetricsSaver, StatsHandler

from monai_protoseg import MeanSAQualityHandler, PrototypeMapHandler, SAScoreHandler, candidate_layers
from monai_protoseg.attach import inspect_bundle, write_overlay
from monai_protoseg.cli import main, parse_overrides
from tests.zoo.zoo_bundles import ZOO_DIR, dints_arch_code

SPLEEN_LAYERS = ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule.0",
                 "model.1.submodule.1.submodule.1.submodule.0",
                 "model.1.submodule.1.submodule.1.submodule.1.submodule",
                 "model.1.submodule.1.submodule.1.submodule.2", "model.1.submodule.1.submodule.2",
                 "model.1.submodule.2", "model.2"]


@pytest.fixture
def zoo(tmp_path):
    """A writable copy of the zoo bundles' configs (shared/ is read-only)."""
    if not ZOO_DIR.is_dir():
        pytest.fail(f"the model-zoo bundles are missing at {ZOO_DIR} (shared/zoo beside the checkout)")
    for bundle in ZOO_DIR.iterdir():
        if bundle.is_dir():
            shutil.copytree(bundle / "configs", tmp_path / bundle.name / "configs")
    return tmp_path


def test_spleen_evaluation_is_detected_with_its_inverted_labels(zoo):
    attachment = inspect_bundle(zoo / "spleen_ct_segmentation")
    assert [path.name for path in attachment.configs] == ["train.json", "evaluate.json"]
    assert (attachment.evaluator_id, attachment.handlers_id) == ("validate#evaluator", "validate#handlers")
    assert attachment.network_type == "UNet" and attachment.layers == SPLEEN_LAYERS
    assert attachment.quality_layers == ["model.1.submodule.1.submodule.2", "model.1.submodule.2"]
    assert attachment.activation == "softmax" and "Activationsd(keys='pred', softmax=True)" in attachment.activation_reason
    assert attachment.class_names == ["spleen"] and attachment.include_background is False
    assert attachment.with_labels and attachment.label_resampling == ["Invertd(keys=('pred', 'label'))"]
    # the summary names each layer as the handlers' outputs do, its qualified name beside it
    lines = attachment.summary().splitlines()
    assert lines[2] == ("network: UNet; SA layers (9): encoder.1 (model.0), encoder.2 (model.1.submodule.0), "
                        "encoder.3 (model.1.submodule.1.submodule.0), encoder.4 "
                        "(model.1.submodule.1.submodule.1.submodule.0), bottleneck "
                        "(model.1.submodule.1.submodule.1.submodule.1.submodule), decoder.3 "
                        "(model.1.submodule.1.submodule.1.submodule.2), decoder.2 (model.1.submodule.1.submodule.2), "
                        "decoder.1 (model.1.submodule.2), output (model.2)")
    assert lines[3] == "quality layers: decoder.2 (model.1.submodule.1.submodule.2), decoder.1 (model.1.submodule.2)"


def test_sigmoid_multi_label_bundle_scores_every_channel(zoo):
    attachment = inspect_bundle(zoo / "brats_mri_segmentation")
    assert attachment.network_type == "SegResNet" and attachment.activation == "sigmoid"
    assert attachment.include_background is True
    assert attachment.class_names == ["Tumor core", "Whole tumor", "Enhancing tumor"]
    assert attachment.label_resampling == []


def test_2d_bundle_and_inference_config(zoo):
    endoscopic = inspect_bundle(zoo / "endoscopic_tool_segmentation")
    assert endoscopic.network_type == "FlexibleUNet" and endoscopic.activation == "softmax"
    assert "AsDiscreted(keys='pred', argmax=True)" in endoscopic.activation_reason
    assert endoscopic.class_names == ["tools"] and endoscopic.with_labels
    prostate = inspect_bundle(zoo / "prostate_mri_anatomy")
    assert [path.name for path in prostate.configs] == ["inference.json"]
    assert (prostate.evaluator_id, prostate.handlers_id, prostate.with_labels) == ("evaluator", "handlers", False)
    assert prostate.class_names == ["central gland", "peripheral zone"]
    overlay = prostate.overlay()
    assert [handler["_target_"] for handler in overlay["+handlers"]] == [
        "monai_protoseg.PrototypeMapHandler", "monai_protoseg.MeanSAQualityHandler"]
    quality = overlay["+handlers"][1]
    assert quality["filename"] == "quality.csv" and "fit_estimator" not in quality


def test_a_training_config_attaches_to_its_validation_evaluator(zoo):
    attachment = inspect_bundle(zoo / "spleen_ct_segmentation", ["configs/train.json"])
    assert attachment.evaluator_id == "validate#evaluator" and attachment.with_labels
    assert attachment.label_resampling == []  # train.json's validation does not invert


def test_yaml_bundle_with_overrides(zoo, tmp_path):
    """multi_organ_segmentation: YAML configs, and a DiNTS whose architecture file is loaded to cuda: the override
    that a CPU machine needs is set before the network is built and passed on to the run line."""
    root = zoo / "multi_organ_segmentation"
    (root / "models").mkdir()
    torch.save(dints_arch_code(), root / "models" / "search_code_18590.pt")  # the zoo suite's small topology
    override = "$torch.load(@arch_ckpt_path, map_location='cpu', weights_only=False)"
    overrides = {"arch_ckpt": override, "dints_space#device": "$torch.device('cpu')"}
    attachment = inspect_bundle(root, overrides=overrides)
    assert [path.name for path in attachment.configs] == ["train.yaml", "evaluate.yaml"]
    assert attachment.network_type == "DiNTS" and attachment.activation == "softmax"
    assert attachment.class_names[0] == "artery" and len(attachment.class_names) == 7
    parser = ConfigParser()
    parser.read_config([str(path) for path in attachment.configs])
    parser.update({**overrides, "bundle_root": str(root)})
    assert attachment.layers == candidate_layers(parser.get_parsed_content("network_def"))
    words = shlex.split(attachment.command(tmp_path / "overlay.json"))  # what the shell passes on
    assert words[words.index("--arch_ckpt") + 1] == override


def test_the_overlay_appends_to_the_bundles_own_handlers(zoo):
    root = zoo / "spleen_ct_segmentation"
    attachment = inspect_bundle(root)
    overlay = write_overlay(attachment, root / "configs" / "protoseg_evaluate.json")
    parser = ConfigParser()
    parser.read_config([str(path) for path in [*attachment.configs, overlay]])
    parser["bundle_root"] = str(root)
    handlers = parser.get_parsed_content("validate#handlers")
    assert [type(handler) for handler in handlers] == [CheckpointLoader, StatsHandler, MetricsSaver, SAScoreHandler,
                                                       PrototypeMapHandler, MeanSAQualityHandler]
    sa, maps, quality = handlers[3:]
    assert sa.layers == maps.layers == SPLEEN_LAYERS and sa.activation == "softmax"
    assert sa.class_names == ["spleen"] and sa.output_dir == root / "eval" / "protoseg"
    assert quality.fit_estimator and quality.csv_path == root / "eval" / "protoseg" / "quality_validation.csv"
    assert quality.estimator_path == root / "models" / "protoseg_quality_estimator.json"
    assert "$import monai_protoseg" in parser.get("imports")


def test_an_overlay_changed_by_hand_is_kept_unless_forced(zoo, capsys):
    root = zoo / "spleen_ct_segmentation"
    assert main(["attach", str(root)]) == 0
    out = capsys.readouterr().out
    overlay = root / "configs" / "protoseg_evaluate.json"
    assert f"wrote {overlay}" in out
    assert ("python -m monai.bundle run --config_file \"['" + str(root / "configs" / "train.json") + "','") in out
    assert main(["attach", str(root)]) == 0  # the same overlay again: nothing to keep
    edited = json.loads(overlay.read_text())
    edited["protoseg"]["unit_wise"] = True
    overlay.write_text(json.dumps(edited))
    digest = hashlib.sha256(overlay.read_bytes()).hexdigest()
    assert main(["attach", str(root)]) == 1
    assert "exists and differs from the overlay attach writes" in capsys.readouterr().err
    assert hashlib.sha256(overlay.read_bytes()).hexdigest() == digest
    assert main(["attach", str(root), "--force"]) == 0
    assert json.loads(overlay.read_text())["protoseg"]["unit_wise"] is False


@pytest.mark.parametrize("arguments, message", [
    (["attach", "/no/such/bundle"], "no bundle folder /no/such/bundle"),
    (["attach", "{root}", "--config", "configs/nope.json"], "no config file"),
    (["attach", "{root}", "--config", "configs/metadata.json"], "runs no MONAI evaluator"),
    (["attach", "{root}", "--network-id", "nothing"], "has no 'nothing'"),
    (["attach", "{root}", "--", "--network_def#channels"], "config values go in pairs --ID VALUE"),
])
def test_what_cannot_be_attached_is_one_line(zoo, capsys, arguments, message):
    root = zoo / "spleen_ct_segmentation"
    assert main([word.format(root=root) for word in arguments]) == 1
    err = capsys.readouterr().err
    assert err.startswith("monai-protoseg: error: ") and message in err and err.count("\n") == 1
    assert not (root / "configs" / "protoseg_evaluate.json").exists()


def test_overrides_are_read_as_monai_bundle_run_reads_them():
    assert parse_overrides(["--a#b", "2", "--c", "[1, 2]", "--d", "$torch.device('cpu')", "--e", "True"]) == {
        "a#b": 2, "c": [1, 2], "d": "$torch.device('cpu')", "e": True}


def test_candidate_layers_of_the_built_network(zoo):
    """The layers written are those of the network the bundle builds (channels from the config, not guessed)."""
    parser = ConfigParser()
    parser.read_config(str(zoo / "brats_mri_segmentation" / "configs" / "train.json"))
    network = parser.get_parsed_content("network_def")
    assert inspect_bundle(zoo / "brats_mri_segmentation").layers == candidate_layers(network)
    assert isinstance(network, torch.nn.Module)
