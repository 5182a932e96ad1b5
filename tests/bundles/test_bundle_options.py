"""Bundle options given on the command line: `python -m monai.bundle run ... --unit_wise false` hands the config the
string 'false' (fire parses only Python literals), which is truthy; the configs parse boolean options with
``monai.utils.str2bool``."""

from __future__ import annotations

import pathlib

import pytest
from monai.bundle import ConfigParser

from monai_protoseg import SAScoreHandler

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("bundle", ["protoseg_demo", "mni152_tissue_protoseg"])
@pytest.mark.parametrize("option, expected", [("false", False), ("False", False), ("true", True), (True, True)])
def test_boolean_options_given_on_the_command_line_as_text(bundle, option, expected, tmp_path):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "train.json"))
    parser["output_dir"] = str(tmp_path)  # the handlers open a TensorBoard writer there
    parser["unit_wise"] = option
    handlers = parser.get_parsed_content("validate#handlers")
    sa_handlers = [handler for handler in handlers if isinstance(handler, SAScoreHandler)]
    assert len(sa_handlers) == 1 and sa_handlers[0].unit_wise is expected


@pytest.mark.parametrize("option, expected", [("false", False), ("True", True), (False, False)])
def test_coin_bundle_flags_are_parsed(option, expected, tmp_path):
    parser = ConfigParser()
    configs = ROOT / "bundles" / "coin_weak_protoseg" / "configs"
    parser.read_config([str(configs / "train.json"), str(configs / "evaluate.json")])
    parser["output_dir"] = str(tmp_path)
    for flag, parsed in (("resume", "resuming"), ("progress_bar", "showing_progress"),
                         ("faithfulness", "checking_faithfulness")):
        parser[flag] = option
        assert parser.get_parsed_content(parsed) is expected, flag
