"""Data layer: dataset sources -> .beton files (engine.data.convert) -> train/val/test loaders (make_loaders).

The function convert is NOT re-exported here: the name would shadow the submodule engine.data.convert
(`import engine.data.convert as m` would then bind the function). Use `from engine.data.convert import convert`.
"""
from engine.data.convert import DATASETS, NUM_CLASSES, SyntheticSpec, beton_paths
from engine.data.loaders import BetonInfo, Loaders, make_loaders, open_beton, read_beton, split_train_val

__all__ = ['DATASETS', 'NUM_CLASSES', 'SyntheticSpec', 'beton_paths',
           'BetonInfo', 'Loaders', 'make_loaders', 'open_beton', 'read_beton', 'split_train_val']
