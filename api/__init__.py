"""The StyleInject service API (FastAPI). Imports no torch: training and inference run in ``worker``."""

__version__ = "0.1.0"
