"""The control plane of the failover gateway."""

__version__ = "0.1.0"
