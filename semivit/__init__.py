"""semivit: a deployable semi-supervised Vision Transformer runtime."""

__version__ = "0.1.0"
