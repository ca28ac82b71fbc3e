"""Shared base fields trained across shapes (auto-decoders): the modulated base field of the LoRA
paper (`modulated.py`), on which LoRA / multiplicative-LoRA fields are fitted per shape."""
