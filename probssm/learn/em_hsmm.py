"""Placeholder: learners registered with ps.learn.em (issue in progress)."""
__all__: list = []
