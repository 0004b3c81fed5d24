"""The paper in one command (``scripts/reproduce.py``): fetch and verify the data and weights, run the paper's rows
on each benchmark, compare with the paper's numbers. Data files: ``datasets.yaml`` (URLs, archives, layouts) and
``paper_numbers.yaml`` (the paper's numbers with their table and row)."""

from __future__ import annotations

from pathlib import Path


def write_output(path: Path, text: str) -> None:
    """Write a file of the reproduction whole or not at all (the project's
    :func:`lightning_modules.components.files.write_atomically`: a temporary name, then a rename), so a full disk
    or a killed process never leaves a torn ``reproduction.json``, command record or checksum record."""
    from lightning_modules.components.files import write_atomically  # on first write: it imports the core

    write_atomically(path, text)
