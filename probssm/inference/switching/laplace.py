"""Placeholder: Laplace-EM for recurrent and Poisson SLDS (in progress)."""
__all__: list = []
