"""An OSError in words (the wording lives in the pure ``errors``, which the scheduler uses too)."""

from __future__ import annotations

from ociworker.errors import os_error_text

__all__ = ["os_error_text"]
