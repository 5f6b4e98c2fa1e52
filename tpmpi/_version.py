"""The package version (read by setup.cfg without importing tpmpi)."""
__version__ = "0.1.0"
