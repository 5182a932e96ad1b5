"""Attach the SA, prototype-map and quality handlers to a MONAI bundle without editing it.

:func:`inspect_bundle` reads a bundle's configs (JSON or YAML, merged as ``python -m monai.bundle run`` merges them)
and finds what the handlers need: the evaluator that runs, its handler list, the network and the layers to probe, the
activation of its postprocessing, the class names of ``metadata.json``, whether the cases have labels and whether the
postprocessing moves them off the network's grid. :meth:`Attachment.overlay` is a config that appends the handlers to
the bundle's own (``+imports``, ``+validate#handlers``), merged after the bundle's configs.
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from monai.bundle import ConfigParser
from monai.utils import CommonKeys
from torch import nn

from .handlers.postprocessing import flat_transforms, postprocessing_activation, resampling_transforms
from .io import atomic_write_text
from .layer_names import layer_aliases
from .recorder import candidate_layers, last_decoder_layers

__all__ = ["Attachment", "inspect_bundle", "write_overlay", "default_configs", "build_network", "OVERLAY_KEY"]

OVERLAY_KEY = "protoseg"
"""The overlay's own settings live under this id (``@protoseg#layers``...), so a user can change them in one place."""

_RUN_TARGET = re.compile(r"@([\w#]+)\.run\(")


@dataclass
class Attachment:
    """What :func:`inspect_bundle` found in a bundle, and the overlay that attaches the handlers to it.

    Attributes:
        bundle_root: the bundle folder.
        configs: the bundle's config files, merged in this order.
        evaluator_id: the id of the evaluator the handlers are attached to.
        handlers_id: the id of its handler list (``None``: the evaluator has none; the overlay gives it one).
        network_type: the network's class name.
        layers: the layers SA probes (:func:`~monai_protoseg.candidate_layers`).
        quality_layers: the mean-SA layers of the quality estimate (:func:`~monai_protoseg.last_decoder_layers`).
        activation: ``"softmax"``, ``"sigmoid"``, ``None`` or ``"auto"`` (the postprocessing does not tell: the
            handlers choose by the output's channel count when they run).
        activation_reason: why.
        class_names: the scored classes' names from ``metadata.json`` (``None``: not there).
        include_background: whether output channel 0 is scored (sigmoid multi-label outputs: every channel is a class).
        with_labels: whether the evaluator's cases have labels (evaluation) or not (inference).
        label_resampling: the post-transforms that move the label off the network's grid (the handlers read the label
            from the batch the network saw instead).
        output_dir: the config expression of the folder the handlers write to.
        overrides: config values given on the command line (``--id value``), passed on to the run.
    """

    bundle_root: pathlib.Path
    configs: list[pathlib.Path]
    evaluator_id: str
    handlers_id: str | None
    network_type: str
    layers: list[str]
    quality_layers: list[str]
    activation: str | None
    activation_reason: str
    class_names: list[str] | None
    include_background: bool
    with_labels: bool
    label_resampling: list[str] = field(default_factory=list)
    output_dir: str = "$@bundle_root + '/protoseg'"
    aliases: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    def overlay(self) -> dict[str, Any]:
        """The overlay config: the handlers' settings under ``protoseg``, the handlers appended to the evaluator's.

        In an evaluation (cases with labels), the quality handler fits the quality estimator and a calibration and
        saves them in the bundle's ``models`` folder; in an inference config it reads them from there.
        """
        ref = f"@{OVERLAY_KEY}#"
        common = {"activation": f"{ref}activation", "class_names": f"{ref}class_names",
                  "include_background": f"{ref}include_background"}
        sa = {"_target_": "monai_protoseg.SAScoreHandler", "layers": f"{ref}layers", **common,
              "unit_wise": f"{ref}unit_wise", "output_dir": f"{ref}output_dir"}
        maps = {"_target_": "monai_protoseg.PrototypeMapHandler", "layers": f"{ref}layers", **common,
                "num_cases": 2, "output_dir": f"{ref}output_dir"}
        quality = {"_target_": "monai_protoseg.MeanSAQualityHandler", "layers": f"{ref}quality_layers",
                   "profile_layers": f"{ref}layers", **common, "output_dir": f"{ref}output_dir",
                   "estimator": f"{ref}estimator", "calibration": f"{ref}calibration"}
        if self.with_labels:
            quality.update(filename="quality_validation.csv", fit_estimator=True, fit_calibration=True)
            handlers = [sa, maps, quality]
        else:
            quality.update(filename="quality.csv")
            handlers = [maps, quality]
        settings = {
            "output_dir": self.output_dir,
            "layers": self.layers,
            "quality_layers": self.quality_layers,
            "activation": self.activation,
            "class_names": self.class_names,
            "include_background": self.include_background,
            "unit_wise": False,
            "estimator": "$@bundle_root + '/models/protoseg_quality_estimator.json'",
            "calibration": "$@bundle_root + '/models/protoseg_quality_calibration.json'",
        }
        handlers_key = f"+{self.handlers_id}" if self.handlers_id else f"{self.evaluator_id}#val_handlers"
        return {"+imports": ["$import monai_protoseg"], OVERLAY_KEY: settings, handlers_key: handlers}

    def command(self, overlay_path: str | pathlib.Path) -> str:
        """The ``python -m monai.bundle run`` line that runs the bundle with the overlay."""
        files = ",".join(f"'{path}'" for path in [*self.configs, overlay_path])
        line = f'python -m monai.bundle run --config_file "[{files}]" --bundle_root {shlex.quote(str(self.bundle_root))}'
        metadata = self.bundle_root / "configs" / "metadata.json"
        line += f" --meta_file {shlex.quote(str(metadata))}" if metadata.is_file() else ""
        return line + "".join(f" --{key} {shlex.quote(str(value))}" for key, value in self.overrides.items())

    def _named(self, layers: list[str]) -> str:
        """``alias (qualified name)`` of each layer, as the handlers' outputs name it."""
        return ", ".join(f"{self.aliases[layer]} ({layer})" if layer in self.aliases else layer for layer in layers)

    def summary(self) -> str:
        """What was found, a line each."""
        classes = ", ".join(self.class_names) if self.class_names else "named class{channel} (no channel_def in "
        classes += "" if self.class_names else "metadata.json)"
        labels = "evaluation: the cases have labels" if self.with_labels else "inference: no labels"
        if self.label_resampling:
            labels += (f"; the postprocessing's {', '.join(self.label_resampling)} moves the label off the network's "
                       f"grid: the handlers read it from the batch the network saw")
        return "\n".join([
            f"bundle: {self.bundle_root} ({' + '.join(path.name for path in self.configs)})",
            f"evaluator: {self.evaluator_id}, handlers {self.handlers_id or '(none: the overlay adds val_handlers)'}",
            f"network: {self.network_type}; SA layers ({len(self.layers)}): {self._named(self.layers)}",
            f"quality layers: {self._named(self.quality_layers)}",
            f"activation: {self.activation} ({self.activation_reason})",
            f"classes: {classes}" + ("" if self.include_background else " (output channel 0, background, not scored)"),
            f"labels: {labels}",
        ])


def default_configs(bundle_root: pathlib.Path) -> list[pathlib.Path]:
    """The configs a bundle is evaluated with: ``train`` + ``evaluate`` (the model zoo's convention), else
    ``inference`` (``.json``, ``.yaml`` or ``.yml``)."""
    configs = bundle_root / "configs"

    def find(name: str) -> pathlib.Path | None:
        return next((configs / f"{name}{ext}" for ext in (".json", ".yaml", ".yml") if (configs / f"{name}{ext}")
                     .is_file()), None)

    evaluate, train, inference = find("evaluate"), find("train"), find("inference")
    if evaluate is not None:
        return [train, evaluate] if train is not None else [evaluate]
    if inference is not None:
        return [inference]
    raise ValueError(f"{bundle_root} has no configs/evaluate.* or configs/inference.*: name the configs with --config.")


def build_network(parser: ConfigParser, network_id: str, source: str) -> nn.Module:
    """Instantiate ``network_id`` of a read config alone (nothing else is built, no data read), in eval mode.

    Raises:
        ValueError: the id is missing, the network cannot be built, or it is no ``nn.Module``; ``source`` names the
            config in the message.
    """
    if network_id not in parser:
        raise ValueError(f"{source} has no {network_id!r} (the network's id; choose another with --network-id)")
    try:
        network = parser.get_parsed_content(network_id)
    except Exception as error:  # whatever the network's constructor or a referenced expression raises
        cause = error.__cause__ or error  # MONAI wraps a failed instantiation in a RuntimeError "from" the cause
        raise ValueError(f"cannot build {network_id} of {source}: {type(cause).__name__}: {cause}") from error
    if not isinstance(network, nn.Module):
        raise ValueError(f"{network_id} of {source} is a {type(network).__name__}, not a torch.nn.Module")
    return network.eval()


def inspect_bundle(
    bundle_root: str | pathlib.Path,
    configs: Sequence[str | pathlib.Path] | None = None,
    network_id: str | None = None,
    label_key: str = CommonKeys.LABEL,
    overrides: dict[str, Any] | None = None,
) -> Attachment:
    """Read a bundle and find what the handlers need to be attached to it.

    Args:
        bundle_root: the bundle folder.
        configs: its config files to merge (relative to ``bundle_root`` or absolute); default
            :func:`default_configs`.
        network_id: the id of the network; default ``network_def``, else what the evaluator's ``network`` refers to.
        label_key: the key of the label in the evaluator's data.
        overrides: config values set after reading, as ``python -m monai.bundle run --id value`` sets them (on a
            machine without a GPU, say, an expression that loads a file to ``cuda``).

    Returns:
        the :class:`Attachment`.

    Raises:
        ValueError: a config cannot be read, has no evaluator, or its network cannot be built; the message says which.
    """
    bundle_root = pathlib.Path(bundle_root)
    if not bundle_root.is_dir():
        raise ValueError(f"no bundle folder {bundle_root}")
    paths = default_configs(bundle_root) if not configs else [
        path if path.is_absolute() or path.exists() else bundle_root / path for path in map(pathlib.Path, configs)]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"no config file {path}")
    source = " + ".join(str(path) for path in paths)
    parser = ConfigParser()
    try:
        parser.read_config([str(path) for path in paths])
    except Exception as error:  # JSON/YAML syntax, an unknown file type; the first line says which
        raise ValueError(f"cannot read {source}: {str(error).partition(chr(10))[0] or type(error).__name__}") from error
    parser["bundle_root"] = str(bundle_root)
    for key, value in (overrides or {}).items():
        parser[key] = value
    evaluator_id = _evaluator_id(parser, source)
    evaluator = parser[evaluator_id]
    handlers = evaluator.get("val_handlers")
    handlers_id = (handlers[1:] if isinstance(handlers, str) and handlers.startswith("@")
                   else f"{evaluator_id}#val_handlers" if isinstance(handlers, list) else None)
    if network_id is None:
        reference = evaluator.get("network", "")
        network_id = "network_def" if "network_def" in parser else (
            reference[1:] if isinstance(reference, str) and reference.startswith("@") else "network")
    network = build_network(parser, network_id, source)
    postprocessing = _parsed(parser, f"{evaluator_id}#postprocessing")
    found = postprocessing_activation(postprocessing)
    activation, reason = found if found is not None else (
        "auto", "the postprocessing does not tell: the handlers choose by the output's channel count and log it")
    channel_def = _channel_def(bundle_root)
    include_background = activation == "sigmoid" and channel_def is not None and len(channel_def) > 1
    class_names = None
    if channel_def is not None and activation != "auto":
        first = 0 if include_background or len(channel_def) == 1 else 1
        class_names = [channel_def[index] for index in range(first, len(channel_def))]
    preprocessing = _parsed(parser, _follow(parser, evaluator_id, "val_data_loader", "dataset", "transform"))
    with_labels = any(label_key in getattr(transform, "keys", ()) for transform in flat_transforms(preprocessing))
    label_resampling = [name for name in resampling_transforms(postprocessing) if f"'{label_key}'" in name]
    output_dir = "$@output_dir + '/protoseg'" if "output_dir" in parser else "$@bundle_root + '/protoseg'"
    return Attachment(
        bundle_root=bundle_root, configs=paths, evaluator_id=evaluator_id, handlers_id=handlers_id,
        network_type=type(network).__name__, layers=candidate_layers(network),
        quality_layers=last_decoder_layers(network), activation=activation, activation_reason=reason,
        class_names=class_names, include_background=include_background, with_labels=with_labels,
        label_resampling=label_resampling, output_dir=output_dir, overrides=dict(overrides or {}),
        aliases=layer_aliases(network, candidate_layers(network)),
    )


def write_overlay(attachment: Attachment, path: str | pathlib.Path, *, force: bool = False) -> pathlib.Path:
    """Write the overlay as JSON, atomically; an existing different file is kept unless ``force``.

    Raises:
        FileExistsError: ``path`` exists with other content (edited by hand?) and ``force`` is not set.
    """
    path = pathlib.Path(path)
    text = json.dumps(attachment.overlay(), indent=4) + "\n"
    if path.exists() and not force and path.read_text() != text:
        raise FileExistsError(f"{path} exists and differs from the overlay attach writes (edited by hand?): pass "
                              f"--force to replace it, or --output another file")
    atomic_write_text(path, text)
    return path


def _evaluator_id(parser: ConfigParser, source: str) -> str:
    """The id of the evaluator that runs: the first evaluator among the targets of ``run``'s ``@id.run()``, else the
    evaluator that validates a trainer that runs (``validate#evaluator``)."""
    run = parser.get("run", [])
    targets = [match for expression in (run if isinstance(run, list) else [run])
               for match in _RUN_TARGET.findall(str(expression))]
    for target in [*targets, "validate#evaluator", "evaluator"]:
        config = parser.get(target)
        if isinstance(config, dict) and "Evaluator" in str(config.get("_target_", "")):
            return target
    raise ValueError(f"{source} runs no MONAI evaluator (run: {run!r}): attach needs an evaluation or inference "
                     f"config whose evaluator has val_handlers")


def _follow(parser: ConfigParser, config_id: str, *keys: str) -> str:
    """The id reached from ``config_id`` through ``keys``, following ``@id`` references."""
    for key in keys:
        config_id = f"{config_id}#{key}"
        value = parser.get(config_id)
        while isinstance(value, str) and value.startswith("@"):
            config_id = value[1:]
            value = parser.get(config_id)
    return config_id


def _parsed(parser: ConfigParser, config_id: str) -> Any:
    """The parsed content of ``config_id``, or ``None`` when it is missing."""
    return parser.get_parsed_content(config_id) if config_id in parser else None


def _channel_def(bundle_root: pathlib.Path) -> list[str] | None:
    """The output channels' names from ``configs/metadata.json`` (``network_data_format.outputs.pred``)."""
    metadata = bundle_root / "configs" / "metadata.json"
    try:
        channels = ConfigParser.load_config_file(metadata)["network_data_format"]["outputs"]["pred"]["channel_def"]
        return [str(channels[str(index)]) for index in range(len(channels))]
    except (OSError, ValueError, KeyError, TypeError):
        return None
