"""Per-modality CADe: whole-image detection of lesions as ranked candidates (centre, size, confidence).

The pipeline (:mod:`services.cade.pipeline`) binds a task's working frame, intensity normalisation and
tiled inference; :mod:`services.cade.tiling` runs any heatmap network over a whole image through an
``infer`` callable (numpy only, never torch); :mod:`services.cade.candidates` turns the probability map
into candidates with non-maximum suppression in mm. CLI, batch and the gRPC service all call
:class:`services.cade.pipeline.Detector`.
"""
