"""Placeholder: filled by the mjp work (issue in progress)."""
__all__: list = []
