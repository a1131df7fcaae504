"""The batched engine: K same-shape models trained as one (models, data streams, group runs, the table plan,
its cost model and bench), for `stn engine` on a GPU."""
