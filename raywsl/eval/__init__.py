"""The eval stage: generated meshes against a reference set (run.py), set metrics MMD / COV / 1-NNA,
novelty and memorisation (generation.py), weight-space diagnostics and probes
(weights.py), the probe tables of a weight store (probe.py, `raywsl probe`)."""
