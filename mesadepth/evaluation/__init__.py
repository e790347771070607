"""Evaluation: depth metrics, the IBims-1 error metrics and the test-time protocol.

- :mod:`mesadepth.evaluation.metrics`: the NYUv2 metric set (d1-d3, AbsRel, SqRel, RMSE,
  RMSE-log, log10, SILog), the valid/Eigen-crop masks, prediction sanitising and per-image
  averaging (masked-pretraining-and-finetuning.md 2.8; datasets-and-ibims-evaluation.md 2.5).
- :mod:`mesadepth.evaluation.ibims`: the IBims-1 metrics exactly as the official Python
  evaluation computes them: global, directed depth, depth boundary and planarity errors
  (datasets-and-ibims-evaluation.md 5.4-5.13 and pitfalls in section 6).
- :mod:`mesadepth.evaluation.protocol`: MIM-Depth's test-time horizontal-flip and sliding-window
  ("shift window") averaging around any ``predict(batch) -> depth`` callable (spec 2.8).
"""
