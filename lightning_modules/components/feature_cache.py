"""Per-image raw features, computed once per (image, feature config) and reused across pairs and runs.

The expensive step of the method is the per-image UNet / ViT pass; everything after it (co-PCA, fusion,
matching) is per pair and cheap. A benchmark pairs every image with many others, so features are kept:

- in memory, least-recently-used first out, bounded in bytes (pairs are ordered so that pairs sharing an
  image are close, see ``datamodules``);
- optionally on disk, one safetensors file per (image, feature config), so a second run (another
  ablation row, a resumed run, another metric) does no extraction at all.

A key is the image's content hash plus the featurizer's fingerprint (its class, extraction settings,
model configs, a digest of its weights, the numeric precision, and the prompt where the features depend
on one); it is canonical (sorted, without the config entries that depend on the process or the download
folder), so a new process finds what an earlier one stored. A disk entry stores its full key, a format
version and a checksum of its tensor bytes in the file's metadata; an entry whose metadata does not match
(stale), that cannot be read (corrupt, truncated) or whose bytes do not match the checksum (damaged) is
recomputed and replaced, never used, and the log says so. Files are written to a temporary name and renamed, so an interrupted run leaves no partial
entry behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FeatureCache", "config_digest", "featurizer_fingerprint", "image_digest", "weights_digest"]

log = logging.getLogger(__name__)

#: Bumped whenever the meaning of a stored entry changes; entries of another version are recomputed.
#: 2: the implicit captioner sees each sliding-window crop and adds its time term in prompt mode too; a
#: checksum of the tensor bytes is stored with every entry and checked on read.
FORMAT_VERSION = "2"

Features = tuple[torch.Tensor, ...]


def image_digest(image: torch.Tensor) -> str:
    """Content hash of a uint8 ``[3, H, W]`` image (shape included)."""
    array = image.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str((tuple(array.shape), str(array.dtype))).encode())
    digest.update(array.numpy().tobytes())
    return digest.hexdigest()


#: Model-config entries that describe how a config was made, not the model: diffusers' ``_use_default_values``
#: (a list built from a set, so its order changes with Python's hash seed), ``_name_or_path`` (where the model
#: was loaded from), library versions. The weights digest identifies the model; these would only make a key
#: differ between processes, machines or download folders.
_CONFIG_METADATA = ("transformers_version",)


def model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A model config without its metadata entries (keys starting with ``_``, :data:`_CONFIG_METADATA`)."""
    return {k: v for k, v in config.items() if not str(k).startswith("_") and k not in _CONFIG_METADATA}


def _canonical(value: Any) -> Any:
    """``value`` with sets and frozensets sorted, so that its JSON text is the same in every process."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True, default=str))
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def tensors_checksum(tensors: Iterable[torch.Tensor]) -> str:
    """Digest of the bytes, dtypes and shapes of CPU tensors (stored with a disk entry, checked on read)."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        flat = tensor.detach().contiguous().reshape(-1)
        digest.update(f"{tuple(tensor.shape)}:{tensor.dtype}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def config_digest(config: Mapping[str, Any]) -> str:
    """Stable hash of a JSON-able settings mapping (non-JSON values by their ``str``), the same in every
    process: keys sorted, sets sorted."""
    text = json.dumps(_canonical(config), sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@torch.no_grad()
def weights_digest(modules: Iterable[nn.Module | None], samples: int = 1024) -> str:
    """A cheap fingerprint of the weights of ``modules``: per tensor its name, shape, dtype, ``samples``
    evenly spaced values and the sum of all values (on the tensor's device).

    Changed weights (another checkpoint, a fine-tune) change it with overwhelming probability, without
    hashing gigabytes of parameters byte by byte: about a second for SD-1.5 on a CPU.
    """
    digest = hashlib.blake2b(digest_size=16)
    for index, module in enumerate(modules):
        if module is None:
            continue
        stats, names = [], []
        for name, tensor in module.state_dict().items():
            if not torch.is_tensor(tensor) or not tensor.is_floating_point():
                continue
            flat = tensor.detach().reshape(-1)
            picked = flat[:: max(1, flat.numel() // samples)][:samples].float()
            stats.append(torch.cat([picked, flat.sum(dtype=torch.float32).view(1)]).cpu())
            names.append(f"{index}.{name}:{tuple(tensor.shape)}:{tensor.dtype}")
        digest.update("|".join(names).encode())
        if stats:
            digest.update(torch.cat(stats).numpy().tobytes())
    return digest.hexdigest()


def featurizer_fingerprint(
    kind: str, settings: Mapping[str, Any], modules: Mapping[str, nn.Module | None], digests: dict[str, str]
) -> str:
    """The cache identity of a featurizer: its kind, extraction settings, model configs and weights.

    Args:
        kind: Featurizer class name.
        settings: Extraction settings (JSON-able).
        modules: Name -> module whose ``config`` (if any) and weights the features depend on.
        digests: A memo shared by featurizers with the same weights (variants), so each set of weights is
            digested once.
    """
    configs = {}
    for name, module in modules.items():
        config = getattr(module, "config", None)
        if config is not None:
            configs[name] = model_config(config.to_dict() if hasattr(config, "to_dict") else dict(config))
        if module is not None and name not in digests:
            digests[name] = weights_digest([module])
        if module is not None:
            configs[f"{name}.weights"] = digests[name]
            configs[f"{name}.dtype"] = str(next(iter(module.parameters()), torch.empty(0)).dtype)
    return config_digest({"kind": kind, "settings": dict(settings), "models": configs})


def _nbytes(features: Features) -> int:
    return sum(t.numel() * t.element_size() for t in features)


class FeatureCache:
    """Raw per-image features by key, in memory (bounded, LRU) and optionally on disk.

    Args:
        memory_bytes: Budget of the in-memory cache (tensors stay on the device they were computed on).
            0 disables it.
        directory: Folder of the on-disk cache (created on demand); None disables it.

    Attributes:
        hits: Entries served from memory or disk.
        disk_hits: Entries served from disk.
        rejected: Disk entries found stale or corrupt (and recomputed).
    """

    def __init__(self, memory_bytes: int = 4 << 30, directory: str | Path | None = None) -> None:
        if memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
        self.memory_bytes = int(memory_bytes)
        self.directory = None if directory is None else Path(directory)
        self._memory: OrderedDict[str, Features] = OrderedDict()
        self._used = 0
        self.hits = self.disk_hits = self.rejected = 0

    def __len__(self) -> int:
        return len(self._memory)

    @property
    def used_bytes(self) -> int:
        """Bytes held in memory."""
        return self._used

    def fetch(
        self, keys: Sequence[str], compute: Callable[[list[int]], list[Features]], device: torch.device
    ) -> tuple[list[Features], int]:
        """The features of every key, computing only those found neither in memory nor on disk.

        Args:
            keys: One key per item (see :func:`entry_key`).
            compute: Given the indices of the missing items, returns their features (one call, batched).
            device: Where features read from disk are placed.

        Returns:
            ``(features per key, number of items computed)``.
        """
        found: dict[int, Features] = {}
        missing: list[int] = []
        for i, key in enumerate(keys):
            hit = self._from_memory(key)
            if hit is None:
                hit = self._from_disk(key, device)
            if hit is None:
                missing.append(i)
            else:
                found[i] = hit
        self.hits += len(found)
        first_index: dict[str, int] = {}
        for i in missing:  # a key asked for twice in one call is computed once
            first_index.setdefault(keys[i], i)
        if first_index:
            computed = dict(zip(first_index, compute(list(first_index.values()))))
            for key, features in computed.items():
                self._to_disk(key, features)
                self._to_memory(key, features)
            for i in missing:
                found[i] = computed[keys[i]]
        return [found[i] for i in range(len(keys))], len(first_index)

    # ------------------------------------------------------------------------------------------- memory

    def _from_memory(self, key: str) -> Features | None:
        features = self._memory.get(key)
        if features is not None:
            self._memory.move_to_end(key)
        return features

    def _to_memory(self, key: str, features: Features) -> None:
        size = _nbytes(features)
        if size > self.memory_bytes or key in self._memory:
            return
        while self._used + size > self.memory_bytes and self._memory:
            _, evicted = self._memory.popitem(last=False)
            self._used -= _nbytes(evicted)
        self._memory[key] = features
        self._used += size

    # --------------------------------------------------------------------------------------------- disk

    def path_for(self, key: str) -> Path:
        """The disk entry of ``key`` (two-level fan-out keeps folders small)."""
        assert self.directory is not None
        name = hashlib.blake2b(key.encode(), digest_size=20).hexdigest()
        return self.directory / name[:2] / f"{name}.safetensors"

    def _from_disk(self, key: str, device: torch.device) -> Features | None:
        if self.directory is None:
            return None
        path = self.path_for(key)
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                meta = handle.metadata() or {}
                if meta.get("key") != key or meta.get("format") != FORMAT_VERSION:
                    raise ValueError(f"stale entry (format {meta.get('format')!r}, another key)")
                count = int(meta["count"])
                stored = tuple(handle.get_tensor(str(i)) for i in range(count))
            if meta.get("checksum") != tensors_checksum(stored):
                raise ValueError("checksum mismatch: the stored tensor bytes are damaged")
            features = tuple(t.to(device) for t in stored)
        except Exception as err:  # noqa: BLE001 - a broken file can fail in many ways; all mean "recompute"
            self.rejected += 1
            log.warning("feature cache: recomputing %s (%s: %s)", path, type(err).__name__, err)
            return None
        self.disk_hits += 1
        self._to_memory(key, features)
        return features

    def _to_disk(self, key: str, features: Features) -> None:
        if self.directory is None:
            return
        from safetensors.torch import save_file

        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {str(i): t.detach().to("cpu").contiguous() for i, t in enumerate(features)}
        metadata = {
            "key": key, "format": FORMAT_VERSION, "count": str(len(features)), "checksum": tensors_checksum(tensors.values()),
        }
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, path)  # atomic: readers (other ranks, a later run) never see half a file
