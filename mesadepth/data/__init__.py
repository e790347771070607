"""Datasets in their real on-disk formats, and the synthetic world that writes them.

Sample convention shared by every loader and by :mod:`mesadepth.data.transforms`: a sample is a
``dict``. Before ``ToTensor`` the arrays are NumPy:

- ``image``: (H, W, 3) uint8 RGB (``refs``: a list of such arrays, the reference frames);
- ``depth``: (H, W) float32 metres, 0 = no measurement; ``pseudo_depth``: (H, W) float32, raw
  values as stored (relative depth, no metric meaning);
- ``mask_*`` / ``labels`` / ``edges``: (H, W) integer maps (moved with nearest-neighbour);
- ``K``: (3, 3) float32 intrinsics of the arrays as they are now (0-based pixel centres);
- ``motion``: (R, 4, 4) rigid motions between the sample's cameras (video snippets read with
  known poses: target -> each reference, metres); geometric transforms keep them consistent;
- anything else (``name``, ``index``, ``scene``...) passes through untouched.

After ``ToTensor`` images are float32 (3, H, W) in [0, 1], maps (1, H, W), ``K`` a (3, 3) tensor.
"""
