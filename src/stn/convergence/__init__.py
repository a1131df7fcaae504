"""The convergence study: error against training budget (the study record, its runner, plots, extrapolation)."""
