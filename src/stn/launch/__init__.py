"""Running trainings: executors (local processes, Slurm, in-process), the job shape, `stn train -m` sweeps."""
