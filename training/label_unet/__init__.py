"""Training of the generic lesion segmenter (3D U-Net on size-normalised VOIs) and its evaluation."""
