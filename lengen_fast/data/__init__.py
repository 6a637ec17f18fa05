"""The data pipeline: token sources, audit, decomposition, packing, curricula and the loader."""
