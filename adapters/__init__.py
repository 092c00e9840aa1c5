"""The Lightning bridge, imported as `nntrain.adapters`: the only package that imports Lightning.

`to_lightning(learn)` gives a `LearnerModule` and the one `LearnerCallback` that runs the
learner's subscribers, for a Trainer you build; `learn.fit(epochs, engine="lightning",
**trainer_kwargs)` does it for you (through `LightningRunner`). `HOOK_TABLE` is the whole
Lightning-to-nntrain mapping.
"""

import warnings

with warnings.catch_warnings():  # Lightning imports tqdm.auto: in a notebook without ipywidgets tqdm warns
    warnings.filterwarnings("ignore", message="IProgress not found")  # about a bar nntrain does not draw
    import lightning  # noqa: F401

from nntrain.adapters.callback import (
    HOOK_TABLE,
    STEP_TABLE,
    LearnerCallback,
    hook_table_markdown,
)
from nntrain.adapters.engine import REFUSED_CALLBACKS, LightningEngine
from nntrain.adapters.fit import (
    UNSUPPORTED_TRAINER_OPTIONS,
    LightningRunner,
    model_device,
    to_lightning,
    trainer_defaults,
)
from nntrain.adapters.module import ForeignOptimizer, LearnerModule

__all__ = [
    "HOOK_TABLE",
    "STEP_TABLE",
    "LearnerCallback",
    "LearnerModule",
    "LightningEngine",
    "ForeignOptimizer",
    "REFUSED_CALLBACKS",
    "to_lightning",
    "LightningRunner",
    "trainer_defaults",
    "model_device",
    "hook_table_markdown",
    "UNSUPPORTED_TRAINER_OPTIONS",
]
