"""Training losses.

- :mod:`mesadepth.losses.masked`: the SimMIM masked-reconstruction L1 loss and the Swin-v2
  locally normalised target (masked-pretraining-and-finetuning.md section 1.4).
"""
