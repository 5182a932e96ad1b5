"""The ``monai-protoseg`` command line (also ``python -m monai_protoseg``).

Commands:

- ``report RUN_DIR``: the figures, ``report.md`` and a self-contained ``report.html`` from the CSV files of a run.
- ``layers BUNDLE_OR_CONFIG``: the blocks of a bundle's network with their output shapes, the layers that
  ``candidate_layers`` and ``last_decoder_layers`` choose marked.
- ``attach BUNDLE_DIR``: an overlay config that appends the SA, prototype-map and quality handlers to a bundle's
  evaluator (see :mod:`monai_protoseg.attach`), and the ``python -m monai.bundle run`` line that runs it.
- ``run --config_file FILE [BUNDLE OPTIONS]``: a bundle workflow, as ``python -m monai.bundle run`` runs it; if it
  fails, its traceback and then the cause alone on the last line.
- ``demo [BUNDLE OPTIONS]``: the demo bundle, as ``make demo`` runs it (with ``run``), with bundle options passed on.

An error a user can fix (a missing folder or file, a malformed CSV, a config whose network cannot be built, a bad
option) prints one line, ``monai-protoseg: error: ...``, to stderr and exits with status 1 (2 for a usage error);
``run`` and ``demo`` print the traceback of a failed bundle run above that line.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import re
import shlex
import subprocess
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import fire
import torch
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run
from monai.utils import safe_eval
from torch import nn

from .attach import build_network, inspect_bundle, write_overlay
from .layer_names import layer_aliases
from .recorder import candidate_layers, last_decoder_layers
from .report import write_report

__all__ = [
    "main", "build_parser", "demo_command", "error_summary", "parse_overrides", "parse_shape", "output_shapes",
    "layer_table", "DEMO_BUNDLE",
]

PROG = "monai-protoseg"
DEMO_BUNDLE = pathlib.Path(__file__).resolve().parents[1] / "bundles" / "protoseg_demo"
"""The demo bundle of the repository checkout (the package is installed editable)."""
PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
"""Errors raised in this folder name the option or file at fault: :func:`error_summary` prefers them."""
MAX_SIZE_FACTOR = 3
"""``layers`` tries ``n = 1, 2, ...`` up to this in metadata spatial shapes such as ``"16*n"``."""


class CLIError(Exception):
    """An error the user can fix; :func:`main` prints its message as one line."""


class _ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``monai-protoseg`` and its subcommands."""
    parser = _ArgumentParser(prog=PROG, description="ProtoSeg segmentation-ability (SA) tools for MONAI networks.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    report = commands.add_parser(
        "report", help="write report.html (self-contained), report.md and figures from a run's CSV files",
        description="Write the figures, report.md and a self-contained report.html (figures embedded) from the CSV "
                    "files a run wrote: sa_layers.csv, sa_units.csv, quality_validation.csv, quality.csv, attribution/ "
                    "and weak/ (sa_layers.csv or weak/weak_segmentation.csv is required).")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the folder the run wrote its CSV files to")
    report.add_argument("--output-dir", metavar="D", help="where the report goes (default: RUN_DIR/report)")
    report.add_argument("--active-threshold", type=float, default=0.5, metavar="T",
                        help="unit SA above which a unit counts as active (default: 0.5)")
    report.set_defaults(handler=_report)

    layers = commands.add_parser(
        "layers", help="list a bundle network's layers with output shapes, marking the layers SA probes",
        description="Build the network of a bundle (configs/inference.json, else configs/train.json) or of a config "
                    "file, run one forward pass on the smallest input its metadata allows (or --shape), and list "
                    "its blocks down to the candidate layers with their output shapes. Marks: SA = candidate_layers "
                    "(the default SA layers), quality = last_decoder_layers (the default layers of the mean-SA "
                    "quality estimate).")
    layers.add_argument("source", metavar="BUNDLE_OR_CONFIG", help="a bundle folder, or a config file (json/yaml)")
    layers.add_argument("--shape", metavar="C,H,W[,D]",
                        help="input shape without the batch, such as 1,64,64 (default: from metadata.json)")
    layers.add_argument("--network-id", default="network_def", metavar="ID",
                        help="id of the network in the config (default: network_def)")
    layers.add_argument("--all", action="store_true",
                        help="list every module, single layers and the parts of the candidate layers too")
    layers.set_defaults(handler=_layers)

    attach = commands.add_parser(
        "attach", help="write an overlay config that adds the SA, prototype-map and quality handlers to a bundle",
        usage=f"{PROG} attach [-h] [--config FILE] [--output FILE] [--network-id ID] [--force] BUNDLE_DIR "
              f"[-- --ID VALUE ...]",
        description="Read a MONAI bundle (JSON or YAML configs), build its network, detect its evaluator, activation, "
                    "class names (metadata.json), layers and whether its postprocessing inverts the labels, write an "
                    "overlay config that appends the SA, prototype-map and quality handlers to the evaluator's own "
                    "handlers, and print the python -m monai.bundle run line that runs the bundle with it. Config "
                    "values after -- (--ID VALUE, as python -m monai.bundle run takes them) are set before the "
                    "network is built and passed on to the run line.")
    attach.add_argument("bundle", metavar="BUNDLE_DIR", help="the bundle folder")
    attach.add_argument("--config", action="append", metavar="FILE",
                        help="a config of the bundle, relative to BUNDLE_DIR or absolute; repeat to merge several in "
                             "order (default: configs/train + configs/evaluate, else configs/inference)")
    attach.add_argument("--output", metavar="FILE",
                        help="the overlay to write (default: BUNDLE_DIR/configs/protoseg_evaluate.json, or "
                             "protoseg_inference.json for an inference config)")
    attach.add_argument("--network-id", metavar="ID",
                        help="id of the network in the config (default: network_def, else the evaluator's network)")
    attach.add_argument("--force", action="store_true", help="replace an overlay file that was changed by hand")
    attach.set_defaults(handler=_attach)

    run = commands.add_parser(
        "run", allow_abbrev=False, help="run a bundle as python -m monai.bundle run does; a failure's cause last",
        usage=f"{PROG} run [-h] --config_file FILE [--bundle_root DIR] [BUNDLE OPTIONS ...]",
        description="Run a bundle workflow as python -m monai.bundle run does, with its options (--config_file, "
                    "--bundle_root, --meta_file, --logging_file, --ID VALUE config values). If the run fails, its "
                    "traceback is printed, then the cause alone on the last line (monai-protoseg: error: ...), and "
                    "the exit status is 1.")
    run.set_defaults(handler=_run)

    demo = commands.add_parser(
        "demo", allow_abbrev=False, help="run the demo bundle (as make demo); other options go to the bundle",
        usage=f"{PROG} demo [-h] [--bundle-root DIR] [BUNDLE OPTIONS ...]",
        description="Run the demo bundle with monai-protoseg run (python -m monai.bundle run, a failure's cause on "
                    "the last line), as make demo does. Every other option goes to the bundle, such as --epochs 10 "
                    "--output_dir /tmp/demo --device cpu (put -- before bundle options that clash with these).")
    demo.add_argument("--bundle-root", default=str(DEMO_BUNDLE), metavar="DIR",
                      help=f"the demo bundle folder (default: {DEMO_BUNDLE})")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``monai-protoseg``.

    Args:
        argv: the arguments, without the program name (default: ``sys.argv[1:]``).

    Returns:
        the exit status: 0 on success, 1 on an error, 2 on a usage error; ``demo`` returns the bundle run's status.
    """
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.command not in ("demo", "run", "attach"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as stop:  # --help, or a usage error already printed
        return int(stop.code or 0)
    args.bundle_args = extra[1:] if extra[:1] == ["--"] else extra
    try:
        return args.handler(args)
    except (CLIError, OSError, ValueError) as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1


def _report(args: argparse.Namespace) -> int:
    if not 0 <= args.active_threshold <= 1:
        raise CLIError(f"--active-threshold must be between 0 and 1, got {args.active_threshold:g}")
    markdown = write_report(args.run_dir, args.output_dir, active_threshold=args.active_threshold)
    print(f"wrote {markdown.with_name('report.html')} and {markdown} (figures beside them)")
    return 0


def _layers(args: argparse.Namespace) -> int:
    given = parse_shape(args.shape) if args.shape else None
    config, bundle_root, metadata = _locate(pathlib.Path(args.source))
    network = _build_network(config, bundle_root, args.network_id)
    candidates = [(1, *given)] if given else _metadata_shapes(metadata, config)
    input_shape, shapes, output = _first_run(network, candidates, f"{args.network_id} of {config}")
    result = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    print(f"{config}: {args.network_id} = {type(network).__name__}, input {input_shape} -> output {result}")
    print(layer_table(network, shapes, show_all=args.all, example_input=torch.zeros(input_shape)))
    return 0


def _attach(args: argparse.Namespace) -> int:
    attachment = inspect_bundle(args.bundle, args.config, args.network_id,
                                overrides=parse_overrides(args.bundle_args))
    name = "protoseg_evaluate.json" if attachment.with_labels else "protoseg_inference.json"
    output = pathlib.Path(args.output) if args.output else attachment.bundle_root / "configs" / name
    try:
        write_overlay(attachment, output, force=args.force)
    except FileExistsError as error:
        raise CLIError(str(error)) from error
    print(attachment.summary())
    print(f"wrote {output}; run the bundle with it:")
    print(attachment.command(output))
    return 0


def _first_run(
    network: nn.Module, candidates: list[tuple[int, ...]], what: str
) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]], object]:
    """The first input shape of ``candidates`` the network runs on, with its output shapes and output."""
    failure: Exception | None = None
    for shape in candidates:
        try:
            return (shape, *output_shapes(network, torch.rand(shape)))
        except Exception as error:  # too small for the network, or it cannot run at all: try the next size
            failure = error
    tried = " or ".join(str(shape) for shape in candidates)
    raise CLIError(f"{what} does not run on input {tried} ({type(failure).__name__}: {failure}); give an input "
                   f"shape with --shape C,H,W[,D]")


def _run(args: argparse.Namespace) -> int:
    try:
        fire.Fire(bundle_run, command=list(args.bundle_args), name=f"{PROG} run")
    except SystemExit as stop:  # fire's usage errors and --help, already printed
        return stop.code if isinstance(stop.code, int) else 1
    except Exception as error:  # the run failed: its traceback, then the cause on the last line
        traceback.print_exc()
        sys.stdout.flush()
        print(f"{PROG}: error: {error_summary(error)}", file=sys.stderr, flush=True)
        return 1
    return 0


def error_summary(error: BaseException) -> str:
    """The one line that says why a bundle run failed: ``Type: message`` of one exception of ``error``'s chain.

    A bundle error comes wrapped: MONAI's ``Failed to evaluate ConfigExpression`` or ``applying transform``
    around the error itself, an error of a ``DataLoader`` worker re-raised with the worker's traceback as text. The
    line is that of the first exception of the chain, outermost first, raised in this package (its checks name the
    option or the file at fault), else that of the innermost one (the original error); an exception re-raised from a
    worker is replaced by the exceptions of the traceback it carries.

    Args:
        error: the exception that ended the run.

    Returns:
        ``"Type: message"``, the message on one line.
    """
    chain: list[tuple[bool, str]] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if "\nOriginal Traceback (most recent call last):" in text:
            chain += _printed_chain(text.partition("\nOriginal ")[2])
        else:
            chain.append((_raised_in_package(current), f"{type(current).__name__}: {' '.join(text.split())}"))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return next((line for own, line in chain if own), chain[-1][1]).removesuffix(": ")


_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line \d+')


def _printed_chain(text: str) -> list[tuple[bool, str]]:
    """``(raised in this package, "Type: message")`` of each exception of a printed traceback, outermost first."""
    chain = []
    for block in text.split("Traceback (most recent call last):\n")[1:]:
        lines = block.splitlines()
        frames = [match["file"] for match in map(_FRAME.match, lines) if match]
        message = next((line for line in lines if line.strip() and not line.startswith(" ")), "")
        chain.append((bool(frames) and _in_package(frames[-1]), message))
    return chain[::-1]


def _raised_in_package(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is code of this package."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and _in_package(frame.tb_frame.f_code.co_filename)


def _in_package(filename: str) -> bool:
    """Whether the source file ``filename`` is in this package."""
    return pathlib.Path(filename).resolve().is_relative_to(PACKAGE_DIR)


def _demo(args: argparse.Namespace) -> int:
    bundle_root = pathlib.Path(args.bundle_root)
    if not (bundle_root / "configs" / "train.json").is_file():
        raise CLIError(f"no demo bundle at {bundle_root} (no configs/train.json); give its folder with --bundle-root")
    command = demo_command(bundle_root, args.bundle_args)
    print(f"running: {shlex.join(command)}", flush=True)
    try:
        return subprocess.run(command, check=False).returncode
    except KeyboardInterrupt:  # Ctrl-C reached the bundle run too, which reports it; no traceback from here
        return 130


def demo_command(bundle_root: str | pathlib.Path, bundle_args: Sequence[str] = ()) -> list[str]:
    """The command ``make demo`` runs: ``monai-protoseg run`` (``python -m monai.bundle run``, a failure's cause on
    the last line) on the bundle's ``configs/train.json``.

    Args:
        bundle_root: the demo bundle folder.
        bundle_args: bundle options, such as ``["--epochs", "2", "--output_dir", "/tmp/demo"]``.

    Returns:
        the command line, starting with this Python interpreter.
    """
    bundle_root = pathlib.Path(bundle_root)
    return [sys.executable, "-m", "monai_protoseg", "run", "--config_file", str(bundle_root / "configs" / "train.json"),
            "--bundle_root", str(bundle_root), *bundle_args]


def parse_overrides(words: Sequence[str]) -> dict[str, Any]:
    """``["--id", "value", ...]`` as ``{id: value}``, values read as Python literals where they are (``2``,
    ``[1, 2]``, ``True``), else kept as text (``$expressions``, ``@references``), as ``monai.bundle run`` reads them.

    Raises:
        CLIError: a word is not ``--id`` followed by a value.
    """
    if len(words) % 2 or any(not key.startswith("--") or len(key) < 3 for key in words[::2]):
        raise CLIError(f"config values go in pairs --ID VALUE after --, got {' '.join(words)}")
    overrides = {}
    for key, value in zip(words[::2], words[1::2]):
        try:
            overrides[key[2:]] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key[2:]] = value
    return overrides


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,64,64"`` as ``(1, 64, 64)``: channels, then 1 to 3 spatial sizes, all positive.

    Raises:
        CLIError: anything else.
    """
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not 2 <= len(shape) <= 4 or min(shape) < 1:
        raise CLIError(f"bad --shape {text!r}: expected C,H,W[,D], positive integers such as 1,64,64")
    return shape


def _locate(source: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path | None]:
    """The config file, the bundle root and the metadata file (``None`` if there is none) of a bundle or config."""
    if source.is_dir():
        configs = source / "configs"
        config = next((configs / name for name in ("inference.json", "train.json") if (configs / name).is_file()), None)
        if config is None:
            raise CLIError(f"{source} is not a bundle folder: it has no configs/inference.json or configs/train.json")
        bundle_root = source
    elif source.is_file():
        config = source
        bundle_root = source.parent.parent if source.parent.name == "configs" else source.parent
    else:
        raise CLIError(f"no bundle folder or config file {source}")
    metadata = config.parent / "metadata.json"
    return config, bundle_root, metadata if metadata.is_file() else None


def _build_network(config: pathlib.Path, bundle_root: pathlib.Path, network_id: str) -> nn.Module:
    """Instantiate ``network_id`` of ``config`` alone (nothing else is built, no data read), in eval mode."""
    parser = ConfigParser()
    try:
        parser.read_config(config)
    except Exception as error:  # JSON/YAML syntax, unknown file type, no YAML package; the first line says which
        first_line = str(error).partition("\n")[0] or type(error).__name__
        raise CLIError(f"cannot read {config}: {first_line}") from error
    parser["bundle_root"] = str(bundle_root)
    return build_network(parser, network_id, str(config))


def _metadata_shapes(metadata: pathlib.Path | None, config: pathlib.Path) -> list[tuple[int, ...]]:
    """Input shapes ``(1, C, *S)`` from ``network_data_format.inputs.image``, smallest first.

    Sizes such as ``"16*n"`` are evaluated with ``n = 1, 2, ..., MAX_SIZE_FACTOR`` (``p`` too, as in MONAI's
    ``verify_net_in_out``): the smallest one may still be too small for the network (an instance norm needs more
    than one voxel at the bottleneck), so the caller tries them in order.
    """
    if metadata is None:
        raise CLIError(f"no metadata.json beside {config}: give the input shape with --shape C,H,W[,D]")
    try:
        image = ConfigParser.load_config_file(metadata)["network_data_format"]["inputs"]["image"]
        channels, spatial = int(image["num_channels"]), list(image["spatial_shape"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CLIError(f"{metadata} has no network_data_format.inputs.image with num_channels and spatial_shape "
                       f"({type(error).__name__}: {error}); give the input shape with --shape C,H,W[,D]") from error
    factors = range(1, MAX_SIZE_FACTOR + 1) if any(isinstance(size, str) for size in spatial) else [1]
    try:
        return [(1, channels, *(int(safe_eval(str(size), {"n": k, "p": k})) for size in spatial)) for k in factors]
    except Exception as error:  # SyntaxError, NameError, or an unsafe expression
        raise CLIError(f"cannot evaluate spatial_shape {spatial} of {metadata} ({error}); give the input shape with "
                       f"--shape C,H,W[,D]") from error


def output_shapes(network: nn.Module, sample: torch.Tensor) -> tuple[dict[str, tuple[int, ...]], object]:
    """Run ``network`` once on ``sample`` (no gradients) and record the output shape of every submodule.

    Plain forward hooks, removed afterwards whatever happens; only tensor outputs are recorded (a block returning a
    list or tuple, such as an encoder feeding skip connections, is left out).

    Args:
        network: the network, in the mode it should run in.
        sample: its input.

    Returns:
        ``{qualified name: output shape}`` of the submodules that ran, and the network's output.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def record(module: nn.Module, args: tuple, output: object) -> None:
            if isinstance(output, torch.Tensor):
                shapes[name] = tuple(output.shape)

        return record

    handles = [module.register_forward_hook(recorder(name)) for name, module in network.named_modules() if name]
    try:
        with torch.no_grad():
            output = network(sample)
    finally:
        for handle in handles:
            handle.remove()
    return shapes, output


def layer_table(
    network: nn.Module,
    shapes: dict[str, tuple[int, ...]],
    *,
    show_all: bool = False,
    example_input: torch.Tensor | None = None,
) -> str:
    """A text table of the network's modules: qualified name (indented under its listed parent), type, output
    shape, ``SA`` / ``quality`` for the layers :func:`candidate_layers` / :func:`last_decoder_layers` choose, and
    those layers' readable aliases (:func:`~monai_protoseg.layer_aliases`, the names results and reports show).

    By default, in registration order, the candidate layers and the blocks (modules with children) outside them: the
    network's skeleton down to the probed layers, which is what one chooses layers from. Single layers
    (convolution, norm, activation) and the parts of a candidate layer would multiply the list by 5 to 20;
    ``show_all`` lists them too.

    Args:
        network: the network.
        shapes: output shapes by qualified name (see :func:`output_shapes`); modules without one are left out.
        show_all: list every module with an output shape.
        example_input: an input the network runs on, for networks :func:`candidate_layers` knows only by running
            them.

    Returns:
        the table, then a legend.
    """
    candidates = candidate_layers(network, example_input=example_input)
    try:
        quality = last_decoder_layers(network, example_input=example_input)
    except ValueError:  # fewer than three candidate layers: no quality default
        quality = []
    aliases = layer_aliases(network, candidates)
    modules = dict(network.named_modules())
    inside_candidate = tuple(f"{name}." for name in candidates)

    def listed_by_default(name: str, module: nn.Module) -> bool:
        is_block = any(True for _ in module.children())
        return name in candidates or (is_block and not name.startswith(inside_candidate))

    listed = [name for name, module in modules.items()
              if name in shapes and (show_all or listed_by_default(name, module))]
    rows = [("layer", "type", "output shape", "probe", "alias")]
    for name in listed:
        depth = sum(name.startswith(f"{parent}.") for parent in listed)
        marks = ", ".join(mark for mark, names in (("SA", candidates), ("quality", quality)) if name in names)
        alias = aliases.get(name, "")
        rows.append(("  " * depth + name, type(modules[name]).__name__, str(shapes[name]), marks, alias))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    hidden = sum(1 for name in shapes if name not in listed)
    lines += ["", f"SA: chosen by candidate_layers ({len(candidates)} layers, the default SA layers); quality: chosen "
                  f"by last_decoder_layers ({len(quality)} layers, the mean-SA quality estimate's default); alias: the "
                  f"name results and reports give the layer."]
    if hidden:
        lines.append(f"{hidden} more modules (single layers, parts of the SA layers) are not listed; --all lists them.")
    return "\n".join(lines)
