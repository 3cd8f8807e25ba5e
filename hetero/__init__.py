"""hetero: edge embedding models trained into a cloud model's embedding space, exported to device
runtimes and verified by cross-model retrieval. ``hetero`` is the learning layer; ``export`` and
``devices`` are its sibling packages."""

__version__ = "0.1.0"
