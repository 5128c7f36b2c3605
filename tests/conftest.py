"""Shared fixtures. The helpers they use (tiny models, datasets, arguments) live in support/tiny.py; the Hub
server and the worker scripts of the multi-process tests in support/ too."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import datasets
import pytest

from support.tiny import make_image_dataset


@pytest.fixture
def image_dataset() -> datasets.Dataset:
    return make_image_dataset()
