"""The errors pat_hf raises that users catch: a training loss that went NaN/infinite, a push the Hub refused."""

from __future__ import annotations

from huggingface_hub.errors import HfHubHTTPError

__all__ = ["HubPushError", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A loss component became NaN or infinite; training stops before the weights or checkpoints are hit."""


class HubPushError(HfHubHTTPError):
    """A push the Hub refused (rejected or missing token, no write access, no such repo), saying what to change.

    It keeps the Hub's response, so ``except HfHubHTTPError`` still catches it.
    """
