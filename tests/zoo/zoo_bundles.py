"""Five MONAI model-zoo bundles as a conformance target: configs to merge, overrides, tiny fake data in their layout.

The bundles (``shared/zoo``, see its README.md) are copied as they are to a temporary folder. A copy gets random
weights fixed by a seed in ``models/model.pt`` (where the bundle's own ``CheckpointLoader`` reads them, so it stays
enabled) and fake data in the exact on-disk layout its config reads: folder and file names, formats, datalist files.
Every 3D volume has an anisotropic voxel spacing and a non-RAS, axis-permuted affine, so that the configs'
``Orientationd``, ``Spacingd`` and ``Invertd`` all change the grid; every class has a blob and the image is brighter
(or of another colour) inside it.

``prepare_bundle(entry, workdir)`` does all that and returns a :class:`PreparedBundle`; ``running.run_bundle_eval``
runs it; ``reference.reference_sa`` recomputes SA and Dice independently.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import nibabel as nib
import numpy as np
import torch
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[2]
# shared/ lies beside the checkout (on a developer's machine and in CI alike); MONAI_PROTOSEG_ZOO overrides it
ZOO_DIR = pathlib.Path(os.environ.get("MONAI_PROTOSEG_ZOO", ROOT.parent / "shared" / "zoo"))
CPU = "$torch.device('cpu')"


# ------------------------------------------------------------------------------------------------ the entries


@dataclass(frozen=True)
class ZooBundle:
    """One zoo bundle: the configs to merge, the overrides that make it tiny and CPU-only, and its fake data.

    ``overrides`` hold Python values, as ``ConfigParser.update`` takes them; ``cli_args`` turns them into
    ``--key value`` pairs that ``python -m monai.bundle run`` parses back to the same values. ``dataset_dir`` (the
    fake data folder) and ``bundle_root`` are added by :func:`prepare_bundle`.
    """

    name: str
    configs: tuple[str, ...]  # merged in this order, relative to configs/
    overrides: dict[str, Any]
    write_data: Callable[[pathlib.Path, pathlib.Path, int, int], None]  # (data_dir, bundle_root, n_cases, seed)
    preprocessing_id: str  # the evaluation (or inference) preprocessing Compose
    inferer_id: str
    dataset_id: str  # its data list is ``<dataset_id>#data``
    evaluator_id: str  # the engine the run expression runs, and its handler list (where an overlay appends)
    handlers_id: str
    activation: str  # "softmax" or "sigmoid", as the bundle's postprocessing applies it
    label_kind: str  # "index" (label == k), "channels" (channel k), or "file" (resampled, inference-only bundles)
    foreground: tuple[int, ...]  # class indices (softmax) or channels (sigmoid) that have a Dice
    class_names: dict[int, str]
    layers: tuple[str, ...]  # two decoder layers for the reference, as ``network.get_submodule`` names
    dataset_dir_suffix: str = ""  # prostate's config concatenates ``@dataset_dir + 'test.csv'``
    spatial_dims: int = 3
    label_column: str = ""  # inference-only bundles: where the label of an image is found (see write_prostate)

    def cli_args(self, overrides: dict[str, Any] | None = None) -> list[str]:
        """``--key value`` pairs of ``overrides`` (default: this entry's) for ``python -m monai.bundle run``.

        A string goes as it is (an expression ``$...``, a path), anything else as its ``repr``, which the command
        line (python-fire) parses back to the same value; a string that reads as a number, bool or list would not
        stay a string.
        """
        args = []
        for key, value in (self.overrides if overrides is None else overrides).items():
            args += [f"--{key}", value if isinstance(value, str) else repr(value)]
        return args


@dataclass(frozen=True)
class PreparedBundle:
    """A copied bundle with seeded weights and fake data: everything a runner or the reference needs."""

    entry: ZooBundle
    root: pathlib.Path  # the copy: --bundle_root
    data_dir: pathlib.Path
    config_files: tuple[pathlib.Path, ...]
    overrides: dict[str, Any]  # the entry's, plus dataset_dir and bundle_root
    seed: int
    n_cases: int

    def cli_args(self) -> list[str]:
        """The overrides as ``--key value`` pairs."""
        return self.entry.cli_args(self.overrides)


# --------------------------------------------------------------------------------------------- fake-data helpers


def oriented_affine(spacing: tuple[float, ...], axes: tuple[int, ...], signs: tuple[int, ...],
                    shape: tuple[int, ...]) -> np.ndarray:
    """Affine whose voxel axis ``j`` runs along world (RAS) axis ``axes[j]`` with sign ``signs[j]`` and step
    ``spacing[j]`` mm, centred on the world origin (so that blobs can be placed in mm around 0)."""
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for j, (axis, sign, step) in enumerate(zip(axes, signs, spacing)):
        affine[axis, j] = sign * step
    centre = (np.asarray(shape, dtype=float) - 1) / 2
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def world_grid(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World coordinates (mm) of every voxel centre: ``(3, *shape)``."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape(3, *shape)


def ellipsoid(world: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipsoid (world mm)."""
    shape = (-1,) + (1,) * (world.ndim - 1)
    return (((world - np.reshape(centre, shape)) / np.reshape(radii, shape)) ** 2).sum(0) <= 1.0


def save_nifti(path: pathlib.Path, array: np.ndarray, affine: np.ndarray) -> None:
    """``array`` with ``affine`` as NIfTI (the folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def label_volume(world: np.ndarray, blobs: list[tuple[int, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Class-index volume (uint8): each ``(class, centre, radii)`` ellipsoid painted in order."""
    label = np.zeros(world.shape[1:], dtype=np.uint8)
    for k, centre, radii in blobs:
        label[ellipsoid(world, centre, radii)] = k
    return label


# ------------------------------------------------------------------------------------------------ the writers
# Grids: ``oriented_affine`` spacings and shapes are chosen so that the config's Orientationd + Spacingd give the
# shape in each docstring exactly (MONAI: out = round((n - 1) * in_step / out_step + 1) per axis), which is the
# (overridden) roi_size of the bundle's SlidingWindowInferer: one window covers the whole preprocessed volume.


def write_spleen(data_dir: pathlib.Path, bundle_root: pathlib.Path, n_cases: int, seed: int) -> None:
    """Task09_Spleen (Medical Segmentation Decathlon): ``imagesTr/spleen_N.nii.gz``, ``labelsTr/spleen_N.nii.gz``
    (label 1 spleen), and ``dataset.json``. The config evaluates the last 9 sorted files, i.e. all of them here.

    File grid (29, 89, 21) voxels of 2.5 x 0.8 x 3.1 mm, axes P, L, S (axis-permuted LPS); after Orientationd(RAS)
    and Spacingd(1.5, 1.5, 2.0): (48, 48, 32).
    """
    shape, spacing = (29, 89, 21), (2.5, 0.8, 3.1)
    affine = oriented_affine(spacing, axes=(1, 0, 2), signs=(-1, -1, 1), shape=shape)
    world = world_grid(shape, affine)
    training = []
    for i in range(n_cases):
        rng = np.random.default_rng(seed * 1000 + i)
        centre = rng.uniform(-8, 8, 3)
        radii = rng.uniform(11, 17, 3)
        label = label_volume(world, [(1, centre, radii)])
        body = ellipsoid(world, np.zeros(3), np.array([34.0, 34.0, 60.0]))
        image = np.where(body, 40.0, -900.0) + 80.0 * label + rng.normal(0, 15, shape)
        name = f"spleen_{i + 1}.nii.gz"
        save_nifti(data_dir / "imagesTr" / name, image.astype(np.float32), affine)
        save_nifti(data_dir / "labelsTr" / name, label, affine)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (data_dir / "imagesTs").mkdir(exist_ok=True)
    (data_dir / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
        "numTraining": n_cases, "numTest": 0, "training": training, "test": []}, indent=4))


def write_brats(data_dir: pathlib.Path, bundle_root: pathlib.Path, n_cases: int, seed: int) -> None:
    """BraTS 2018 training layout: ``training/HGG/Brats18_FAKE_N_1/Brats18_FAKE_N_1_{t1ce,t1,t2,flair,seg}.nii.gz``
    (seg: 1 necrotic core, 2 oedema, 4 enhancing), and ``configs/datalist.json`` in the bundle copy as
    ``scripts/prepare_datalist.py`` writes it (image = [t1ce, t1, t2, flair]): one training case, ``n_cases``
    validation cases, one testing case; paths relative to ``dataset_dir``.

    Grid (48, 48, 32) voxels of 1.2 x 1.0 x 1.5 mm, axes L, P, S; the config has no spatial transform, so the
    network grid is the file grid (the roi_size is overridden to it).
    """
    shape, spacing = (48, 48, 32), (1.2, 1.0, 1.5)
    affine = oriented_affine(spacing, axes=(0, 1, 2), signs=(-1, -1, 1), shape=shape)
    world = world_grid(shape, affine)
    cases = []
    for i in range(n_cases + 2):
        rng = np.random.default_rng(seed * 1000 + i)
        centre = rng.uniform(-6, 6, 3)
        radii = rng.uniform(10, 14, 3)
        label = label_volume(world, [(2, centre, radii), (4, centre, 0.65 * radii), (1, centre, 0.35 * radii)])
        brain = ellipsoid(world, np.zeros(3), np.array([27.0, 23.0, 23.0]))
        case = f"Brats18_FAKE_{i + 1:03d}_1"
        folder = pathlib.Path("training") / "HGG" / case
        # contrasts (t1ce, t1, t2, flair) of background, necrosis, oedema, enhancing tumour
        contrast = {"t1ce": (300, 150, 280, 900), "t1": (400, 200, 330, 350),
                    "t2": (500, 1200, 900, 700), "flair": (300, 500, 900, 600)}
        images = []
        for sequence, (tissue, necrosis, oedema, enhancing) in contrast.items():
            values = np.select([label == 1, label == 2, label == 4], [necrosis, oedema, enhancing], tissue)
            volume = np.where(brain, values + rng.normal(0, 40, shape), 0.0).clip(0)
            save_nifti(data_dir / folder / f"{case}_{sequence}.nii.gz", volume.astype(np.float32), affine)
            images.append(str(folder / f"{case}_{sequence}.nii.gz"))
        save_nifti(data_dir / folder / f"{case}_seg.nii.gz", label, affine)
        cases.append({"label": str(folder / f"{case}_seg.nii.gz"), "image": images})
    datalist = {"training": cases[:1], "validation": cases[1:-1], "testing": cases[-1:]}
    (bundle_root / "configs" / "datalist.json").write_text(json.dumps(datalist, indent=4))


def _blocky(mask: np.ndarray, block: int = 8) -> np.ndarray:
    """``mask`` at 1/``block`` resolution blown up to constant ``block`` x ``block`` tiles: a JPEG of it decodes to
    exactly 0 and 255 (each 8 x 8 DCT block is constant, grayscale has no chroma subsampling)."""
    return np.kron(mask.astype(np.uint8), np.ones((block, block), dtype=np.uint8)).astype(bool)


def write_endoscopic(data_dir: pathlib.Path, bundle_root: pathlib.Path, n_cases: int, seed: int) -> None:
    """The bundle's documented layout: ``val/<video>/<frame>.jpg`` (RGB) beside ``<frame>_seg.jpg`` (grayscale
    0/255, 255 = tool). Frame names must not end in s, e or g (the config globs ``*[!seg].jpg``) and are unique
    across videos (they name the cases).

    Frames are 120 x 88 (width x height); the config's Resized takes them to the network size (256 x 160 here):
    an anisotropic scaling that Invertd undoes.
    """
    width, height = 120, 88
    for i in range(n_cases):
        rng = np.random.default_rng(seed * 1000 + i)
        # a tool: a thick bar entering from the bottom edge, on the 8 x 8 block grid (15 x 11 blocks)
        cols, rows = np.meshgrid(np.arange(width // 8), np.arange(height // 8))
        x0, slope = rng.uniform(3, 11), rng.uniform(-0.8, 0.8)
        tip = rng.integers(2, 5)
        tool = (np.abs(cols - (x0 + slope * (rows - 10))) <= 1.6) & (rows >= tip)
        mask = _blocky(tool)  # (height, width)
        tissue = np.stack([150 + 30 * rng.random((height, width)), 60 + 20 * rng.random((height, width)),
                           50 + 20 * rng.random((height, width))], -1)
        metal = np.stack([185 + 25 * rng.random((height, width))] * 3, -1)
        rgb = np.where(mask[..., None], metal, tissue).clip(0, 255).astype(np.uint8)
        video = f"video_{i % 2 + 1:02d}"
        frame = data_dir / "val" / video / f"{video}_frame_{i + 1:04d}"
        frame.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb, "RGB").save(f"{frame}.jpg", quality=95)
        Image.fromarray((mask * 255).astype(np.uint8), "L").save(f"{frame}_seg.jpg", quality=100)


def dints_arch_code(num_blocks: int = 12, num_depths: int = 4) -> dict[str, np.ndarray]:
    """A valid searched-topology file for DiNTS (``models/search_code_18590.pt``): every node active; each block
    keeps its 4 resolutions, even blocks also go down, odd blocks also go up; cell operations rotate over
    skip / 3x3x3 / 3x3x1 / 3x1x3 / 1x3x3. ``node_a`` is indexed ``[block][depth]`` as DiNTS.forward reads it."""
    paths = 3 * num_depths - 2  # arch_code2ops = [0, 1, -1, 0, 1, -1, ...][:paths]: keep, up, down
    ops = ([-1, 0, 1] * num_depths)[1:-1]
    arch_code_a = np.zeros((num_blocks, paths), dtype=np.float32)
    arch_code_c = np.zeros((num_blocks, paths), dtype=np.int64)
    for b in range(num_blocks):
        for p in range(paths):
            arch_code_a[b, p] = ops[p] == 0 or (ops[p] == -1) == (b % 2 == 0)
            arch_code_c[b, p] = (b + p) % 5
    node_a = np.ones((num_blocks + 1, num_depths), dtype=np.float32)
    return {"arch_code_a": arch_code_a, "arch_code_c": arch_code_c, "node_a": node_a}


ORGANS = {1: "artery", 2: "portal vein", 3: "liver", 4: "spleen", 5: "stomach", 6: "gallbladder", 7: "pancreas"}


def write_multi_organ(data_dir: pathlib.Path, bundle_root: pathlib.Path, n_cases: int, seed: int) -> None:
    """``<case>/<case>-data.nii.gz`` and ``<case>/<case>-label.nii.gz`` (0 background, 1-7 organs) for the first
    ``n_cases`` validation cases and the first training case named by the bundle's own ``configs/dataset_0.json``,
    which is rewritten in the copy with just those entries (same names, same format); plus the searched-topology
    file ``models/search_code_18590.pt`` (see :func:`dints_arch_code`).

    File grid (14, 62, 29) voxels of 3.0 x 0.9 x 1.75 mm, axes I, L, A; after Orientationd(RAS) and
    Spacingd(1, 1, 1): (56, 50, 40), which the config's SpatialPadd (overridden to 64) pads to (64, 64, 64).
    """
    datalist = json.loads((bundle_root / "configs" / "dataset_0.json").read_text())
    chosen = {"training": datalist["training"][:1], "validation": datalist["validation"][:n_cases]}
    shape, spacing = (14, 62, 29), (3.0, 0.9, 1.75)
    affine = oriented_affine(spacing, axes=(2, 0, 1), signs=(-1, -1, 1), shape=shape)
    world = world_grid(shape, affine)
    # organ centres (x, y, z mm) and radii in a 55 x 49 x 39 mm field of view
    layout = {3: ((-12, 0, 4), (12, 12, 10)), 4: ((16, 8, 4), (7, 6, 8)), 5: ((10, -10, 8), (8, 7, 7)),
              6: ((-8, -12, -4), (4, 4, 4)), 7: ((4, 4, -10), (12, 4, 4)), 2: ((-2, 2, -2), (3, 3, 8)),
              1: ((2, 14, 0), (3, 3, 16))}
    intensity = {0: 0.0, 1: 250.0, 2: 180.0, 3: 110.0, 4: 130.0, 5: 40.0, 6: 10.0, 7: 90.0}
    for i, item in enumerate(chosen["training"] + chosen["validation"]):
        rng = np.random.default_rng(seed * 1000 + i)
        shift = rng.uniform(-3, 3, 3)
        blobs = [(k, np.add(c, shift), np.multiply(r, rng.uniform(0.85, 1.15, 3))) for k, (c, r) in layout.items()]
        label = label_volume(world, blobs)
        body = ellipsoid(world, np.zeros(3), np.array([28.0, 25.0, 40.0]))
        image = np.where(body, np.vectorize(intensity.get)(label), -900.0) + rng.normal(0, 20, shape)
        save_nifti(data_dir / item["image"], image.astype(np.float32), affine)
        save_nifti(data_dir / item["label"], label, affine)
    (bundle_root / "configs" / "dataset_0.json").write_text(json.dumps(chosen, indent=4))
    (bundle_root / "models").mkdir(exist_ok=True)
    torch.save(dints_arch_code(), bundle_root / "models" / "search_code_18590.pt")


def write_prostate(data_dir: pathlib.Path, bundle_root: pathlib.Path, n_cases: int, seed: int) -> None:
    """Prostate158 test layout: ``test.csv`` (columns ID, t2, t2_anatomy_reader1; paths relative to
    ``dataset_dir``) and ``test/<ID>/<ID>_t2.nii.gz`` with ``..._t2_anatomy_reader1.nii.gz`` (1 transition zone /
    central gland, 2 peripheral zone). Prostate158 itself names every image ``t2.nii.gz``; here the names are unique,
    because the case name is the file name (and the bundle's SaveImaged would overwrite ``t2/t2_trans.nii.gz``).

    File grid (46, 71, 8) voxels of 0.7 x 0.45 x 2.2 mm, axes L, P, S (LPS); after Orientationd(RAS) and
    Spacingd(0.5, 0.5, 0.5): (64, 64, 32).
    """
    shape, spacing = (46, 71, 8), (0.7, 0.45, 2.2)
    affine = oriented_affine(spacing, axes=(0, 1, 2), signs=(-1, -1, 1), shape=shape)
    world = world_grid(shape, affine)
    rows = []
    for i in range(n_cases):
        rng = np.random.default_rng(seed * 1000 + i)
        centre = rng.uniform(-2, 2, 3) * np.array([1, 1, 0.5])
        radii = rng.uniform(9, 12, 3) * np.array([1, 1, 0.6])
        # the peripheral zone: a posterior shell of the gland; the transition zone inside it
        gland = ellipsoid(world, centre, radii)
        label = np.where(gland & (world[1] < centre[1] - 1), 2, 0).astype(np.uint8)
        label[ellipsoid(world, centre + [0, 2, 0], 0.6 * radii)] = 1
        image = np.select([label == 1, label == 2], [500.0, 900.0], 250.0) + rng.normal(0, 40, shape)
        case = f"{i + 20:03d}"
        t2, anatomy = f"test/{case}/{case}_t2.nii.gz", f"test/{case}/{case}_t2_anatomy_reader1.nii.gz"
        save_nifti(data_dir / t2, image.clip(0).astype(np.float32), affine)
        save_nifti(data_dir / anatomy, label, affine)
        rows.append({"ID": case, "t2": t2, "t2_anatomy_reader1": anatomy})
    with open(data_dir / "test.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------------------------------- registry

_EVAL = {"device": CPU, "validate#dataloader#num_workers": 0}

BUNDLES: dict[str, ZooBundle] = {
    "spleen_ct_segmentation": ZooBundle(
        name="spleen_ct_segmentation",
        configs=("train.json", "evaluate.json"),
        overrides={**_EVAL, "validate#inferer#roi_size": [48, 48, 32]},
        write_data=write_spleen,
        preprocessing_id="validate#preprocessing", inferer_id="validate#inferer", dataset_id="validate#dataset",
        evaluator_id="validate#evaluator", handlers_id="validate#handlers",
        activation="softmax", label_kind="index", foreground=(1,), class_names={1: "spleen"},
        layers=("model.1.submodule.1.submodule.2", "model.1.submodule.2"),
    ),
    "brats_mri_segmentation": ZooBundle(
        name="brats_mri_segmentation",
        configs=("train.json", "evaluate.json"),
        overrides={**_EVAL, "validate#inferer#roi_size": [48, 48, 32]},
        write_data=write_brats,
        preprocessing_id="validate#preprocessing", inferer_id="validate#inferer", dataset_id="validate#dataset",
        evaluator_id="validate#evaluator", handlers_id="validate#handlers",
        activation="sigmoid", label_kind="channels", foreground=(0, 1, 2), class_names={0: "tc", 1: "wt", 2: "et"},
        layers=("up_layers.1", "up_layers.2"),
    ),
    "endoscopic_tool_segmentation": ZooBundle(
        name="endoscopic_tool_segmentation",
        configs=("train.json", "evaluate.json"),
        overrides={**_EVAL, "train#deterministic_transforms#3#spatial_size": [256, 160]},
        write_data=write_endoscopic,
        preprocessing_id="validate#preprocessing", inferer_id="validate#inferer", dataset_id="validate#dataset",
        evaluator_id="validate#evaluator", handlers_id="validate#handlers",
        activation="softmax", label_kind="index", foreground=(1,), class_names={1: "tool"},
        layers=("decoder.blocks.3", "decoder.blocks.4"), spatial_dims=2,
    ),
    "multi_organ_segmentation": ZooBundle(
        name="multi_organ_segmentation",
        configs=("train.yaml", "evaluate.yaml"),
        overrides={
            **_EVAL,
            "arch_ckpt": "$torch.load(@arch_ckpt_path, map_location='cpu', weights_only=False)",
            "dints_space#device": CPU,
            "dints_space#channel_mul": 0.25,
            "train#deterministic_transforms#11#spatial_size": [64, 64, 64],
            "validate#inferer#roi_size": [64, 64, 64],
        },
        write_data=write_multi_organ,
        preprocessing_id="validate#preprocessing", inferer_id="validate#inferer", dataset_id="validate#dataset",
        evaluator_id="validate#evaluator", handlers_id="validate#handlers",
        activation="softmax", label_kind="index", foreground=tuple(ORGANS), class_names=ORGANS,
        # forward order stem_up.3 ... stem_up.0; DiNTS calls stem_up.N.forward() itself: hooks fire on .mod only
        layers=("stem_up.1.mod", "stem_up.0.mod"),
    ),
    "prostate_mri_anatomy": ZooBundle(
        name="prostate_mri_anatomy",
        configs=("inference.json",),
        overrides={"device": CPU, "dataloader#num_workers": 0, "inferer#roi_size": [64, 64, 32]},
        write_data=write_prostate,
        preprocessing_id="preprocessing", inferer_id="inferer", dataset_id="dataset",
        evaluator_id="evaluator", handlers_id="handlers",
        activation="softmax", label_kind="file", foreground=(1, 2),
        class_names={1: "transition zone", 2: "peripheral zone"},
        layers=("model.1.submodule.1.submodule.2", "model.1.submodule.2"),
        dataset_dir_suffix="/", label_column="t2_anatomy_reader1",
    ),
}


# ---------------------------------------------------------------------------------------------------- prepare


def build_network(config_files: tuple[pathlib.Path, ...], overrides: dict[str, Any]) -> torch.nn.Module:
    """A fresh instance of the bundle's ``network_def``, parsed from its own configs with ``overrides``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    parser.update(overrides)
    return parser.get_parsed_content("network_def", instantiate=True, lazy=False)


def seeded_network(prepared: PreparedBundle) -> torch.nn.Module:
    """The network the seeded ``models/model.pt`` holds (rebuilt from the config and loaded), in eval mode."""
    network = build_network(prepared.config_files, prepared.overrides)
    network.load_state_dict(torch.load(prepared.root / "models" / "model.pt", map_location="cpu"))
    return network.eval()


def prepare_bundle(entry: ZooBundle, workdir: pathlib.Path, n_cases: int = 4, seed: int = 0) -> PreparedBundle:
    """Copy ``entry``'s bundle to ``workdir/<name>``, write its fake data to ``workdir/data_<name>`` and seeded
    random weights (``torch.manual_seed(seed)`` then the config's ``network_def``) to ``models/model.pt``."""
    root, data_dir = workdir / entry.name, workdir / f"data_{entry.name}"
    shutil.copytree(ZOO_DIR / entry.name, root)
    (root / "models").mkdir(exist_ok=True)
    data_dir.mkdir(parents=True)
    entry.write_data(data_dir, root, n_cases, seed)
    config_files = tuple(root / "configs" / name for name in entry.configs)
    overrides = {**entry.overrides, "bundle_root": str(root), "dataset_dir": f"{data_dir}{entry.dataset_dir_suffix}"}
    torch.manual_seed(seed)
    network = build_network(config_files, overrides)
    torch.save(network.state_dict(), root / "models" / "model.pt")
    return PreparedBundle(entry, root, data_dir, config_files, overrides, seed, n_cases)
