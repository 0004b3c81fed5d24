"""Train a learned projection head on frozen, cached features with ``trainer.fit`` (LightningCLI, omegaconf mode).

    python train.py fit --config configs/projection/sd_dinov2_b.yaml --data.root /data/SPair-71k
    python train.py fit --config configs/projection/sd_dinov2_b.yaml --config configs/overlays/tiny.yaml   # smoke run
    python train.py fit --config ... --ckpt_path outputs/projection/.../last.ckpt                       # resume

The best checkpoint (by val PCK@0.1) then evaluates through
``evaluate.py test --config configs/spair.yaml --model.pipeline.projection_ckpt PATH``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cli import build_cli, run_script

if TYPE_CHECKING:  # Lightning is imported once the command line's input paths are checked (cli.run_script)
    from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the training CLI (``args`` defaults to ``sys.argv``)."""
    return build_cli(args)


if __name__ == "__main__":
    run_script(main)  # SIGTERM: exit 143 and the resume command; errors: one paragraph (SD_DINO_DEBUG=1: traceback)
