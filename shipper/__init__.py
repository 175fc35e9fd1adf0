"""episode-ingest shipper: the lab-host daemon that packs and uploads finished episodes."""

__version__ = "0.1.0"
