"""Placeholder: filled by the hsmm work (issue in progress)."""
__all__: list = []
