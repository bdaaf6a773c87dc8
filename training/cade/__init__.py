"""Training of the CADe detectors (``cade_<task>`` models): phantoms → working frame → patches → ONNX."""
