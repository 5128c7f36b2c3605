"""The version of pat_hf."""

__version__ = "0.3.0"
