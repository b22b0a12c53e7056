"""The pure core of vmcluster: no I/O, no clocks, no randomness."""
