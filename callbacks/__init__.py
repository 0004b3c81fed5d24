"""Lightning callbacks: output writers and visualisation."""

from .prediction_writer import CorrespondenceWriter, format_pck_table

__all__ = ["CorrespondenceWriter", "format_pck_table"]
