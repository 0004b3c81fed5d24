"""The paper in one command (``scripts/reproduce.py``): fetch and verify the data and weights, run the paper's rows
on each benchmark, compare with the paper's numbers. Data files: ``datasets.yaml`` (URLs, archives, layouts) and
``paper_numbers.yaml`` (the paper's numbers with their table and row)."""
