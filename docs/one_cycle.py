"""Draw docs/one_cycle.png from a real run: fit_one_cycle on the embedded digits, SGD with
momentum, the lr and the momentum the optimizer had at every step (`learn.scheduler`)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torcheval.metrics import MulticlassAccuracy  # noqa: E402

from nntrain import DataLoaders, Learner, MetricsS, digits_dataset_dict  # noqa: E402

torch.manual_seed(0)
dls = DataLoaders.from_hf_dd(digits_dataset_dict(), batch_size=64)
model = torch.nn.Sequential(torch.nn.Linear(64, 50), torch.nn.ReLU(), torch.nn.Linear(50, 10))
metrics = MetricsS(accuracy=MulticlassAccuracy())
learn = Learner(model, dls, F.cross_entropy, lambda p, lr: torch.optim.SGD(p, lr, momentum=0.9), subs=[metrics])
learn.fit_one_cycle(5, lr_max=0.2)
fig = learn.scheduler.plot()
fig.axes[0].set_title(f"fit_one_cycle(5, lr_max=0.2) on digits: {learn.global_step} steps, "
                      f"valid accuracy {metrics.last['accuracy']:.3f}", fontsize=9)
fig.tight_layout()
fig.savefig(Path(__file__).resolve().parent / "one_cycle.png", dpi=110)
