"""bertq's benchmarks: `python -m bench` (or `make bench`) measures, side by side in one run, and
writes BENCHMARKS.md."""
