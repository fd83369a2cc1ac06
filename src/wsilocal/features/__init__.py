"""Tile features for the MIL baselines: a tile grid over the tissue, ResNet34 features, one HDF5 file per slide.

``tiles`` (where the tiles are, reading one) → ``extract`` (the ResNet34 extractor and the cohort loop)
→ ``h5`` (the files, CLAM's layout: datasets ``features`` and ``coords``).
"""
