"""The library version, recorded in every file surgical writes."""

__version__ = "0.1.0"
