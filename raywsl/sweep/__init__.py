"""Sweeps: many runs of one base config over a search space (space.py), and what their results say
about where weight-space diffusion starts working (onset.py)."""
