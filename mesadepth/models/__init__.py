"""Networks: the Swin-v2 encoder and the heads each stage puts on it."""
