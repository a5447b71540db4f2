"""azwi-netproxy: an IMDS token endpoint for Azure Workload Identity pods."""

__version__ = "0.1.0"
