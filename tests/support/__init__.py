"""Test support: shared helpers (tiny.py), the local Hub server and the multi-process worker scripts."""
