"""Data layer: dataset records (engine.data.datasets) and sources (engine.data.sources) -> .beton files
(engine.data.convert) -> train/val/test loaders (engine.data.loaders). Import from the submodules: this package
imports nothing itself, so reading the dataset registry (the config does) does not load ffcv."""
