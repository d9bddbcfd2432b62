"""LossLab's Hydra sweeper ``hydra/sweeper=tuned_comparison`` (used by ``sweep=tuned_comparison``).

It lives in Hydra's ``hydra_plugins`` namespace package because Hydra discovers and instantiates
sweepers only from there.
"""
