"""edge-agent: the device side of edgekit (runs bundles, measures, reports)."""

__version__ = "0.1.0"
