"""Speed figures as ratios measured in one run: run as `python benchmarks/NAME.py` or `python -m prunedrive.benchmarks.NAME`."""
