"""The Lightning bridge, imported as `nntrain.adapters`: the only package that imports Lightning.

`to_lightning(learn)` gives a `LearnerModule` and one `SubscriberCallback` per subscriber for a
Trainer you build; `learn.fit(epochs, engine="lightning", **trainer_kwargs)` does it for you.
"""

from nntrain.adapters.callbacks import HOOK_TABLE, SubscriberCallback
from nntrain.adapters.fit import UNSUPPORTED_TRAINER_OPTIONS, fit_lightning, model_device, to_lightning, trainer_defaults
from nntrain.adapters.module import ForeignOptimizer, LearnerModule, LightningEngine

__all__ = [
    "HOOK_TABLE",
    "SubscriberCallback",
    "LearnerModule",
    "LightningEngine",
    "ForeignOptimizer",
    "to_lightning",
    "fit_lightning",
    "trainer_defaults",
    "model_device",
    "UNSUPPORTED_TRAINER_OPTIONS",
]
