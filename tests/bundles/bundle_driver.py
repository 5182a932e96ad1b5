"""Run one dataset bundle's workflows in a fresh process, as `python -m monai.bundle run` would, and record each stage.

Used by ``test_dataset_bundles.py``: ``python tests/bundles/bundle_driver.py PLAN.json``. The plan names the bundle
folder, the stages to run in order and the overrides of each (``train``, ``evaluate``, ``inference``); every stage's
outcome (``"ok"`` or the traceback) is written to the plan's ``status`` file, so that the tests can report each stage
separately. A stage runs only if the ones it needs succeeded.

Stages:
- ``train``, ``evaluate``, ``inference``: ``monai.bundle.run`` with the stage's configs and overrides, which is what the
  command line calls after parsing ``--key value`` pairs.
- ``properties``: ``ConfigWorkflow(...).check_properties()`` is empty for the train and inference workflows.
- ``multi_gpu``: ``multi_gpu_train.json`` and ``multi_gpu_evaluate.json`` merged as documented, resolved in a
  one-process ``gloo`` group (nothing is launched): DDP network, distributed samplers, and the handlers each rank keeps
  (rank 0 all, other ranks only those that gather across ranks), then the group is destroyed by the config's
  ``finalize``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from pathlib import Path


def _configs(bundle: Path, names: list[str]) -> list[str]:
    return [str(bundle / "configs" / name) for name in names]


def _workflow(bundle: Path, names: list[str], workflow_type: str, overrides: dict):
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(config_file=_configs(bundle, names), workflow_type=workflow_type, **overrides)


def _check_properties(bundle: Path, plan: dict) -> None:
    for names, workflow_type, stage in ((["train.json"], "train", "train"), (["inference.json"], "infer", "inference")):
        workflow = _workflow(bundle, names, workflow_type, plan["stages"][stage])
        workflow.initialize()
        missing = workflow.check_properties()
        if missing:
            raise AssertionError(f"{names} ({workflow_type}): missing or wrongly referenced properties {missing}")


def _multi_gpu(bundle: Path, plan: dict) -> None:
    import torch.distributed as dist
    from monai.data import DistributedSampler
    from monai.handlers import CheckpointLoader, CheckpointSaver, MetricsSaver, StatsHandler, TensorBoardStatsHandler
    from torch.nn.parallel import DistributedDataParallel

    from monai_protoseg import MeanSAQualityHandler, SAScoreHandler

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    gathering = (MetricsSaver, SAScoreHandler, MeanSAQualityHandler)
    rank_zero_only = (StatsHandler, TensorBoardStatsHandler, CheckpointSaver)
    real_get_rank, real_get_world_size = dist.get_rank, dist.get_world_size
    cases = (
        (["train.json", "multi_gpu_train.json"], "train", "train"),
        (["train.json", "evaluate.json", "multi_gpu_evaluate.json"], "train", "evaluate"),
    )
    for names, workflow_type, stage in cases:
        for rank in (0, 1):
            if rank:  # how rank 1 of 2 builds its engines, in the same one-process group
                dist.get_rank, dist.get_world_size = (lambda *args, **kwargs: 1), (lambda *args, **kwargs: 2)
            workflow = None
            try:
                workflow = _workflow(bundle, names, workflow_type, plan["stages"][stage])
                workflow.initialize()  # init_process_group (gloo without CUDA), then the engines are built
                if not dist.is_initialized() or dist.get_backend() != "gloo":
                    raise AssertionError(f"{names}: expected a gloo process group without CUDA")
                parser = workflow.parser
                if not isinstance(parser.get_parsed_content("network"), DistributedDataParallel):
                    raise AssertionError(f"{names}: the network is not wrapped in DistributedDataParallel")
                evaluator = parser.get_parsed_content("validate#evaluator")
                if not isinstance(evaluator.data_loader.sampler, DistributedSampler):
                    raise AssertionError(f"{names}: the validation loader has no DistributedSampler")
                handlers = parser.get_parsed_content("validate#evaluator#val_handlers") or []
                kinds = {type(handler) for handler in handlers}
                if not all(kind in kinds for kind in gathering):
                    raise AssertionError(f"{names} rank {rank}: every rank needs {gathering}, got {kinds}")
                if stage == "train":
                    trainer = parser.get_parsed_content("train#trainer")
                    if not isinstance(trainer.data_loader.sampler, DistributedSampler):
                        raise AssertionError(f"{names}: the training loader has no DistributedSampler")
                    train_kinds = {type(h) for h in parser.get_parsed_content("train#trainer#train_handlers")}
                    savers = [kind for kind in rank_zero_only if kind in kinds | train_kinds]
                    expected = list(rank_zero_only) if rank == 0 else []
                    if savers != expected:
                        raise AssertionError(f"{names} rank {rank}: savers/stats {savers}, expected {expected}")
                else:
                    if CheckpointLoader not in kinds:
                        raise AssertionError(f"{names} rank {rank}: every rank must load the checkpoint")
                    if (StatsHandler in kinds) != (rank == 0):
                        raise AssertionError(f"{names} rank {rank}: StatsHandler must run on rank 0 only")
            finally:
                dist.get_rank, dist.get_world_size = real_get_rank, real_get_world_size
                if workflow is not None:
                    workflow.finalize()  # destroy_process_group
            if dist.is_initialized():
                raise AssertionError(f"{names}: finalize did not destroy the process group")


def main(plan_file: str) -> int:
    plan = json.loads(Path(plan_file).read_text())
    bundle = Path(plan["bundle"])
    status: dict[str, str] = {}
    requires = {"evaluate": "train", "inference": "train"}

    def write_status() -> None:
        Path(plan["status"]).write_text(json.dumps(status, indent=2))

    from monai.bundle import run

    for stage in plan["order"]:
        if requires.get(stage) and status.get(requires[stage]) != "ok":
            status[stage] = f"skipped: needs {requires[stage]}"
            continue
        print(f"=== {stage} ===", flush=True)
        try:
            if stage == "properties":
                _check_properties(bundle, plan)
            elif stage == "multi_gpu":
                _multi_gpu(bundle, plan)
            else:
                configs = {"train": ["train.json"], "evaluate": ["train.json", "evaluate.json"],
                           "inference": ["inference.json"]}[stage]
                run(config_file=_configs(bundle, configs), **plan["stages"][stage])
            status[stage] = "ok"
        except Exception:  # recorded for the test to report; the later stages still run
            status[stage] = traceback.format_exc()
            print(status[stage], file=sys.stderr, flush=True)
        write_status()
    write_status()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
