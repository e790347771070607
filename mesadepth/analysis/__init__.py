"""Representation analyses of trained encoders.

- :mod:`mesadepth.analysis.cka`: linear, debiased, minibatch and RBF CKA between the layers of
  one encoder and between two encoders (pre-trained vs fine-tuned), streamed over a dataset,
  with the paper's heatmaps (teacher-and-cka.md Part B; layer taps of
  masked-pretraining-and-finetuning.md 3.1). Command line: ``mesadepth cka``.
"""
