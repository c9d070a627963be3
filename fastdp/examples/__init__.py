"""Runnable examples: ``python -m fastdp.examples.digits``."""
