"""Bad bundle options and bad dataset files stop a run at its start, with one line naming the option or the file.

Options are checked first in every bundle's ``initialize`` (``monai_protoseg.checks.check_bundle_options``), before
anything is trained or written; data lists are checked when they are built (``pair_files``, ``check_datalist``), and
``CheckedLoadImaged`` counts each file's channels. ``monai-protoseg run`` and ``demo`` print the traceback, then the
cause alone on the last line (``error_summary``). The datasets are written in their public on-disk layouts by the
writers of ``tests/bundles/test_dataset_bundles.py``; options are checked in process (``ConfigWorkflow.initialize``),
and two runs go through the command line as a user types it.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import DataLoader, Dataset
from PIL import Image

from monai_protoseg.checks import CheckedLoadImaged, check_bundle_options, check_datalist, pair_files
from monai_protoseg.cli import error_summary
from monai_protoseg.synthetic import write_dataset
from ..bundles.test_dataset_bundles import ENV, make_brats, make_covid, make_isic, make_pancreas, make_prostate

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUNDLES = ROOT / "bundles"
ISIC_INPUT, ISIC_TRUTH = "ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"
NO_DEVICE = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: no machine has it
DATASET_BUNDLES = ["isic_skin_protoseg", "brats_mri_protoseg", "covid_ct_protoseg", "prostate_mri_protoseg",
                   "pancreas_ct_protoseg"]


def digests(folder: pathlib.Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def earlier_outputs(output_dir: pathlib.Path) -> dict[str, str]:
    """Write what an earlier run left in ``output_dir``; their digests."""
    for name, content in (("models/model.pt", b"\x80weights"), ("sa_layers.csv", b"case,class,layer\na,b,0.5\n"),
                          ("report/report.md", b"# earlier run\n")):
        (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (output_dir / name).write_bytes(content)
    return digests(output_dir)


def parser_of(bundle: str, *files: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / file) for file in files])
    parser.update(overrides)
    return parser


def loader_id(parser: ConfigParser) -> str:
    """The config id of the first ``CheckedLoadImaged`` of a config."""
    def find(node, path):
        if isinstance(node, dict) and node.get("_target_") == "monai_protoseg.CheckedLoadImaged":
            return path
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        return next((found for key, child in children if (found := find(child, [*path, str(key)]))), None)

    return "#".join(find(parser.get(), []))


# ----------------------------------------------------------------------------------------------- bundle options

TOO_SMALL = "the network ({}) does not run on inputs of spatial size {}, too small or not a multiple it can take ("
OPTION_CASES = [
    ("protoseg_demo", "train.json", {"epochs": 0}, "bad option --epochs 0: must be an integer >= 1."),
    ("protoseg_demo", "train.json", {"epochs": -1}, "bad option --epochs -1: must be an integer >= 1."),
    ("protoseg_demo", "train.json", {"validation_cases": 0},
     "bad option --validation_cases 0: must be an integer >= 3."),
    ("protoseg_demo", "train.json", {"image_size": 5},
     "bad option --image_size 5: must be an integer >= 16, or a list of 2 of them."),
    ("protoseg_demo", "train.json", {"image_size": 20},
     f"bad option --image_size 20: {TOO_SMALL.format('UNet', [20, 20])}|the next larger size it takes is [24, 24]."),
    ("protoseg_demo", "train.json", {"device": NO_DEVICE},
     f"bad option --device {NO_DEVICE}: this machine cannot use it (|); available: cpu"),
    ("protoseg_demo", "train.json", {"output_dir": "{tmp}/a_file/out"},
     "bad option --output_dir {tmp}/a_file/out: cannot create or write to this folder ([Errno 20] Not a directory"),
    ("protoseg_demo", "inference.json", {"dataset_dir": "{tmp}/missing"},
     "bad option --dataset_dir {tmp}/missing: does not exist: give the folder of the dataset."),
    ("mni152_tissue_protoseg", "train.json", {"image_size": 20},
     f"bad option --image_size 20: {TOO_SMALL.format('UNet', [20, 20])}"),
    ("coin_weak_protoseg", "train.json", {"coin_epochs": 0}, "bad option --coin_epochs 0: must be an integer >= 1."),
    ("coin_weak_protoseg", "train.json", {"image_size": 16},
     "bad option --image_size 16: must be an integer >= 32, or a list of 2 of them."),
    ("isic_skin_protoseg", "train.json", {"epochs": 0}, "bad option --epochs 0: must be an integer >= 1."),
    ("isic_skin_protoseg", "train.json", {"image_size": [70, 60]},
     f"bad option --image_size [70, 60]: {TOO_SMALL.format('FlexibleUNet', [70, 60])}|the next larger size it "
     f"takes is [96, 64]."),
    ("isic_skin_protoseg", "inference.json", {"image_size": [64]},
     "bad option --image_size [64]: must be an integer >= 1, or a list of 2 of them."),
    ("isic_skin_protoseg", "inference.json", {"device": NO_DEVICE}, f"bad option --device {NO_DEVICE}: "),
    ("brats_mri_protoseg", "train.json", {"patch_size": [20, 20, 20]},
     f"bad option --patch_size [20, 20, 20]: {TOO_SMALL.format('SegResNet', [20, 20, 20])}"),
    ("covid_ct_protoseg", "train.json", {"val_fraction": 1.0},
     "bad option --val_fraction 1.0: must be a number between 0 and 1 (both excluded)."),
    ("prostate_mri_protoseg", "inference.json", {"roi_size": [20, 20, 20]},
     f"bad option --roi_size [20, 20, 20]: {TOO_SMALL.format('UNet', [20, 20, 20])}"),
    ("pancreas_ct_protoseg", "train.json", {"val_interval": 0},
     "bad option --val_interval 0: must be an integer >= 1."),
    ("pancreas_ct_protoseg", "inference.json", {"dataset_dir": "{tmp}/missing"},
     "bad option --dataset_dir {tmp}/missing: does not exist"),
]


@pytest.mark.parametrize("bundle, config, option, expected", OPTION_CASES,
                         ids=[f"{case[0]}-{case[1]}-{next(iter(case[2]))}" for case in OPTION_CASES])
def test_a_bad_option_stops_the_run_before_it_writes_anything(bundle, config, option, expected, tmp_path):
    """``initialize`` refuses the option in one line naming it, its value and what is allowed; the outputs of an
    earlier run stay byte for byte, and nothing else is written."""
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "data").mkdir()
    before = earlier_outputs(tmp_path / "out")
    option = {key: value.format(tmp=tmp_path) if isinstance(value, str) else value for key, value in option.items()}
    overrides = {"bundle_root": str(tmp_path / "root"), "output_dir": str(tmp_path / "out"), "device": "cpu",
                 **({"dataset_dir": str(tmp_path / "data")} if bundle in DATASET_BUNDLES else {}), **option}
    workflow = ConfigWorkflow(config_file=str(BUNDLES / bundle / "configs" / config), logging_file=False,
                              workflow_type=None, **overrides)
    with pytest.raises(RuntimeError) as error:
        workflow.initialize()
    line = error_summary(error.value)
    assert line.startswith("ValueError: ")
    for part in expected.format(tmp=tmp_path).split("|"):
        assert part in line, line
    assert "\n" not in line
    assert digests(tmp_path / "out") == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file", "data", "out"]


@pytest.mark.parametrize("bundle, configs", [
    ("protoseg_demo", ["train.json"]), ("protoseg_demo", ["inference.json"]),
    ("mni152_tissue_protoseg", ["train.json"]), ("coin_weak_protoseg", ["train.json", "evaluate.json"]),
    *((name, ["train.json"]) for name in DATASET_BUNDLES), ("isic_skin_protoseg", ["inference.json"]),
    ("covid_ct_protoseg", ["inference.json"]),
])
def test_the_default_options_pass(bundle, configs, tmp_path):
    """The shipped values pass the checks (the full-size network takes the shipped image, patch and window sizes)."""
    parser = parser_of(bundle, *configs, output_dir=str(tmp_path / "out"), dataset_dir=str(tmp_path), device="cpu")
    assert parser.get_parsed_content("check_options") is None
    assert (tmp_path / "out").is_dir() and not list((tmp_path / "out").iterdir())


def test_every_workflow_checks_its_options_first():
    """The check runs first in ``initialize`` of every config and config combination that has one, after only the
    seeding (so that the network it sizes is the seeded one) and the process group."""
    for bundle in sorted(path.parent.parent.name for path in BUNDLES.glob("*/configs/train.json")):
        configs = BUNDLES / bundle / "configs"
        for names in (["train.json"], ["inference.json"], ["train.json", "evaluate.json"],
                      ["train.json", "multi_gpu_train.json"],
                      ["train.json", "evaluate.json", "multi_gpu_evaluate.json"]):
            if all((configs / name).is_file() for name in names):
                parser = parser_of(bundle, *names)
                steps = parser["initialize"]
                assert "$@check_options" in steps, (bundle, names)
                before = steps[:steps.index("$@check_options")]
                allowed = ("set_determinism", "import torch.distributed", "init_process_group", "set_device")
                assert all(any(word in step for word in allowed) for step in before), (bundle, names, before)
                assert parser["check_options"].startswith("$monai_protoseg.checks.check_bundle_options("), bundle


def test_check_bundle_options_directly(tmp_path):
    network = torch.nn.Conv2d(1, 1, 3, stride=2)
    check_bundle_options(counts={"epochs": 1}, sizes={"size": [3, 3]}, network=network, device=torch.device("cpu"),
                         output_dir=tmp_path / "new" / "folder")
    assert (tmp_path / "new" / "folder").is_dir()
    with pytest.raises(ValueError, match=r"^bad option --epochs True: must be an integer >= 1\.$"):
        check_bundle_options(counts={"epochs": True})
    with pytest.raises(ValueError, match=r"^bad option --size 2: must be a list of integers >= 1\.$"):
        check_bundle_options(sizes={"size": 2})  # no spatial_dims: a list is needed
    with pytest.raises(ValueError, match=r"--size \[2, 2\]: the network \(Conv2d\) does not run .* \[4, 4\]\.$"):
        check_bundle_options(sizes={"size": [2, 2]}, network=network)
    with pytest.raises(ValueError, match=r"^bad option --dataset_dir .*a_file: is a file, not a folder"):
        (tmp_path / "a_file").write_text("")
        check_bundle_options(dataset_dir=tmp_path / "a_file")


# ------------------------------------------------------------------------------------ the command line, end to end


def test_demo_prints_the_cause_last_and_keeps_earlier_outputs(tmp_path):
    """``monai-protoseg demo --epochs 0``: status 1, the traceback, then the cause alone on the last line."""
    output_dir = tmp_path / "out"
    before = earlier_outputs(output_dir)
    result = subprocess.run([sys.executable, "-m", "monai_protoseg", "demo", "--output_dir", str(output_dir),
                             "--epochs", "0"], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.rstrip("\n").splitlines()
    assert lines[-1] == "monai-protoseg: error: ValueError: bad option --epochs 0: must be an integer >= 1."
    assert "Traceback (most recent call last):" in result.stderr
    assert digests(output_dir) == before


def test_run_names_a_mask_whose_image_was_deleted(tmp_path):
    """ISIC through ``monai-protoseg run``: the listing stops on a mask without its image, naming the mask."""
    data = make_isic(tmp_path / "data", n_train=4, n_test=0)
    (data / ISIC_INPUT / "ISIC_0000002.jpg").unlink()
    output_dir = tmp_path / "out"
    before = earlier_outputs(output_dir)
    result = subprocess.run(
        [sys.executable, "-m", "monai_protoseg", "run", "--config_file",
         str(BUNDLES / "isic_skin_protoseg" / "configs" / "train.json"), "--bundle_root", str(tmp_path / "root"),
         "--dataset_dir", str(data), "--output_dir", str(output_dir), "--image_size", "[64,64]",
         "--train#dataloader#num_workers", "0"], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.rstrip("\n").splitlines()[-1] == (
        f"monai-protoseg: error: ValueError: cannot pair images and labels by case name: 1 label(s) without a "
        f"partner ISIC_*.jpg in {data / ISIC_INPUT}: {data / ISIC_TRUTH / 'ISIC_0000002_segmentation.png'}.")
    assert digests(output_dir) == before


# -------------------------------------------------------------------------------------------- data lists, pairing


def test_pair_files_pairs_by_case_name(tmp_path):
    data = make_isic(tmp_path, n_train=3, n_test=0)
    pairs = pair_files(data / ISIC_INPUT, "ISIC_*.jpg", data / ISIC_TRUTH, "ISIC_*_segmentation.png")
    assert pairs == [{"image": str(data / ISIC_INPUT / f"ISIC_{i:07d}.jpg"),
                      "label": str(data / ISIC_TRUTH / f"ISIC_{i:07d}_segmentation.png")} for i in range(3)]


@pytest.mark.parametrize("damage", ["image deleted", "mask deleted", "both", "image empty"])
def test_isic_listing_names_files_without_a_partner(tmp_path, damage):
    """The ISIC train config's ``datalist`` (``pair_files``) on the public layout with cases damaged: case 1's
    image deleted (or emptied), case 2's mask deleted."""
    data = make_isic(tmp_path, n_train=3, n_test=0)
    image, mask = data / ISIC_INPUT / "ISIC_0000001.jpg", data / ISIC_TRUTH / "ISIC_0000002_segmentation.png"
    if damage == "image empty":
        image.write_bytes(b"")
    if damage in ("image deleted", "both"):
        image.unlink()
    if damage in ("mask deleted", "both"):
        mask.unlink()
    lonely_mask = (f"1 label(s) without a partner ISIC_*.jpg in {data / ISIC_INPUT}: "
                   f"{data / ISIC_TRUTH / 'ISIC_0000001_segmentation.png'}")
    lonely_image = (f"1 image(s) without a partner ISIC_*_segmentation.png in {data / ISIC_TRUTH}: "
                    f"{data / ISIC_INPUT / 'ISIC_0000002.jpg'}")
    expected = {
        "image deleted": f"cannot pair images and labels by case name: {lonely_mask}.",
        "mask deleted": f"cannot pair images and labels by case name: {lonely_image}.",
        "both": f"cannot pair images and labels by case name: {lonely_image}; {lonely_mask}.",
        "image empty": f"the pairs of {data / ISIC_INPUT / 'ISIC_*.jpg'} and "
                       f"{data / ISIC_TRUTH / 'ISIC_*_segmentation.png'}: 1 of its 6 files are empty (0 bytes): "
                       f"{image}.",
    }[damage]
    parser = parser_of("isic_skin_protoseg", "train.json", dataset_dir=str(data))
    with pytest.raises(RuntimeError) as error:
        parser.get_parsed_content("datalist")
    assert error_summary(error.value) == f"ValueError: {expected}"


def test_pair_files_refuses_missing_folders_and_bad_patterns(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no folder {tmp_path / 'inputs'}"):  # an empty dataset folder
        pair_files(tmp_path / "inputs", "ISIC_*.jpg", tmp_path / "truth", "ISIC_*_segmentation.png")
    (tmp_path / "a_ct.nii.gz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"^the file pattern '\*_\*\.nii\.gz' must have exactly one '\*'"):
        pair_files(tmp_path, "*_ct.nii.gz", tmp_path, "*_*.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"no file matches '\*_seg\.nii\.gz'"):  # no label at all
        pair_files(tmp_path, "*_ct.nii.gz", tmp_path, "*_seg.nii.gz")


def test_covid_listing_names_a_label_without_its_ct(tmp_path):
    train, _ = make_covid(tmp_path, n_train=3, n_test=0)
    (train / "volume-covid19-A-0001_ct.nii.gz").unlink()
    with pytest.raises(RuntimeError) as error:
        parser_of("covid_ct_protoseg", "train.json", dataset_dir=str(train)).get_parsed_content("datalist")
    assert error_summary(error.value) == (
        f"ValueError: cannot pair images and labels by case name: 1 label(s) without a partner *_ct.nii.gz in "
        f"{train}: {train / 'volume-covid19-A-0001_seg.nii.gz'}.")


@pytest.mark.parametrize("bundle, make", [("brats_mri_protoseg", make_brats), ("prostate_mri_protoseg", make_prostate),
                                          ("pancreas_ct_protoseg", make_pancreas)])
@pytest.mark.parametrize("damage", ["label missing", "image empty", "empty folder"])
def test_decathlon_listing_names_missing_and_empty_files(tmp_path, bundle, make, damage):
    if damage == "empty folder":
        data = tmp_path
    else:
        data = make(tmp_path, n_train=2, n_test=0)
        name = sorted((data / "imagesTr").iterdir())[1].name
        bad = data / ("labelsTr" if damage == "label missing" else "imagesTr") / name
        if damage == "label missing":
            bad.unlink()
        else:
            bad.write_bytes(b"")
    with pytest.raises(RuntimeError) as error:
        parser_of(bundle, "train.json", dataset_dir=str(data)).get_parsed_content("datalist")
    expected = {"label missing": f"ValueError: {data / 'dataset.json'}: 1 of its 4 files do not exist: ",
                "image empty": f"ValueError: {data / 'dataset.json'}: 1 of its 4 files are empty (0 bytes): ",
                "empty folder": f"ValueError: Data list file {data / 'dataset.json'} does not exist"}[damage]
    line = error_summary(error.value)
    assert line.startswith(expected), line
    if damage != "empty folder":
        assert line.endswith(f"{bad}."), line


@pytest.mark.parametrize("damage", ["image missing", "image empty"])
def test_demo_evaluation_listing_names_the_file(tmp_path, damage):
    """The demo's evaluate.json reads the validation cases an earlier training run wrote."""
    cases = write_dataset(tmp_path / "data" / "validation", 3, size=16)
    bad = pathlib.Path(cases[1]["image"])
    if damage == "image missing":
        bad.unlink()
    else:
        bad.write_bytes(b"")
    parser = parser_of("protoseg_demo", "train.json", "evaluate.json", output_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as error:
        parser.get_parsed_content("validate#datalist")
    what = "do not exist" if damage == "image missing" else "are empty (0 bytes)"
    assert error_summary(error.value) == (f"ValueError: {tmp_path / 'data' / 'validation' / 'dataset.json'}: 1 of its "
                                          f"6 files {what}: {bad}.")


def test_check_datalist_counts_and_lists(tmp_path):
    paths = [tmp_path / f"case_{i:02d}.nii.gz" for i in range(12)]
    with pytest.raises(ValueError, match=r"^the data list: 12 of its 12 files do not exist: .*case_09\.nii\.gz and 2 "
                                         r"more\.$"):
        check_datalist([{"image": str(path)} for path in paths])
    with pytest.raises(ValueError, match=r"^cases\.json lists no cases\.$"):
        check_datalist([], source="cases.json")
    paths[0].write_bytes(b"x")
    assert check_datalist([{"image": paths[0], "label": 1}], keys=["image"]) == [{"image": paths[0], "label": 1}]


# ---------------------------------------------------------------------------------------------------- channels


def save_jpeg(path: pathlib.Path, mode: str) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 60, 3), dtype=np.uint8))
    rgb.convert(mode).save(path)


@pytest.mark.parametrize("mode, found", [("L", "1 channel(s) (grayscale, PIL mode 'L')"),
                                         ("CMYK", "4 channel(s) (CMYK, PIL mode 'CMYK')")])
@pytest.mark.parametrize("config, pipeline", [("train.json", "validate#preprocessing"),
                                              ("inference.json", "preprocessing")])
def test_isic_names_a_photograph_that_is_not_rgb(tmp_path, mode, found, config, pipeline):
    """A grayscale or CMYK JPEG among the RGB ones: the file and its channels, not a size or collate error."""
    data = make_isic(tmp_path, n_train=1, n_test=0)
    image = data / ISIC_INPUT / "ISIC_0000000.jpg"
    save_jpeg(image, mode)
    case = {"image": str(image), "label": str(data / ISIC_TRUTH / "ISIC_0000000_segmentation.png")}
    transform = parser_of("isic_skin_protoseg", config, image_size=[64, 64]).get_parsed_content(pipeline)
    with pytest.raises(RuntimeError) as error:
        transform(case if config == "train.json" else {"image": case["image"]})
    assert error_summary(error.value) == (f"ValueError: the 'image' file {image} has {found}, but 3 (RGB) are "
                                          f"expected: convert it, or leave it out of the dataset.")


def test_a_channel_error_in_a_loader_worker_is_summarised(tmp_path):
    """A ``DataLoader`` worker's error reaches the main process as text; the summary still names the file."""
    save_jpeg(tmp_path / "gray.jpg", "L")
    loader = DataLoader(Dataset([{"image": str(tmp_path / "gray.jpg")}], CheckedLoadImaged("image", channels={
        "image": 3})), num_workers=1)
    with pytest.raises(RuntimeError) as error:
        next(iter(loader))
    assert "DataLoader worker" in str(error.value)
    assert error_summary(error.value) == (
        f"ValueError: the 'image' file {tmp_path / 'gray.jpg'} has 1 channel(s) (grayscale, PIL mode 'L'), but 3 "
        f"(RGB) are expected: convert it, or leave it out of the dataset.")


@pytest.mark.parametrize("bundle, shape, found, expected", [
    ("brats_mri_protoseg", (8, 8, 8), 1, 4),  # one modality where BraTS has four
    ("prostate_mri_protoseg", (8, 8, 8, 3), 3, 2),
    ("pancreas_ct_protoseg", (8, 8, 8, 2), 2, 1),
    ("covid_ct_protoseg", (8, 8, 8, 2), 2, 1),
])
@pytest.mark.parametrize("config", ["train.json", "inference.json"])
def test_3d_bundles_name_a_volume_with_the_wrong_channels(tmp_path, bundle, shape, found, expected, config):
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)
    parser = parser_of(bundle, config)
    loader = parser.get_parsed_content(loader_id(parser))
    with pytest.raises(ValueError) as error:
        loader({"image": str(path), "label": str(path)} if config == "train.json" else {"image": str(path)})
    assert str(error.value) == (f"the 'image' file {path} has {found} channel(s), but {expected} are expected: "
                                f"convert it, or leave it out of the dataset.")


def test_every_loader_checks_the_network_channels():
    """Every ``CheckedLoadImaged`` of every config counts the image channels the network takes, and one per label."""
    def loaders(node):
        if isinstance(node, dict):
            if node.get("_target_") == "monai_protoseg.CheckedLoadImaged":
                yield node
            node = list(node.values())
        for child in node if isinstance(node, list) else []:
            yield from loaders(child)

    for config in sorted(BUNDLES.glob("*/configs/*.json")):
        for loader in loaders(json.loads(config.read_text())):
            keys = [loader["keys"]] if isinstance(loader["keys"], str) else loader["keys"]
            expected = {key: 1 for key in keys if key != "image"}
            expected["image"] = "@generator_def#in_channels" if "coin" in config.parent.parent.name \
                else "@network_def#in_channels"
            assert loader.get("channels") == expected, config


# --------------------------------------------------------------------------------------------------- the summary


def test_error_summary_prefers_the_package_error_then_the_innermost():
    def raise_chain():
        try:
            check_datalist([])
        except ValueError as error:
            raise RuntimeError("applying transform <wrapper>") from error

    with pytest.raises(RuntimeError) as error:
        raise_chain()
    assert error_summary(error.value) == "ValueError: the data list lists no cases."
    try:
        try:
            {}["missing"]
        except KeyError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression:\n  $@x") from inner
    except RuntimeError as outer:
        assert error_summary(outer) == "KeyError: 'missing'"
    assert error_summary(EOFError()) == "EOFError"
    assert error_summary(OSError("two\nlines")) == "OSError: two lines"


def test_the_weak_dataset_reader_names_a_missing_or_empty_file_and_a_nan_image(tmp_path):
    import nibabel as nib
    import numpy as np

    from monai_protoseg.weak import read_weak_dataset, write_weak_dataset

    written = write_weak_dataset(tmp_path, 3, size=32, seed=0)
    path = written[1]["image"]
    original = nib.load(path)
    values = np.asarray(original.dataobj, dtype=np.float32).copy()
    values[4:8, 4:8] = np.nan
    nib.save(nib.Nifti1Image(values, original.affine), path)
    with pytest.raises(ValueError, match=r"case_0001.nii.gz holds NaN or infinite values"):
        read_weak_dataset(tmp_path)
    open(path, "wb").close()
    with pytest.raises(ValueError, match=r"dataset.json: 1 of its 6 files are empty \(0 bytes\): .*case_0001.nii.gz"):
        read_weak_dataset(tmp_path)
    pathlib.Path(path).unlink()
    with pytest.raises(ValueError, match=r"1 of its 6 files do not exist: .*case_0001.nii.gz"):
        read_weak_dataset(tmp_path)
