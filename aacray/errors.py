"""The one error every job raises for inputs it refuses before doing any work.

A `BadInputError` names the offending items and the fix; `jobs/*.py` turn it into exit
code 2 (nothing ran). Narrower errors of the pure modules (a bad config key, an audio file
that cannot be decoded, an unusable checkpoint) keep their own classes, all `ValueError`s.
"""

from __future__ import annotations


class BadInputError(ValueError):
    """Inputs a job refuses before it runs; the message names the items and the fix."""


class CheckpointError(ValueError):
    """A checkpoint (aacray's own folder or a CoNeTTE model folder) that cannot be used; the
    message says which file or key and why. Defined here, not in aacray/checkpoint.py, so
    that aacray/conette_model.py raises it without importing the module that dispatches
    to it."""
