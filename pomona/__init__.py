"""Pomona: serve large language models across a cluster of Apple Silicon Macs.

This package holds what the coordinator and the workers share (configuration, placement, the wire
protocol) and the ``pomona`` command line; it never imports MLX.
"""

__version__ = "0.1.0"
