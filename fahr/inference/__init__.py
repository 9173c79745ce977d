"""Inference on raw photos: `fahr predict` (FaceAge / risk per photo) and `fahr far` (Face Aging Rate)."""
