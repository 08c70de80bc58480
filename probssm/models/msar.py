"""Placeholder: filled by the msar work (issue in progress)."""
__all__: list = []
