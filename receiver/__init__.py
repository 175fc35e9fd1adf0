"""episode-ingest receiver: accepts episodes only from hosts running recent code."""

__version__ = "0.1.0"
