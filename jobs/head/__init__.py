"""Fusion heads: a classifier over stored embeddings or a training run's towers.

``mmfp train CONFIG --head classify`` trains one (``fit``) and ``mmfp evaluate RUN``
scores it (``report``): per-modality and fused accuracy with a confusion matrix.
"""
