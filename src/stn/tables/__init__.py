"""Reproducing a table of the paper with `stn train`'s path: planning and resuming its cells, the W&B dashboard,
the parameter-count table."""
