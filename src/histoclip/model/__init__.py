"""The user-facing model class."""

from ._histoclip import HistoCLIP, default_max_epochs

__all__ = ["HistoCLIP", "default_max_epochs"]
