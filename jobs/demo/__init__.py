"""What ``mmfp demo``, the tests and the benchmarks make for themselves, offline.

- ``corpus``: a small deterministic tri-modal corpus (OpenCV drawings, tones,
  captions) in three source kinds, plus deliberately broken inputs;
- ``tiny_models``: tiny Hugging Face checkpoints built from configs and saved
  to a local directory, loaded by path like a user's model;
- ``synthetic_features``: a learnable synthetic feature set for the trainer;
- ``preview``: the demo's picture of augmented views;
- ``run``: ``mmfp demo`` itself.

The library (``features``, ``pipelines``) never imports this package.
"""
