"""Training losses.

- :mod:`mesadepth.losses.masked`: the SimMIM masked-reconstruction L1 loss and the Swin-v2
  locally normalised target (masked-pretraining-and-finetuning.md section 1.4).
- :mod:`mesadepth.losses.supervised`: the SC-DepthV3 pseudo-depth losses (dynamic mask, normal
  matching, confident ranking, edge-aware relative normals) and the v3 total
  (geometric-and-supervised-pretraining.md sections 4.6-4.10).
"""
