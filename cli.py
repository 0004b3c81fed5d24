"""The LightningCLI shared by ``evaluate.py`` and ``train.py``: configs drive every object (the top of the import
structure: it wires the modules, datamodules and callbacks together)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Lightning (and through it torch, torchmetrics and transformers) is imported where a CLI is built, not here: a
# script first checks the data inputs its command line names (check_inputs_early) and answers a wrong path
# in well under a second instead of after 8 s of imports.
if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

__all__ = ["SDDinoCLI", "build_cli", "check_data_inputs", "check_inputs_early", "quiet_third_party", "resume_command",
           "run_script"]


def __getattr__(name: str) -> Any:
    """``SDDinoCLI`` is defined on first use (it subclasses Lightning's CLI, which imports torch and Lightning)."""
    if name == "SDDinoCLI":
        return _sddino_cli()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _sddino_cli() -> type:
    """The :class:`SDDinoCLI` class, defined once."""
    if "SDDinoCLI" not in globals():
        globals()["SDDinoCLI"] = _define_cli_class()
    return globals()["SDDinoCLI"]


def _define_cli_class() -> type:
    from lightning.pytorch.cli import LightningCLI

    from callbacks import preemption
    from callbacks.prediction_writer import CorrespondenceWriter
    from callbacks.run_folder import prediction_settings

    return _cli_class(LightningCLI, preemption, CorrespondenceWriter, prediction_settings)


def _cli_class(LightningCLI: type, preemption: Any, CorrespondenceWriter: type,  # noqa: N803
               prediction_settings: Callable) -> type:
    """The CLI class, its Lightning parts given (imported by :func:`_define_cli_class` on first use)."""

    class SDDinoCLI(LightningCLI):
        """``LightningCLI`` that points loggers without a ``save_dir`` at the trainer's ``default_root_dir``.

        Loggers offering ``use_default_save_dir(path)`` (:class:`callbacks.AutoWandbLogger`) get
        ``trainer.default_root_dir`` after the trainer is built and before any run starts, so that a W&B run keeps
        ``results.json``, ``config.yaml``, the PNGs and its own files in the run directory however
        ``--trainer.default_root_dir`` was given (a YAML interpolation could not see a command-line override).
        """

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument(
                "--resume",
                type=bool,
                default=False,
                help="Continue an interrupted test run in the same output directory: pairs whose predictions it "
                "flushed are restored, not evaluated again (see callbacks.CorrespondenceWriter).",
            )
            parser.add_argument(
                "--overwrite",
                type=bool,
                default=False,
                help="Replace a finished run found in the output directory (by default a test run refuses to start "
                "there, see callbacks.run_folder).",
            )

        def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> Any:
            """``test`` and ``validate`` default to ``verbose: false``: the run prints its own results table
            (:class:`callbacks.CorrespondenceWriter`), and Lightning's metric table would follow it with the same
            numbers. Loggers (W&B) still receive every logged metric; ``--verbose true`` prints the table again."""
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            if subcommand in ("test", "validate"):
                parser.set_defaults(verbose=False)
            return parser

        def before_test(self) -> None:
            """Hand ``--resume`` and ``--overwrite`` to the run's prediction writers."""
            config = self.config_init[self.subcommand]
            resume, overwrite = bool(config.get("resume", False)), bool(config.get("overwrite", False))
            writers = [c for c in self.trainer.callbacks if isinstance(c, CorrespondenceWriter)]
            if resume and not writers:
                raise ValueError("--resume needs a callbacks.CorrespondenceWriter in trainer.callbacks")
            for writer in writers:
                writer.resume = writer.resume or resume
                writer.overwrite = writer.overwrite or overwrite

        def before_instantiate_classes(self) -> None:
            """Check the settings that name files and folders before any model is loaded; honour
            ``--trainer.enable_progress_bar false`` over a config's progress bar."""
            config = self.config[self.subcommand] if self.subcommand else self.config
            if config.get("trainer.enable_progress_bar") is False and config.get("trainer.callbacks"):
                # Lightning refuses a progress-bar callback with the bar disabled; the flag is the user's last word
                config["trainer.callbacks"] = [
                    c for c in config["trainer.callbacks"] if str(c.get("class_path", "")).rsplit(".", 1)[-1] != "PairProgressBar"
                ]
            problems = path_problems(config.clone().as_dict())
            if problems:
                raise ValueError("settings that cannot work (found before loading any model):\n  " + "\n  ".join(problems))
            check_data_inputs(config.clone().as_dict())

        def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
            config = self.config[self.subcommand] if self.subcommand else self.config
            settings = prediction_settings(config.clone().as_dict())
            trainer = super().instantiate_trainer(**kwargs)
            preemption.attach(trainer)  # SIGTERM: every process stops within seconds, none hangs in a collective
            for callback in trainer.callbacks:  # the writers record the settings their predictions depend on
                if isinstance(callback, CorrespondenceWriter):
                    callback.run_settings = settings
            for logger in trainer.loggers:
                use_default = getattr(logger, "use_default_save_dir", None)
                if callable(use_default):
                    use_default(trainer.default_root_dir)
            return trainer

    return SDDinoCLI


#: Config fields (by the end of their dotted key) that name a file that must exist, and a local model folder.
_FILE_FIELDS = ("checkpoint", "weights", "projection_ckpt", "ckpt_path")
_MODEL_FIELDS = ("model_id", "clip_model_id")


def _looks_local(model_id: str) -> bool:
    """A local folder rather than a hub id (``org/name``): absolute, relative (``./``, ``../``, ``~``), or deeper."""
    return model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1 or os.sep != "/" and os.sep in model_id


def path_problems(config: dict[str, Any]) -> list[str]:
    """``"<field>: <problem>"`` for each file, model folder or cache folder in ``config`` that cannot work.

    Checked: files named by ``checkpoint`` / ``weights`` / ``projection_ckpt`` / ``ckpt_path`` exist; a
    ``model_id`` that is a local path (not a hub id) is a folder; ``feature_cache_dir`` (a relative one under
    ``trainer.default_root_dir``, where the run puts it) is a folder (or can be made) that this process can
    write to.
    """
    from callbacks.run_folder import flatten_config

    problems = []
    flat = flatten_config(config)
    run_root = Path(str(flat.get("trainer.default_root_dir") or ".")).expanduser()
    for key, value in flat.items():
        if not isinstance(value, str) or not value:
            continue
        field = key.rsplit(".", 1)[-1]
        path = Path(value).expanduser()
        if field == "feature_cache_dir" and not path.is_absolute():
            path = run_root / path  # where the run puts it (zero_shot.place_feature_caches)
        if field in _FILE_FIELDS and not path.is_file():
            problems.append(f"{key}: file {value} not found")
        elif field in _MODEL_FIELDS and _looks_local(value) and not path.is_dir():
            problems.append(f"{key}: model folder {value} not found (a hub id is written org/name)")
        elif field == "feature_cache_dir":
            if path.exists() and not path.is_dir():
                problems.append(f"{key}: {value} is a file, not a folder")
                continue
            existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
            if not os.access(existing, os.W_OK | os.X_OK):
                problems.append(f"{key}: {value} cannot be written ({existing} is not writable)")
    return problems


def check_data_inputs(config: dict[str, Any]) -> None:
    """Let the datamodule check its inputs before any model is loaded: a ``data`` class with a static
    ``check_inputs(**init_args)`` (:class:`datamodules.ImagePairsDataModule`) raises naming the file and field."""
    data = config.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("class_path"), str):
        return
    module_name, _, class_name = data["class_path"].rpartition(".")
    try:
        data_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        return  # jsonargparse names a class it cannot import
    check = getattr(data_class, "check_inputs", None)
    if callable(check):
        check(**(data.get("init_args") or {}))


#: The subcommands of the entry points, and the options after which no early check runs (they exit early).
_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_NO_CHECK = ("-h", "--help", "--print_config")


def _early_data_block(args: Sequence[str]) -> dict[str, Any] | None:
    """The ``data`` block that ``args`` (a command line without the script) gives, read without Lightning:
    ``{"class_path": ..., "init_args": {...}}`` merged from the subcommand's defaults, each ``--config`` file and
    the ``--data.*`` options, in that order; None where it cannot be read that simply (an option giving the
    whole ``data`` block, a config that does not parse): the CLI then checks it as it loads."""
    import yaml

    subcommand = next((a for a in args if a in _SUBCOMMANDS), None)
    if subcommand is None or any(a.split("=", 1)[0] in _NO_CHECK for a in args):
        return None
    options: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            options.append(tuple(arg[2:].split("=", 1)))  # type: ignore[arg-type]
        elif arg.startswith("--") and i + 1 < len(args):
            options.append((arg[2:], args[i + 1]))
            i += 1
        i += 1
    files = [DEFAULT_CONFIGS / f"{subcommand}.yaml"] if subcommand in SUBCOMMAND_DEFAULTS else []
    data: dict[str, Any] = {"class_path": None, "init_args": {}}

    def merge(block: Any) -> bool:
        if not isinstance(block, dict):
            return False
        class_path = block.get("class_path")
        if class_path is not None:
            if str(class_path).rsplit(".", 1)[-1] != str(data["class_path"]).rsplit(".", 1)[-1]:
                data["init_args"] = {}
            data["class_path"] = class_path
        init_args = block.get("init_args") or {}
        extra = {k: v for k, v in block.items() if k not in ("class_path", "init_args")}
        if not isinstance(init_args, dict):
            return False
        data["init_args"].update({**init_args, **extra})
        return True

    for key, value in options:
        if key == "config":
            files.append(Path(value).expanduser())
    for file in files:
        try:
            config = yaml.safe_load(Path(file).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return None  # the CLI names the file
        if not isinstance(config, dict):
            return None
        block = config.get(subcommand, config) if isinstance(config.get(subcommand), dict) else config
        if "data" in block and not merge(block["data"]):
            return None
    for key, value in options:
        if key == "data" or key.startswith("data.") and key.count(".") > (2 if ".init_args." in key else 1):
            return None  # the whole block, or a field inside a field
        if key == "data.class_path":
            merge({"class_path": value})
        elif key.startswith("data."):
            data["init_args"][key.rsplit(".", 1)[-1]] = None if value == "null" else value
    return data


def _init_parameters(file: Path, class_name: str) -> set[str] | None:
    """The names ``class_name.__init__`` in ``file`` takes, read from its source (nothing is imported); None where
    that cannot be told (no such class or file, ``**kwargs``)."""
    import ast

    try:
        tree = ast.parse(file.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            init = next((f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
            if init is None or init.args.kwarg is not None:
                return None
            return {a.arg for a in (*init.args.posonlyargs, *init.args.args, *init.args.kwonlyargs)} - {"self"}
    return None


#: Where the own-images datamodule is written (its options are read from there before anything is imported).
_OWN_IMAGES = Path(__file__).resolve().parent / "datamodules" / "own_images.py"


def check_inputs_early(args: Sequence[str]) -> None:
    """Check the files and folders that a command line's own-images data names (``data.pairs``, ``data.source``,
    ``data.targets`` of :class:`datamodules.ImagePairsDataModule`) before torch and Lightning are imported, so
    that a typo in a path is answered in a fraction of a second (the CLI checks everything again as it loads,
    :meth:`SDDinoCLI.before_instantiate_classes`). Raises the error that later check would raise, with its
    message, and an option the datamodule does not take as a parse error (exit status 2); settings it cannot read
    simply (interpolations, a data block given whole) are left to the CLI."""
    data = _early_data_block(args)
    if data is None or str(data["class_path"]).rsplit(".", 1)[-1] != "ImagePairsDataModule":
        return
    init = data["init_args"]
    options = _init_parameters(_OWN_IMAGES, "ImagePairsDataModule")
    unknown = sorted(set(init) - options) if options else []
    if unknown:  # a typo in a field name (jsonargparse says the same once Lightning is imported)
        raise argparse.ArgumentError(None, f"data.{unknown[0]}: datamodules.ImagePairsDataModule has no option "
                                     f"{unknown[0]!r} (its options: {', '.join(sorted(options))})")
    given = {k: init.get(k) for k in ("pairs", "source", "targets", "source_keypoints", "grid")}
    if any(v is not None and (not isinstance(v, str) or "${" in v) for k, v in given.items()
           if k in ("pairs", "source", "targets")):
        return  # an interpolation or a value of another type: the CLI resolves and checks it
    try:
        grid = int(given["grid"]) if given["grid"] is not None else 6
    except (TypeError, ValueError):
        return  # jsonargparse's type check says it better
    from datamodules.own_image_paths import check_input_paths  # standard library only

    check_input_paths(pairs=given["pairs"], source=given["source"], targets=given["targets"],
                      source_keypoints=given["source_keypoints"], grid=grid)


#: The defaults of each subcommand (trainer block, callbacks, seed), read before the ``--config`` files: the
#: trainer block is written once per entry point, and a benchmark config states only what is its own.
DEFAULT_CONFIGS = Path(__file__).resolve().parent / "configs" / "defaults"
SUBCOMMAND_DEFAULTS = ("fit", "test", "predict")


def nested_nulls(args: Sequence[str]) -> list[str]:
    """``args`` with ``--a.b.c null`` (an option two classes down) written as ``--a.b '{c: null}'``.

    jsonargparse 4.x reads ``null`` on the command line as the text ``"None"`` for an option of a class nested
    in a class (``--model.pipeline.soft_argmax_window null`` then fails to validate, and
    ``--model.pipeline.projection_ckpt null`` names a file ``None``); given as its parent's ``init_args`` the
    same value is None, and merges with the parent's other settings.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg, step = args[i], 1
        key, value = (arg[2:].split("=", 1) + [None])[:2] if arg.startswith("--") else (None, None)
        if key is not None and value is None and "=" not in arg and i + 1 < len(args):
            value, step = args[i + 1], 2
        if value == "null" and len([p for p in key.split(".") if p != "init_args"]) >= 3:
            parent, name = key.rsplit(".", 1)
            parent = parent.removesuffix(".init_args")
            out += [f"--{parent}", f"{{{name}: null}}"]
            i += step
            continue
        out.append(arg)
        i += 1
    return out


#: Lightning's adverts, logged at INFO by its rank-zero logger on every run (litlogger, litmodels).
_ADVERT_PREFIX = "💡 Tip:"
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def _not_an_advert(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_ADVERT_PREFIX)


def quiet_third_party() -> None:
    """Silence what third-party code prints on every run that is no news to a user of this project, each by its
    message and origin (every other warning and log line stays):

    - Lightning's "💡 Tip:" adverts for litlogger and litmodels (its rank-zero logger);
    - torch's FutureWarning that ``isinstance(treespec, LeafSpec)`` is deprecated, raised by Lightning's own
      ``lightning.pytorch.utilities._pytree`` on every batch transfer (Lightning's to fix, not the user's).
    """
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _not_an_advert not in logger.filters:
            logger.addFilter(_not_an_advert)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


def build_cli(args: list[str] | None = None, run: bool = True, defaults_of: str = "test") -> LightningCLI:
    """Build (and by default run) the CLI.

    Model and datamodule are given by ``class_path`` in the configs, so any LightningModule or
    LightningDataModule of this collection (or a user's) can be selected from YAML. Each subcommand first
    reads its defaults (``configs/defaults/<fit|test|predict>.yaml``: the trainer block and its callbacks);
    with ``run=False`` (no subcommand) those of ``defaults_of``. omegaconf mode makes
    ``${...}`` interpolation available in configs. ``config.yaml`` is written to the log dir as usual, and
    the resolved config is also sent to every logger (the W&B run config; see
    :class:`callbacks.config_logging.LoggerSaveConfigCallback`).
    """
    import lightning as L

    from callbacks.config_logging import LoggerSaveConfigCallback

    quiet_third_party()
    if args is None:  # the command line itself (LightningCLI reads sys.argv; an `args` list would make it warn)
        sys.argv[1:] = nested_nulls(sys.argv[1:])
    else:
        args = nested_nulls(args)
    defaults = {name: [str(DEFAULT_CONFIGS / f"{name}.yaml")] for name in SUBCOMMAND_DEFAULTS}
    parser_kwargs: dict[str, Any] = {"parser_mode": "omegaconf", "exit_on_error": False}
    if run:
        parser_kwargs.update({name: {"default_config_files": files} for name, files in defaults.items()})
    else:  # no subcommand: the objects of a `defaults_of` run
        parser_kwargs["default_config_files"] = defaults[defaults_of]
    return _sddino_cli()(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=LoggerSaveConfigCallback,
        # a bad value raises (run_script prints it in a few lines) instead of printing the whole usage and exiting
        parser_kwargs=parser_kwargs,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


#: Set to 1 to see the full traceback of an error instead of its one-paragraph summary.
DEBUG_ENV = "SD_DINO_DEBUG"
#: The exit status of a run stopped by SIGTERM (128 + 15, as a shell reports a process killed by it; the value
#: of callbacks.preemption.SIGTERM_EXIT, which imports Lightning).
SIGTERM_EXIT = 143


#: This project's source folders: an error raised from a file under them carries the project's own message.
_PROJECT = Path(__file__).resolve().parent


def _raised_by_project(error: BaseException) -> bool:
    """Whether ``error`` was raised in this project's code (its innermost traceback frame is a project file)."""
    frame = error.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    path = Path(frame.tb_frame.f_code.co_filename).resolve()
    return _PROJECT in path.parents and not {".venv", "site-packages"} & set(path.parts)


def _reported_error(error: BaseException) -> BaseException:
    """The error whose message a user reads: the outermost one of the chain that this project raised (it names
    the file, the entry and the field, as ``ValueError(... is not a readable image ...) from err`` does), else the
    innermost cause (jsonargparse and Lightning wrap a constructor's error in errors of their own)."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return next((e for e in chain if _raised_by_project(e)), chain[-1])


def resume_command(argv: list[str]) -> str:
    """The command that resumes the run ``argv`` started (``--resume true`` replacing any ``--resume``)."""
    args, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = True
            continue
        if not arg.startswith("--resume="):
            args.append(arg)
    return shlex.join(["python", argv[0], *args, "--resume", "true"])


def run_script(main: Callable[[], Any], argv: list[str] | None = None) -> None:
    """Run a script's ``main()`` and turn how it ended into an exit status a scheduler can act on.

    - SIGTERM (a preemption), in any process of a multi-process run: the loop stops after the current batch,
      or at once where no batch runs (the end-of-epoch sync included; :mod:`callbacks.preemption`); the flushed
      predictions stay in the run folder, rank 0 prints the resume command, and every process exits with
      :data:`SIGTERM_EXIT`. An error after the SIGTERM (a collective broken by a process that stopped) counts
      as the stop.
    - Any other error: ``error: <message>`` and exit status 1, the message of the outermost error this project
      raised (:func:`_reported_error`); with ``SD_DINO_DEBUG=1`` the full traceback instead.
    """
    argv = list(sys.argv if argv is None else argv)
    is_rank_zero = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"
    testing = len(argv) > 1 and argv[1] == "test"
    try:  # a wrong input path is answered before torch and Lightning are imported
        check_inputs_early(argv[1:])
    except Exception as error:  # noqa: BLE001
        _exit_with(error, is_rank_zero)
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from callbacks import preemption

    stop = preemption.install(
        is_rank_zero,
        "stopped by SIGTERM" + (": the predictions of the finished batches are kept in the run folder." if testing else "."),
        resume_command(argv) if testing else None,
    )
    try:
        main()
    except SIGTERMException:
        stop.stop()
    except Exception as error:  # noqa: BLE001 - every error becomes a short message and a non-zero exit
        if stop.requested:
            stop.stop()
        _exit_with(error, is_rank_zero)


#: How torch re-raises an error of a DataLoader worker: its type, with the worker's traceback as text.
_WORKER_ERROR = re.compile(r"^Caught (?P<type>\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def _message(error: BaseException) -> str:
    """``str(error)``; for an error a DataLoader worker raised, the worker's own message (the last
    ``Type: message`` of the traceback text torch re-raises it with), not the traceback."""
    text = str(error)
    match = _WORKER_ERROR.match(text)
    if match is not None:
        marker = f"\n{match['type']}: "
        if marker in text:
            return text.rsplit(marker, 1)[1].strip()
    return text


def _exit_with(error: Exception, is_rank_zero: bool) -> None:
    """Print ``error: <message>`` (rank 0) and exit 1 (2 for a parse error); with ``SD_DINO_DEBUG=1`` re-raise."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        raise error
    parse_error = type(error).__name__ == "ArgumentError"  # its message names the field; its cause does not
    root = error if parse_error else _reported_error(error)
    if is_rank_zero:
        print(f"error: {_essential(_message(root))}\n({type(root).__name__}; set {DEBUG_ENV}=1 for the full "
              "traceback; --help lists every option)", file=sys.stderr, flush=True)
    sys.exit(2 if parse_error else 1)


def _essential(message: str) -> str:
    """A jsonargparse error without its echo of the value and of the ``None`` alternative of every union."""
    noise = ("Given value", "- Expected a <class 'NoneType'>", "Subtypes:", "Does not validate against any of")
    return "\n".join(line for line in message.splitlines() if not line.strip().startswith(noise))
