"""Benchmark readers (plain torch Datasets) and the LightningDataModules that wrap them."""

from .spair import SPairDataModule, SPairDataset, collate_pairs
from .synthetic import SyntheticSPairDataModule, write_synthetic_spair

__all__ = ["SPairDataModule", "SPairDataset", "SyntheticSPairDataModule", "collate_pairs", "write_synthetic_spair"]
