"""Placeholder: filled by the slds engine work."""
__all__: list = []
