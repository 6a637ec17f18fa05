"""The reference trainer and length-generalization evaluation (``lengen-train``)."""
from .config import ArmConfig, ExtensionConfig, ModelConfig, RunConfig, TaskConfig, TrainConfig  # noqa: F401
from .model import Transformer  # noqa: F401
