"""stn: a reference reproduction of Spatial Transformer Networks (Jaderberg et al., NIPS 2015) on distorted MNIST.

A regular package (not an implicit namespace one), so that no folder named `stn` in the working directory can
join it: `python -m stn` always runs this package. The version is said here once; pyproject.toml reads it.
"""

__version__ = "0.1.0"
