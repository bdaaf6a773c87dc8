"""Label estimation: a lesion mask from a weak label (centre + size) or from a radiotherapy dose plan.

One pipeline (:mod:`services.label_estimation.pipeline`) behind the CLI, the batch runner and the
gRPC service; one module per method (sphere/ellipsoid, threshold, random walker, U-Net, dose).
"""
