"""Training code used by the book and the model-zoo scripts.

``ministd.train`` itself (chapter 02) holds the diffusion training objective;
the submodules train the shipped ShapesWorld models:
``python -m ministd.train vae|clip|unet ...``.
"""
