"""Placeholder: continuous-time Markov chains (issue in progress)."""
__all__: list = []
