"""Offline top-k accuracy metric module for `evaluate`."""
