"""Weight-space diffusion: tokenizers (weight row <-> tokens, driven by the store's layout), the DiT
denoiser, the Gaussian diffusion process and its samplers, training under Ray Train (`raywsl train`)
and sampling to meshes (`raywsl sample`)."""
