"""The networks: per-shape field types and the row layout they declare (fields.py, lora.py,
deepsdf_latent.py), the base networks trained across shapes (bases.py: modulated.py, deepsdf.py), the
SDF losses, and the diffusion denoiser (tokenizers.py, dit.py, gaussian.py, denoiser.py). Registries
by name, and the config checks that need them (registry.py)."""
