"""Placeholder: filled by the msar engine work."""
__all__: list = []
