"""Every bundle's ``metadata.json`` validates against the schema kept in ``bundles/schema`` (MONAI's own
``verify_metadata``, offline: the schema file is local, so nothing is downloaded), and a metadata file that breaks the
specification is rejected, naming the problem."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import pytest
from monai.bundle import verify_metadata, verify_net_in_out

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "bundles" / "schema" / "metadata_schema.json"
SCHEMA_MD5 = hashlib.md5(SCHEMA.read_bytes()).hexdigest()
BUNDLES = sorted(path.parents[1].name for path in (ROOT / "bundles").glob("*/configs/metadata.json"))


def test_every_bundle_is_found():
    assert {"protoseg_demo", "brats_mri_protoseg", "isic_skin_protoseg", "covid_ct_protoseg", "prostate_mri_protoseg",
            "pancreas_ct_protoseg"} <= set(BUNDLES)


@pytest.mark.parametrize("name", BUNDLES)
def test_metadata_validates_against_the_schema(name, tmp_path):
    schema = shutil.copy(SCHEMA, tmp_path / "schema.json")  # verify_metadata may only read it: no download
    verify_metadata(meta_file=str(ROOT / "bundles" / name / "configs" / "metadata.json"), filepath=str(schema), hash_val=SCHEMA_MD5)


@pytest.mark.parametrize(
    "break_it, problem",
    [
        (lambda meta: meta.pop("network_data_format"), "network_data_format"),
        (lambda meta: meta["network_data_format"]["inputs"]["image"].pop("num_channels"), "num_channels"),
        (lambda meta: meta["network_data_format"]["outputs"]["pred"].update(is_patch_data="false"), "boolean"),
        (lambda meta: meta.update(version="one"), "'one' does not match"),
        (lambda meta: meta["network_data_format"]["inputs"]["image"].update(spatial_shape=[]), "should be non-empty"),
    ],
)
def test_metadata_that_breaks_the_specification_is_rejected(break_it, problem, tmp_path):
    metadata = json.loads((ROOT / "bundles" / "protoseg_demo" / "configs" / "metadata.json").read_text())
    break_it(metadata)
    meta_file = tmp_path / "metadata.json"
    meta_file.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=problem):
        verify_metadata(meta_file=str(meta_file), filepath=str(shutil.copy(SCHEMA, tmp_path / "schema.json")),
                        hash_val=SCHEMA_MD5)


def test_demo_network_matches_metadata():
    """MONAI's ``verify_net_in_out`` on the demo bundle (the dataset bundles are checked in test_dataset_bundles)."""
    configs = ROOT / "bundles" / "protoseg_demo" / "configs"
    verify_net_in_out(net_id="network_def", meta_file=str(configs / "metadata.json"),
                      config_file=str(configs / "train.json"), device="cpu", n=2, any=1)
