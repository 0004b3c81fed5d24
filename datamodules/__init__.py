"""Benchmarks: per file a reader (a plain torch Dataset) and its thin LightningDataModule; their protocols.

The names are imported on first use (module ``__getattr__``, as in :mod:`lightning_modules`): a light submodule
(:mod:`datamodules.own_image_paths`, standard library only) is then imported without torch and Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_modules.lazy import lazy_names

#: Each public name and the submodule that defines it.
_WHERE = {
    "CUBASICDataset": ".cub",
    "CUBDataModule": ".cub",
    "DAVISDataModule": ".davis",
    "DAVISDataset": ".davis",
    "DAVISInstancePairs": ".davis",
    "DAVISSwapDataModule": ".davis",
    "ImagePairsDataModule": ".own_images",
    "ImagePairsDataset": ".own_images",
    "MaskedPairsDataModule": ".masked_pairs",
    "MaskedPairsDataset": ".masked_pairs",
    "PFPascalDataModule": ".pfpascal",
    "PFPascalDataset": ".pfpascal",
    "PFWillowDataModule": ".pfwillow",
    "PFWillowDataset": ".pfwillow",
    "PROTOCOLS": ".protocols",
    "PairDataModule": ".base",
    "Protocol": ".protocols",
    "SPairDataModule": ".spair",
    "SPairDataset": ".spair",
    "SyntheticDAVISDataModule": ".davis",
    "SyntheticSPairDataModule": ".synthetic",
    "TSSDataModule": ".tss",
    "TSSDataset": ".tss",
    "collate_pairs": ".samplers",
    "get_protocol": ".protocols",
    "read_image_pairs": ".own_images",
    "write_synthetic_davis": ".davis",
    "write_synthetic_masked_pairs": ".masked_pairs",
    "write_synthetic_spair": ".synthetic",
}

__all__ = sorted(_WHERE)

if TYPE_CHECKING:
    from .base import PairDataModule
    from .cub import CUBASICDataset
    from .cub import CUBDataModule
    from .davis import DAVISDataModule
    from .davis import DAVISDataset
    from .davis import DAVISInstancePairs
    from .davis import DAVISSwapDataModule
    from .davis import SyntheticDAVISDataModule
    from .davis import write_synthetic_davis
    from .masked_pairs import MaskedPairsDataModule
    from .masked_pairs import MaskedPairsDataset
    from .masked_pairs import write_synthetic_masked_pairs
    from .own_images import ImagePairsDataModule
    from .own_images import ImagePairsDataset
    from .own_images import read_image_pairs
    from .pfpascal import PFPascalDataModule
    from .pfpascal import PFPascalDataset
    from .pfwillow import PFWillowDataModule
    from .pfwillow import PFWillowDataset
    from .protocols import PROTOCOLS
    from .protocols import Protocol
    from .protocols import get_protocol
    from .samplers import collate_pairs
    from .spair import SPairDataModule
    from .spair import SPairDataset
    from .synthetic import SyntheticSPairDataModule
    from .synthetic import write_synthetic_spair
    from .tss import TSSDataModule
    from .tss import TSSDataset


__getattr__, __dir__ = lazy_names(__name__, _WHERE)
