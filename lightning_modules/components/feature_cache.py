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
recomputed and replaced, never used, and the log says so.

Writing an entry never leaves half of one where a reader looks: its bytes go to a temporary file named
after the entry, the host and the writing process (``<entry>.<host>.<pid>.partial``), which is then renamed
into place. A writer killed in between (SIGKILL, a crash) leaves only its temporary file; the next run
removes it when it first uses the folder (the writer is dead: same host and no such process, or the file
is over an hour old), so temporaries never accumulate. A write that fails (a full disk, a file-size limit,
a read-only folder) removes its temporary file, stops the disk writes of this cache with one warning that
names the folder and what to do, and the run goes on: its features are computed and used as without the
disk cache, so no number changes.

A relative folder is relative to the run's folder once a LightningModule places it there
(:meth:`FeatureCache.resolve_under`, called in the modules' ``setup``): a run writes nothing into the
working directory unless it is told to.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import socket
import time
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
_CONFIG_METADATA = ("transformers_version", "architectures", "dtype", "torch_dtype")
# ``architectures`` and ``dtype`` are written into a config by save_pretrained and read back by from_pretrained: a
# model built from its config and the same model saved and loaded would otherwise get two keys (the weights'
# dtype is part of the key on its own, ``<name>.dtype``)


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


#: How a writer's temporary file is named: ``<entry>.<host>.<pid>.partial`` (the host with only letters, digits,
#: ``-`` and ``_``). Also matched: a ``.tmpXXXXXX`` file, which safetensors' ``save_file`` (used for writing before)
#: leaves behind when killed.
_TEMPORARY = re.compile(r"^(?P<entry>[0-9a-f]{40}\.safetensors)\.(?:(?P<host>[A-Za-z0-9_-]+)\.)?(?P<pid>\d+)\.partial$")
_LEGACY_TEMPORARY = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")
_FAN_OUT = re.compile(r"^[0-9a-f]{2}$")
#: A temporary file older than this is removed whoever wrote it (one entry is written in seconds).
STALE_AFTER_S = 3600.0


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def temporary_path(path: Path, pid: int | None = None) -> Path:
    """The temporary file a process writes the entry ``path`` to before renaming it into place."""
    return path.with_name(f"{path.name}.{_host()}.{os.getpid() if pid is None else pid}.partial")


def _process_gone(pid: int) -> bool:
    """Whether no live process of this host has ``pid`` (a zombie counts as gone)."""
    if pid <= 0 or pid == os.getpid():
        return pid <= 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: another user's live process
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def _stale_temporary(name: str, mtime: float, now: float) -> bool:
    """Whether the file ``name`` of a fan-out folder is a temporary file nobody will rename any more."""
    match = _TEMPORARY.match(name)
    if match is None and _LEGACY_TEMPORARY.match(name) is None:
        return False
    if now - mtime > STALE_AFTER_S:
        return True
    return match is not None and match["host"] == _host() and _process_gone(int(match["pid"]))


def _write_new(path: Path, data: bytes) -> None:
    """Write ``data`` as the file ``path`` (a temporary file: replaced if a dead writer left one)."""
    with open(path, "wb") as handle:
        handle.write(data)


def _write_failure(directory: Path, flag: str, err: OSError) -> str:
    """The one line a failed disk write is reported with: the folder, the cause, what to do."""
    cause = {
        errno.EFBIG: "a file-size limit was hit (ulimit -f, or the file system's largest file)",
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
    }.get(err.errno or -1, err.strerror or str(err))
    return (
        f"feature cache: cannot write to {directory}: {cause} ({err.strerror or type(err).__name__}); this run goes "
        f"on without storing features on disk (its results are the same; entries already there are still read). "
        f"Give the cache a bigger disk or another folder ({flag} DIR), or none ({flag} null)"
    )


def _nbytes(features: Features) -> int:
    return sum(t.numel() * t.element_size() for t in features)


class FeatureCache:
    """Raw per-image features by key, in memory (bounded, LRU) and optionally on disk.

    Args:
        memory_bytes: Budget of the in-memory cache (tensors stay on the device they were computed on).
            0 disables it.
        directory: Folder of the on-disk cache (created on demand); None disables it. A relative folder is
            taken under the run's folder by :meth:`resolve_under` (the LightningModules call it in ``setup``).
        flag: The command-line flag that sets ``directory``, named by the warning of a failed write.

    Attributes:
        hits: Entries served from memory or disk.
        disk_hits: Entries served from disk.
        rejected: Disk entries found stale or corrupt (and recomputed).
        writes_failed: Whether a disk write failed (a full disk, a file-size limit): no more are tried.
    """

    def __init__(
        self, memory_bytes: int = 4 << 30, directory: str | Path | None = None,
        flag: str = "--model.pipeline.feature_cache_dir",
    ) -> None:
        if memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
        self.memory_bytes = int(memory_bytes)
        self.directory = None if directory is None else Path(directory)
        self.flag = flag
        self._memory: OrderedDict[str, Features] = OrderedDict()
        self._used = 0
        self.hits = self.disk_hits = self.rejected = 0
        self.writes_failed = False
        self._swept = False

    def resolve_under(self, root: str | Path) -> Path | None:
        """Take a relative disk folder under ``root`` (the run's folder), as an absolute path; ``~`` is
        expanded and an absolute folder kept. Returns the folder (None: no disk cache). Nothing is created."""
        if self.directory is None:
            return None
        directory = self.directory.expanduser()
        if not directory.is_absolute():
            directory = Path(root).expanduser().absolute() / directory
        self.directory = directory
        return directory

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

    def _sweep(self) -> None:
        """Once per cache, at its first disk access: remove the temporary files of writers that died."""
        self._swept = True
        assert self.directory is not None
        now, removed = time.time(), 0
        try:
            folders = [e for e in os.scandir(self.directory) if _FAN_OUT.match(e.name) and e.is_dir(follow_symlinks=False)]
            for folder in folders:
                for entry in os.scandir(folder.path):
                    if entry.is_file(follow_symlinks=False) and _stale_temporary(entry.name, entry.stat().st_mtime, now):
                        Path(entry.path).unlink(missing_ok=True)
                        removed += 1
        except OSError:  # no folder yet, or one that cannot be listed: nothing to clean here
            pass
        if removed:
            log.warning("feature cache: removed %d temporary file(s) left by interrupted writes in %s", removed, self.directory)

    def _from_disk(self, key: str, device: torch.device) -> Features | None:
        if self.directory is None:
            return None
        if not self._swept:
            self._sweep()
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
        if self.directory is None or self.writes_failed:
            return
        if not self._swept:
            self._sweep()
        from safetensors.torch import save

        path = self.path_for(key)
        tensors = {str(i): t.detach().to("cpu").contiguous() for i, t in enumerate(features)}
        metadata = {
            "key": key, "format": FORMAT_VERSION, "count": str(len(features)), "checksum": tensors_checksum(tensors.values()),
        }
        data = save(tensors, metadata=metadata)  # the bytes save_file writes
        partial = temporary_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                _write_new(partial, data)
                os.replace(partial, path)  # atomic: readers (other ranks, a later run) never see half a file
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        except OSError as err:  # the cache is an optimisation: the run goes on with the features it computed
            self.writes_failed = True
            log.warning(_write_failure(self.directory, self.flag, err))
