"""Evaluation: fields to meshes, shape and generation metrics, topology, weight-space diagnostics.

    extract.py     field(s) -> grid -> marching cubes -> meshes (dense or coarse-to-fine)
    topology.py    components, Euler characteristic, genus, watertightness, volume
    distances.py   Chamfer / EMD between clouds, tiled pairwise matrices (torch, GPU when present)
    shape.py       F-score, normal consistency, volumetric IoU
    generation.py  MMD / COV / 1-NNA, novelty and memorisation
    weights.py     weight-space diagnostics, probes, linear mode connectivity
    figures.py     PNG renders and plots (headless)
    run.py         `raywsl eval`: two sets of meshes -> metrics.json, clouds, figures
"""
