"""Benchmark readers (plain torch Datasets), their protocols, and the thin LightningDataModules."""

from .cub import CUBASICDataset
from .datamodules import (
    CUBDataModule,
    DAVISDataModule,
    DAVISSwapDataModule,
    MaskedPairsDataModule,
    PairDataModule,
    PFPascalDataModule,
    PFWillowDataModule,
    SPairDataModule,
    SyntheticDAVISDataModule,
    SyntheticSPairDataModule,
    TSSDataModule,
)
from .davis import DAVISDataset, DAVISInstancePairs, write_synthetic_davis
from .masked_pairs import MaskedPairsDataset, write_synthetic_masked_pairs
from .pfpascal import PFPascalDataset
from .pfwillow import PFWillowDataset
from .protocols import PROTOCOLS, Protocol, get_protocol
from .spair import SPairDataset, collate_pairs
from .synthetic import write_synthetic_spair
from .tss import TSSDataset

__all__ = [
    "CUBASICDataset",
    "CUBDataModule",
    "DAVISDataModule",
    "DAVISDataset",
    "DAVISInstancePairs",
    "DAVISSwapDataModule",
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
    "write_synthetic_davis",
    "write_synthetic_masked_pairs",
    "write_synthetic_spair",
]
