"""The user-facing model class."""

from ._histoclip import HistoCLIP

__all__ = ["HistoCLIP"]
