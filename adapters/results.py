"""What a fit run in processes Lightning starts (`ddp_spawn`, `ddp_fork`) leaves in the learner,
carried back to the caller: rank 0 writes it (`save_results`), the caller loads it (`load_results`)."""

from __future__ import annotations

from typing import Any

import torch

from nntrain.checkpoint_state import capture, load_subscriber_states, set_grads

__all__ = ["save_results", "load_results"]


def save_results(learn: Any, path: str) -> None:
    """What a fit leaves in the learner besides the weights (the learner state and the optimizer
    state), written by rank 0 of processes Lightning started, for `load_results` in the caller."""
    opt = learn.opt
    torch.save(
        {
            "state": capture(learn, learn.epoch, None),
            "optimizer": opt.state_dict() if hasattr(opt, "state_dict") else None,
        },
        path,
    )


def load_results(learn: Any, path: str) -> None:
    """Give the caller's learner what `save_results` wrote: `global_step`, gradients, subscriber
    states (`MetricsS.history`, an LR finder's records) and the optimizer state."""
    results = torch.load(path, weights_only=True)
    state = results["state"]
    learn.global_step = state["global_step"]
    learn.epoch = state["position"]["epoch"]  # the caller's learner ran no scope: the spawned fit's last epoch
    set_grads(learn.model, state["grads"])
    load_subscriber_states(learn.subs, state["subs"])
    if results["optimizer"] is not None and hasattr(learn.opt, "load_state_dict"):
        learn.opt.load_state_dict(results["optimizer"])
