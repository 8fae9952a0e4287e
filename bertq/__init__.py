"""bertq: BERT-family models over Celery + Redis. Importing this package stays light (no torch)."""

__version__ = "0.1.0"
