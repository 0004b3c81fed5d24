# Two entry points that work on a fresh machine (Python 3.11, no GPU, no model hub).
.PHONY: setup demo test test-slow

setup:
	bash scripts/setup_env.sh

demo: setup
	HF_HUB_OFFLINE=1 .venv/bin/python evaluate.py test --config configs/demo.yaml

test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q

test-slow: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m slow
