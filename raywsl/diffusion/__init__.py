"""The train and sample stages: the denoiser (raywsl/models/denoiser.py) trained on weight rows under
Ray Train (train.py), and new rows sampled from it and decoded to meshes (sample.py)."""
