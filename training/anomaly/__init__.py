"""Anomaly models (issue 13): Glow in 2D and 3D, the two-flow posterior, the PCA baseline."""
