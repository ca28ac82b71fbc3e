"""The train-base stage: the base network a field type needs and one latent per shape, trained as an
auto-decoder (autodecoder.py) under Ray Train (train.py). The networks live in raywsl/models/."""
