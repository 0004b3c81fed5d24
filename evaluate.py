"""Evaluate correspondence models with ``trainer.test`` (LightningCLI, omegaconf mode).

    python evaluate.py test --config configs/demo.yaml
    python evaluate.py test --config configs/spair.yaml --data.root /data/SPair-71k
    python evaluate.py test --config configs/spair.yaml --config configs/overlays/tiny.yaml --data.root DIR
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cli import build_cli, run_script

if TYPE_CHECKING:  # Lightning is imported once the command line's input paths are checked (cli.run_script)
    from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the evaluation CLI (``args`` defaults to ``sys.argv``)."""
    return build_cli(args)


if __name__ == "__main__":
    run_script(main)  # SIGTERM: exit 143 and the resume command; errors: one paragraph (SD_DINO_DEBUG=1: traceback)
