"""Loading pretrained components by hub id or local directory, with errors that say what to do."""

from __future__ import annotations

import os
import pickle
import shlex
from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = ["MODEL_PATTERNS", "SKIPPED_FILES", "ModelLoadError", "check_tokenizer", "download_command",
           "load_pretrained", "load_weights_file"]

T = TypeVar("T")

_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of boolean environment variables


#: What a model's download takes (``snapshot_download``'s ``allow_patterns``, ``hf download --include``): the
#: configs, the tokenizer and scheduler files and the safetensors weights, in any of the featurizers' layouts.
MODEL_PATTERNS = ("*.json", "*.txt", "tokenizer/*", "scheduler/*", "*.safetensors")
#: What it leaves out (``ignore_patterns``, ``--exclude``): a whole snapshot of SD v1-5 would also fetch its
#: single-file checkpoints, pickled and half-precision copies and the safety checker, several times the size.
SKIPPED_FILES = ("*.ckpt", "*.bin", "*.msgpack", "*.h5", "*.onnx", "*fp16*", "*non_ema*", "*.pth", "*.pt",
                 "v1-5-pruned*", "*emaonly*", "safety_checker/*")


def download_command(model_id: str, files: Sequence[str] = (), local_dir: str | None = None) -> str:
    """The shell command that downloads what the featurizers load of a hub model, never the whole repository.

    ``hf download`` is huggingface_hub's command line since 1.0 (``huggingface-cli`` was removed); it takes one
    pattern per ``--include`` / ``--exclude``, and ignores both where file names are given.

    Args:
        model_id: Hub id.
        files: Exactly these files; none: the files of :data:`MODEL_PATTERNS` less :data:`SKIPPED_FILES`.
        local_dir: Download into this folder (then pass the folder as the model id); ``None``: into the Hugging
            Face cache, where a hub id finds it offline.
    """
    words = ["hf", "download", model_id, *files]
    if not files:
        words += [word for pattern in MODEL_PATTERNS for word in ("--include", pattern)]
        words += [word for pattern in SKIPPED_FILES for word in ("--exclude", pattern)]
    if local_dir is not None:
        words += ["--local-dir", local_dir]
    return shlex.join(words)


class ModelLoadError(OSError):
    """A pretrained component could not be loaded (offline, wrong id, missing files)."""


def load_pretrained(cls: type[T], model_id: str, subfolder: str | None = None, what: str = "", **kwargs: Any) -> T:
    """``cls.from_pretrained(model_id, subfolder=...)`` with an actionable error message.

    Args:
        cls: A diffusers or transformers class with ``from_pretrained``.
        model_id: Hub id (e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a local directory.
        subfolder: Subfolder inside the repository or directory (``unet``, ``vae``, ...).
        what: Human-readable name of the config field that holds ``model_id`` for the message.
        **kwargs: Passed to ``from_pretrained``.

    Raises:
        ModelLoadError: Naming the model id, the subfolder and how to provide a local copy.
    """
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
    try:
        return cls.from_pretrained(model_id, **kwargs)  # type: ignore[attr-defined]
    except Exception as err:  # noqa: BLE001 - the hub raises many unrelated types; all mean "not loadable"
        offline = any(os.environ.get(var, "").upper() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        where = f"'{model_id}'" + (f" (subfolder '{subfolder}')" if subfolder else "")
        hint = (
            "HF_HUB_OFFLINE is set, so only the local cache or a local directory can be used. "
            if offline
            else ""
        )
        raise ModelLoadError(
            f"Could not load {cls.__name__} from {where}. {hint}Download the weights once where the hub is "
            f"reachable (`{download_command(model_id, local_dir='DIR')}`) and pass the directory "
            f"instead of the id{' via ' + what if what else ''}. Original error: {type(err).__name__}: {err}"
        ) from err


def check_tokenizer(tokenizer: Any, model_id: str) -> None:
    """Reject a tokenizer that cannot encode ordinary text.

    Offline, ``CLIPTokenizer.from_pretrained(<hub id>)`` can silently return a tokenizer with a
    two-token vocabulary that maps every word to ``<|endoftext|>``; prompts would then all encode to the
    same ids and the "explicit captioner" would silently become an empty prompt.

    Raises:
        ModelLoadError: If the vocabulary is degenerate or a probe sentence encodes to unknown tokens only.
    """
    ids = tokenizer("a photo of a cat", add_special_tokens=False).input_ids
    special = {tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    if len(tokenizer) < 10 or not ids or all(i in special for i in ids):
        raise ModelLoadError(
            f"The tokenizer loaded from '{model_id}' is broken (vocabulary of {len(tokenizer)} tokens; "
            f"'a photo of a cat' encodes to {ids}). This happens offline when the tokenizer files are not in "
            f"the local cache: pass a local directory that holds tokenizer/vocab.json and merges.txt."
        )


def load_weights_file(path: Any, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU: a weights file can never run code when it is read.

    Args:
        path: The file (``.pth`` / ``.pt``).
        what: What the file is, for the message (``"ViT checkpoint"``, ``"head checkpoint"``, ...).

    Raises:
        ValueError: Naming ``what`` and the file: not found, not readable, or holding more than tensors (torch's
            own advice there is ``weights_only=False``; ours is to convert a trusted file once).
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise ValueError(f"could not read the {what} {path}: not found") from err
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"could not read the {what} {path} safely: it holds more than tensors (torch.load with "
            f"weights_only=True: {err}). If it is a trusted checkpoint, convert it once to a plain state dict, e.g. "
            "save the tensors of its 'model' dict with safetensors.torch.save_file, and pass that file."
        ) from err
    except Exception as err:  # noqa: BLE001 - a damaged file raises many types (zip, pickle, storage errors)
        raise ValueError(f"could not read the {what} {path}: {err}") from err
