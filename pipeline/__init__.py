"""The data path: raw datasets -> class-indexed TFRecords (Beam) -> graph-mode episode sampler."""
