"""complexity-dist: distributed pretraining for the Complexity (v0.13) decoder family."""

__version__ = "0.1.0"
