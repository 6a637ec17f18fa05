"""The reference trainer and length-generalization evaluation (``lengen-train``): one engine for arms x seeds x a
workload (synthetic tasks or a text corpus)."""
from .arms import ArmConfig  # noqa: F401
from .config import (CorpusConfig, ExtensionConfig, ModelConfig, RunConfig, TaskConfig,  # noqa: F401
                     TrainConfig)
from .model import Transformer  # noqa: F401
