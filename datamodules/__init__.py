"""Benchmark readers (plain torch Datasets), their protocols, and the thin LightningDataModules."""

from .datamodules import PairDataModule, SPairDataModule, SyntheticSPairDataModule, TSSDataModule
from .protocols import PROTOCOLS, Protocol, get_protocol
from .spair import SPairDataset, collate_pairs
from .synthetic import write_synthetic_spair

__all__ = [
    "PROTOCOLS",
    "PairDataModule",
    "Protocol",
    "SPairDataModule",
    "SPairDataset",
    "SyntheticSPairDataModule",
    "TSSDataModule",
    "collate_pairs",
    "get_protocol",
    "write_synthetic_spair",
]
