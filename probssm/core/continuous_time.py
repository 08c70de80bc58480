"""Placeholder: exact-structure declaration (issue in progress)."""
__all__: list = []
