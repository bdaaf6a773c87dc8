"""Anomaly scoring from presence-only labels (issue 13): preprocessing, flows' scores, calibration.

Torch-free: serving runs the exported ONNX flows through :class:`services.inference.InferenceBackend`,
and training imports the same preprocessing (:mod:`services.anomaly.preprocess`), so a model sees
at serving time exactly what it was trained on.
"""
