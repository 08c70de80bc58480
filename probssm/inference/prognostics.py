"""Placeholder: remaining useful life (issue in progress)."""
__all__: list = []
