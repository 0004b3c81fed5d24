"""Run the CLI once per argument list of a JSON file, in this one process (or process group).

    python tests/scripts/run_eval.py RUNS.json [EXTRA_ARG ...]

``RUNS.json`` holds a list of argument lists: ``evaluate.py test`` arguments without the subcommand, or a
list starting with a subcommand (``fit``, ``validate``, ``test``: ``train.py`` and ``evaluate.py`` are the
same CLI); ``EXTRA_ARG`` are appended to every run, e.g. ``--trainer.devices 2 --trainer.strategy ddp``.

Why a script: ``strategy="ddp"`` re-launches ``sys.argv`` for the other ranks, which inside pytest would run
pytest again; launched from this script, every rank runs this script with the same arguments and hence the
same runs in the same order. Several runs share one process (group) so the imports are paid once: after the
first run the process group stays initialised and Lightning launches no further processes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repository's top-level modules (evaluate.py) are not installed

import evaluate  # noqa: E402

SUBCOMMANDS = ("fit", "validate", "test")


def main(argv: list[str]) -> None:
    """Run every argument list of ``argv[0]`` (JSON), each extended by ``argv[1:]``."""
    if not argv:
        raise SystemExit(__doc__)
    runs = json.loads(Path(argv[0]).read_text())
    for args in runs:
        command = args if args and args[0] in SUBCOMMANDS else ["test", *args]
        evaluate.main([*command, *argv[1:]])


if __name__ == "__main__":
    main(sys.argv[1:])
