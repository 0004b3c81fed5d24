"""Benchmarks: per file a reader (a plain torch Dataset) and its thin LightningDataModule; their protocols."""

from .base import PairDataModule
from .cub import CUBASICDataset, CUBDataModule
from .davis import (
    DAVISDataModule,
    DAVISDataset,
    DAVISInstancePairs,
    DAVISSwapDataModule,
    SyntheticDAVISDataModule,
    write_synthetic_davis,
)
from .masked_pairs import MaskedPairsDataModule, MaskedPairsDataset, write_synthetic_masked_pairs
from .own_images import ImagePairsDataModule, ImagePairsDataset, read_image_pairs
from .pfpascal import PFPascalDataModule, PFPascalDataset
from .pfwillow import PFWillowDataModule, PFWillowDataset
from .protocols import PROTOCOLS, Protocol, get_protocol
from .samplers import collate_pairs
from .spair import SPairDataModule, SPairDataset
from .synthetic import SyntheticSPairDataModule, write_synthetic_spair
from .tss import TSSDataModule, TSSDataset

__all__ = [
    "CUBASICDataset",
    "CUBDataModule",
    "DAVISDataModule",
    "DAVISDataset",
    "DAVISInstancePairs",
    "DAVISSwapDataModule",
    "ImagePairsDataModule",
    "ImagePairsDataset",
    "MaskedPairsDataModule",
    "MaskedPairsDataset",
    "PROTOCOLS",
    "PFPascalDataModule",
    "PFPascalDataset",
    "PFWillowDataModule",
    "PFWillowDataset",
    "PairDataModule",
    "Protocol",
    "SPairDataModule",
    "SPairDataset",
    "SyntheticDAVISDataModule",
    "SyntheticSPairDataModule",
    "TSSDataModule",
    "TSSDataset",
    "collate_pairs",
    "get_protocol",
    "read_image_pairs",
    "write_synthetic_davis",
    "write_synthetic_masked_pairs",
    "write_synthetic_spair",
]
