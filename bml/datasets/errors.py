"""The data layer's error, at the bottom of the data layer: every module of it may raise one."""
from __future__ import annotations

DATA_HELP = "see README, section Data"
"""Where the layouts of the data sets are explained; data errors end by pointing there."""


class DatasetError(ValueError):
    """A data problem the user can fix; the message says what is wrong and what to do."""
