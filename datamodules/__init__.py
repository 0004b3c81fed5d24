"""Benchmark readers (plain torch Datasets), their protocols, and the thin LightningDataModules."""

from .cub import CUBASICDataset
from .datamodules import (
    CUBDataModule,
    PairDataModule,
    PFPascalDataModule,
    PFWillowDataModule,
    SPairDataModule,
    SyntheticSPairDataModule,
    TSSDataModule,
)
from .pfpascal import PFPascalDataset
from .pfwillow import PFWillowDataset
from .protocols import PROTOCOLS, Protocol, get_protocol
from .spair import SPairDataset, collate_pairs
from .synthetic import write_synthetic_spair
from .tss import TSSDataset

__all__ = [
    "CUBASICDataset",
    "CUBDataModule",
    "PROTOCOLS",
    "PFPascalDataModule",
    "PFPascalDataset",
    "PFWillowDataModule",
    "PFWillowDataset",
    "PairDataModule",
    "Protocol",
    "SPairDataModule",
    "SPairDataset",
    "SyntheticSPairDataModule",
    "TSSDataModule",
    "TSSDataset",
    "collate_pairs",
    "get_protocol",
    "write_synthetic_spair",
]
