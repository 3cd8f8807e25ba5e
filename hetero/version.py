"""The version of hetero, export and devices: written here once (setuptools reads it too)."""
__version__ = "0.1.0"
