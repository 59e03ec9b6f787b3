"""The version of ociworker (a leaf: the CLI, the daemon's Info and the package root read it)."""

__version__ = "0.1.0"
