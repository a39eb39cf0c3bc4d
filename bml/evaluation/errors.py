"""The error of an evaluation that cannot report an accuracy."""
from __future__ import annotations


class EvaluationError(ValueError):
    """A model that cannot be evaluated; the message says why and what to try."""
