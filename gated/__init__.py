"""gated: a gate controller daemon for parking facilities."""

__version__ = "0.1.0"
