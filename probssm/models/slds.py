"""Placeholder: filled by the slds work (issue in progress)."""
__all__: list = []
