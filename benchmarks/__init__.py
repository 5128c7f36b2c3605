"""pat_hf's benchmarks and studies (beside the library, not part of the installed package).

The scripts here run from the repository root (``python benchmarks/<script>.py``); the package form lets the
tests import their machinery (``benchmarks.fashion_mnist``).
"""
