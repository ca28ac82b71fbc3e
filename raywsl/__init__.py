"""raywsl: weight-space learning on 3D shapes at scale."""

__version__ = "0.1.0"
