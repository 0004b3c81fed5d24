"""Evaluation order and samplers: pairs that share images run close together, N processes score each pair once.

* :func:`image_grouped_order` orders a benchmark's pairs so that pairs sharing an image are consecutive (a
  per-image feature cache, or a batch that extracts each distinct image once, then hits).
* :class:`OrderedSampler` walks that order in one process.
* :class:`ContiguousDistributedSampler` splits the same order into contiguous, UNPADDED, batch-aligned chunks,
  one per process. Lightning's own ``DistributedSampler`` pads the last batches with duplicates, which would
  bias an evaluation; because ours subclasses ``DistributedSampler``, Lightning keeps it
  (``_DataConnector._requires_distributed_sampler`` checks ``isinstance(sampler, DistributedSampler)``).
  Batch-aligned chunks give every process exactly the batches of the single-process run, so even batched
  feature extraction sees the same inputs, and the chunks concatenated in rank order are the 1-process order.
* :class:`EpochShuffleSampler` shuffles a training split in one process, reproducibly and anew every epoch (the
  same permutation as a 1-replica ``DistributedSampler(shuffle=True, seed=seed)``).
* :class:`PairDataLoader` yields one EMPTY batch on a process whose chunk is empty (fewer pairs than
  processes): Lightning skips the whole test loop, hooks included, on a process with zero batches, and that
  process would then never join the collectives (metric sync, gathering predictions) the others wait in.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

__all__ = [
    "ContiguousDistributedSampler",
    "EpochShuffleSampler",
    "OrderedSampler",
    "PairDataLoader",
    "collate_pairs",
    "contiguous_bounds",
    "dataset_pair_ids",
    "dataset_pair_images",
    "image_grouped_order",
]

PairImages = tuple[str, str, str]
"""``(category, source image key, target image key)`` of one pair."""


def dataset_pair_images(dataset: Any) -> list[PairImages] | None:
    """The ``(category, source image, target image)`` keys of every pair of ``dataset``, in dataset order.

    Read from the dataset's ``pair_images()`` (the readers of this package implement it from their parsed
    annotations, so no image is decoded); None when the dataset has no such method.
    """
    method = getattr(dataset, "pair_images", None)
    if not callable(method):
        return None
    return [(str(c), str(s), str(t)) for c, s, t in method()]


def dataset_pair_ids(dataset: Any) -> list[str] | None:
    """The pair ids of ``dataset`` in dataset order (its ``pair_ids``), or None when it does not expose them."""
    pair_ids = getattr(dataset, "pair_ids", None)
    if pair_ids is None:
        return None
    return [str(p) for p in (pair_ids() if callable(pair_ids) else pair_ids)]


def image_grouped_order(pairs: Sequence[PairImages]) -> list[int]:
    """An evaluation order of pair indices that keeps pairs sharing an image next to each other.

    Categories are visited in sorted order (pairs of different categories never share an image). Within a
    category, a greedy walk: the next pair is a pending pair that shares an image with the last one; failing
    that, one that touches the earliest seen image that still has pending pairs; failing that, the first
    pending pair. Among such candidates, a pair whose images are all seen already (no new feature pass)
    wins, then the first by (source, target) key. Consecutive pairs therefore share an image wherever the
    walk allows it, and images are revisited while they are recent. ``O(P log P)`` for ``P`` pairs.

    Args:
        pairs: ``(category, source image key, target image key)`` per pair, in dataset order.

    Returns:
        A permutation of ``range(len(pairs))``; deterministic (a function of ``pairs`` only, the same in
        every process).
    """
    by_category: dict[str, list[int]] = defaultdict(list)
    for index, (category, _, _) in enumerate(pairs):
        by_category[category].append(index)
    order: list[int] = []
    for category in sorted(by_category):
        order += _grouped_walk(pairs, sorted(by_category[category], key=lambda i: (pairs[i][1], pairs[i][2], i)))
    return order


def _grouped_walk(pairs: Sequence[PairImages], members: list[int]) -> list[int]:
    """:func:`image_grouped_order` within one category; ``members`` sorted by (source, target) key."""
    rank = {index: position for position, index in enumerate(members)}
    # image -> its pending pairs in rank order (a dict as an ordered set: emitted pairs leave in O(1))
    pending: dict[str, dict[int, None]] = defaultdict(dict)
    for index in members:
        for image in pairs[index][1:]:
            pending[image][index] = None
    closed: dict[str, list[tuple[int, int]]] = defaultdict(list)  # image -> heap of its pairs with all images seen
    seen: set[str] = set()
    seen_queue: deque[str] = deque()  # images in the order they were first seen
    done: set[int] = set()
    order: list[int] = []

    def best_touching(image: str) -> tuple[int, int] | None:
        """(cost, rank) of the best pending pair touching a seen ``image``: a closed one costs 0, others 1."""
        heap = closed[image]
        while heap and heap[0][1] in done:
            heapq.heappop(heap)
        if heap:
            return 0, heap[0][0]
        first = next(iter(pending[image]), None)
        return None if first is None else (1, rank[first])

    cursor = 0  # into members: no pair before it is pending
    while len(order) < len(members):
        last_images = set(pairs[order[-1]][1:]) if order else set()
        options = [o for o in map(best_touching, sorted(last_images)) if o is not None]
        if not options:
            while seen_queue and best_touching(seen_queue[0]) is None:
                seen_queue.popleft()
            option = best_touching(seen_queue[0]) if seen_queue else None
            options = [] if option is None else [option]
        if options:
            chosen = members[min(options)[1]]
        else:  # nothing pending touches a seen image: start anew from the first pending pair
            while members[cursor] in done:
                cursor += 1
            chosen = members[cursor]
        order.append(chosen)
        done.add(chosen)
        for image in pairs[chosen][1:]:
            pending[image].pop(chosen, None)
        for image in dict.fromkeys(pairs[chosen][1:]):
            if image in seen:
                continue
            seen.add(image)
            seen_queue.append(image)
            for index in pending[image]:  # pairs whose last unseen image this was are now closed
                if all(other in seen for other in pairs[index][1:]):
                    for other in dict.fromkeys(pairs[index][1:]):
                        heapq.heappush(closed[other], (rank[index], index))
    return order


def contiguous_bounds(num_items: int, num_replicas: int, rank: int, batch_size: int = 1) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s contiguous chunk when ``num_items`` are split over ``num_replicas``.

    Whole batches of ``batch_size`` are split: chunk sizes differ by at most one batch, the last chunks may
    be empty (fewer batches than replicas), and the chunks in rank order tile ``range(num_items)``.

    Args:
        num_items: Number of items to split.
        num_replicas: Number of processes.
        rank: This process's rank, ``0 <= rank < num_replicas``.
        batch_size: Items per batch (chunk boundaries fall on batch boundaries of the 1-process run).
    """
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_batches = math.ceil(num_items / batch_size)
    base, extra = divmod(num_batches, num_replicas)
    first = rank * base + min(rank, extra)
    count = base + (1 if rank < extra else 0)
    return min(first * batch_size, num_items), min((first + count) * batch_size, num_items)


def _check_order(order: Sequence[int] | None, size: int) -> list[int]:
    """``order`` as ints: distinct indices of ``range(size)``, all of them or some (a resumed run evaluates
    only its unfinished pairs); None: every index in dataset order."""
    if order is None:
        return list(range(size))
    order = [int(i) for i in order]
    if len(set(order)) != len(order) or not all(0 <= i < size for i in order):
        raise ValueError(f"order must be a permutation of range({size}) or of part of it (a resumed run's unfinished "
                         f"pairs); got {len(order)} indices, {len(order) - len(set(order))} repeated, "
                         f"{sum(not 0 <= i < size for i in order)} outside it")
    return order


class OrderedSampler(Sampler[int]):
    """Yields the dataset indices of a fixed order (one process).

    Args:
        order: A permutation of ``range(len(dataset))``.
    """

    def __init__(self, order: Sequence[int]) -> None:
        self.order = [int(i) for i in order]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class EpochShuffleSampler(Sampler[int]):
    """A reproducible shuffle that changes every epoch (one process).

    Epoch ``e`` yields ``torch.randperm(len(data_source))`` drawn from a generator seeded with ``seed + e``:
    the same permutation as ``DistributedSampler(data_source, num_replicas=1, rank=0, shuffle=True, seed=seed)``
    after ``set_epoch(e)``. Lightning calls :meth:`set_epoch` at the start of every training epoch on any
    sampler that has it.

    Args:
        data_source: The dataset (only its length is used).
        seed: Base seed of the permutations.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        self.num_items = len(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` for the next iteration."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_items, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_items


class ContiguousDistributedSampler(DistributedSampler):
    """Unpadded distributed evaluation sampler: ``rank`` gets one contiguous, batch-aligned chunk of ``order``.

    Unlike ``DistributedSampler`` nothing is repeated or dropped: the chunks of all ranks together hold every
    index of ``order`` exactly once (see :func:`contiguous_bounds`); a rank may get none. ``shuffle`` is off and
    :meth:`set_epoch` has no effect on the order.

    Args:
        dataset: The evaluated dataset (only its length is used).
        order: Evaluation order: distinct indices of ``range(len(dataset))``, all of them or, when a run is
            resumed, only the unfinished ones (default: every index in dataset order).
        num_replicas: Number of processes (default: the process group's world size).
        rank: This process's rank (default: its rank in the process group).
        batch_size: The DataLoader's batch size, so that chunk boundaries are batch boundaries.
    """

    def __init__(
        self,
        dataset: Dataset,
        order: Sequence[int] | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        batch_size: int = 1,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.order = _check_order(order, len(dataset))  # type: ignore[arg-type]
        self.batch_size = int(batch_size)
        self.start, self.stop = contiguous_bounds(len(self.order), self.num_replicas, self.rank, self.batch_size)
        # the parent's padded bookkeeping, overwritten with the unpadded truth
        self.num_samples = self.stop - self.start
        self.total_size = len(self.order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order[self.start : self.stop])

    def __len__(self) -> int:
        return self.stop - self.start


class PairDataLoader(DataLoader):
    """A DataLoader that yields a single empty batch (``collate_fn([])``) when its sampler yields nothing.

    Lightning skips the test loop of a process with zero batches, hooks included, so that process would
    never enter the collectives of ``on_test_epoch_end`` / ``on_test_end`` and the others would wait for it
    forever. With one empty batch it runs the loop like everyone else and contributes nothing. The
    ``collate_fn`` must accept an empty list (``datamodules.spair.collate_pairs`` does), and so must
    ``test_step``.
    """

    def _empty(self) -> bool:
        return super().__len__() == 0

    def __len__(self) -> int:
        return 1 if self._empty() else super().__len__()

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if self._empty():
            return iter([self.collate_fn([])])
        return super().__iter__()


def collate_pairs(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Identity collate: pairs keep their own image sizes (the model resizes).

    Args:
        samples: Pair samples of any reader.

    Returns:
        The same list of sample dicts.
    """
    return list(samples)
