"""mesadepth: MeSa pre-training (masked, geometric, supervised) of one Swin-v2 encoder for depth."""

__version__ = "0.1.0"
