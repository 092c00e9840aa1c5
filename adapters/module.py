"""`LearnerModule`: a LightningModule whose steps are a Learner's own `run_step`.

Lightning drives the loop; the learner's `predict`, `get_loss`, `backward`, `step` and
`zero_grad` (and any subclass override of them) do the work, with `backward` going through
`manual_backward` and `step` through Lightning's optimizer wrapper, so precision plugins and
strategies (DDP) apply. The events are fired by the `LearnerCallback` (see `HOOK_TABLE`).
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import torch

from nntrain.checkpoint_state import CHECKPOINT_ENTRY, capture
from nntrain.checks import check_batch_structure
from nntrain.learner import Learner
from nntrain.optim import LR, get_lr, set_lr
from nntrain.resume import ResumePlan
from nntrain.rng import rng_state

__all__ = [
    "LearnerModule",
    "ForeignOptimizer",
    "CHECKPOINT_KEY",
    "loader_cannot_resume",
    "shards_parameters",
    "optimizer_over",
]

CHECKPOINT_KEY = CHECKPOINT_ENTRY
"""The entry `LearnerModule` adds to Lightning checkpoints: the learner state (`LEARNER_KEYS`)."""


def loader_cannot_resume(what: str, pos: dict[str, Any], loader: Any, note: str = "") -> ValueError:
    """The error for a checkpoint taken inside an epoch whose training loader cannot continue it."""
    return ValueError(
        f"{what} was taken inside epoch {pos['epoch']} (after training batch {pos['iter']}), but the "
        f"training loader ({type(loader).__name__}) cannot continue an epoch{note}: make it a "
        "nntrain.data.ResumableDataLoader (DataLoaders.from_hf_dd does), or resume from a checkpoint "
        "taken at an epoch's end"
    )


def shards_parameters(strategy: Any) -> bool:
    """Whether `strategy` wraps the model's parameters into shards (`FSDPStrategy`,
    `ModelParallelStrategy`): the optimizer must then be made over the wrapped module's parameters."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def optimizer_over(opt: Any, params: Any) -> torch.optim.Optimizer:
    """A new optimizer of `opt`'s class and hyper-parameters over `params` (a sharded module's).

    Raises:
        ValueError: `opt` is not a `torch.optim.Optimizer`, has several parameter groups, or holds
            state (a previous fit's or a native checkpoint's), which sharded parameters cannot take.
    """
    what = "under a strategy that shards the parameters (FSDP), the optimizer is made again over them"
    if not isinstance(opt, torch.optim.Optimizer):
        raise ValueError(
            f"{what}, which a hand-written optimizer ({type(opt).__name__}) cannot be: pass a "
            "torch.optim optimizer class as optim_class, or use strategy='ddp'"
        )
    if len(opt.param_groups) != 1:
        raise ValueError(
            f"{what}, as one parameter group; this optimizer has {len(opt.param_groups)}: use one "
            "group, or strategy='ddp'"
        )
    if opt.state:
        raise ValueError(
            f"{what}, so the state the learner's optimizer holds (from an earlier fit or a native "
            "checkpoint) cannot be carried over: resume from a Lightning checkpoint of a sharded fit "
            "(fit(engine='lightning', resume=...)), or fit a fresh learner"
        )
    group, accepted = opt.param_groups[0], inspect.signature(type(opt)).parameters
    return type(opt)(params, **{key: group[key] for key in opt.defaults if key in group and key in accepted})


class ForeignOptimizer(torch.optim.Optimizer):
    """A `torch.optim.Optimizer` around a hand-written optimizer (an object with `step`,
    `zero_grad` and `lr`), so Lightning, which requires a torch optimizer, can drive it.

    The learning rate in `param_groups` is the source of truth; it is copied to the inner
    optimizer before each step, so LR changes made through `param_groups` take effect.
    """

    def __init__(self, inner: Any, params: Any) -> None:
        super().__init__(list(params), {"lr": get_lr(inner)})
        self.inner = inner

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 - documented on the class
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        set_lr(self.inner, self.param_groups[0]["lr"])
        self.inner.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        self.inner.zero_grad()


class LearnerModule(L.LightningModule):
    """Runs `learn` under a `lightning.Trainer`, with the `LearnerCallback` that `to_lightning`
    makes beside it.

    `learn.model` becomes this module's `model` submodule (the same object), so weights trained
    here are the learner's. Optimization is manual: Lightning calls `training_step`, which runs
    `learn.run_step()` inside the batch scope the callback opened.
    """

    def __init__(self, learn: Learner | None = None, train: bool = True) -> None:
        if not isinstance(learn, Learner):  # LightningCLI builds modules from a config: it has no learner
            raise TypeError(
                f"LearnerModule needs a Learner, got {type(learn).__name__}: it runs a learner built in Python, "
                "so LightningCLI or a config cannot make one. Build the learner and call learn.fit(epochs, "
                "engine='lightning', **trainer_options), or nntrain.adapters.to_lightning(learn) for your own "
                "Trainer; the `nntrain fit` command line trains from flags"
            )
        super().__init__()
        self.automatic_optimization = False
        self.learn = learn
        self.model = learn.model
        self.train_enabled = train
        self.plain_opt: Any = None  # the learner's own optimizer, given back at teardown
        self.epoch_offset = 0  # the learner's epoch at this Trainer's epoch 0 (a resumed native checkpoint)
        self.train_iter: int | None = None  # last training batch run in the current training pass
        self.pending_state: dict[str, Any] | None = None  # the state CheckpointS is saving
        self.results_path: str | None = None  # set when Lightning runs the fit in processes it starts
        self.fit_lr: LR | None = None  # fit(lr=...): wins over the lr in a resumed optimizer state
        self.recipe_subs: list[Any] = []  # GradClipS / GradAccumS doing the Trainer's clip / accumulate flags
        self.taken_flags: dict[str, Any] = {}
        self.sharded_opt: torch.optim.Optimizer | None = None  # made over the wrapped parameters (FSDP)
        self.resume_view: tuple[tuple[Any, ...], str] | None = None  # this process's resume (`agree_on_resume`)
        self.exception_state: dict[str, Any] | None = None  # what an OnExceptionCheckpoint saves (interrupt.py)
        self.autocast_boundary: Any = None  # leaves a mixed-precision plugin's autocast after the loss
        self.quiet_workers: tuple[tuple[str, ...], bool] | None = None  # quiet_this_process's arguments, for
        # the processes ddp_spawn starts (applied when they unpickle this module)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in a process Lightning started (`ddp_spawn`): as quiet as the caller."""
        super().__setstate__(state)
        if state.get("quiet_workers") is not None:
            from nntrain.adapters.quiet import quiet_this_process

            quiet_this_process(*state["quiet_workers"])

    @property
    def epoch(self) -> int:
        """The learner's epoch: Lightning's `current_epoch` plus `epoch_offset`."""
        return self.epoch_offset + self.trainer.current_epoch

    def setup(self, stage: str) -> None:
        """Check that the Trainer has this learner's `LearnerCallback` (it drives the events)."""
        from nntrain.adapters.callback import LearnerCallback

        if not any(isinstance(cb, LearnerCallback) and cb.module is self for cb in self.trainer.callbacks):  # type: ignore[attr-defined]  # set in Trainer.__init__
            raise ValueError(
                "the Trainer has no LearnerCallback for this LearnerModule: make both with "
                "module, callbacks = nntrain.adapters.to_lightning(learn) and pass "
                "callbacks=callbacks to the Trainer"
            )

    def configure_callbacks(self) -> list[Any]:
        """No callbacks; Lightning calls this before it checks its configuration, the one point
        where the Trainer's `gradient_clip_val` and `accumulate_grad_batches` (which Lightning
        refuses under manual optimization) can become `GradClipS` / `GradAccumS` for this run."""
        from nntrain.adapters.engine import refuse_callbacks, take_trainer_recipes

        refuse_callbacks(self.trainer.callbacks)  # type: ignore[attr-defined]  # before their own setup (BatchSizeFinder fails in its own)
        self.recipe_subs, self.taken_flags = take_trainer_recipes(self.trainer)
        return []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The learner's optimizer (made now if the learner has none yet); under a strategy that
        shards the parameters (FSDP), one like it over the wrapped module's parameters."""
        learn = self.learn
        if learn.opt is None:
            learn.create_opt()
        opt = learn.opt
        self.plain_opt = learn.opt
        if shards_parameters(self.trainer.strategy):
            self.sharded_opt = optimizer_over(opt, self.trainer.model.parameters())  # type: ignore[union-attr]
            return self.sharded_opt
        if not isinstance(opt, torch.optim.Optimizer):
            opt = ForeignOptimizer(opt, getattr(opt, "params", learn.model.parameters()))
        return opt

    def on_fit_end(self) -> None:
        """After a sharded fit, rank 0's learner gets the whole weights and optimizer state (the
        learner's own optimizer, keyed as it was), as after any other fit."""
        if self.sharded_opt is None:
            return
        strategy = self.trainer.strategy
        opt_state = strategy.optimizer_state(self.sharded_opt)  # collective: whole on rank 0
        weights = strategy.lightning_module_state_dict()
        self.sharded_opt = None
        if not self.trainer.is_global_zero:
            return
        with torch.no_grad():
            for name, p in self.learn.model.named_parameters():
                p.data = weights[f"model.{name}"].detach().clone().to(p.device)
        self.plain_opt.load_state_dict(opt_state)

    # ----- Lightning checkpoints ----------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the learner state (`LEARNER_KEYS`: gradients, `global_step`, position, RNG,
        subscriber states); weights, optimizer and a `ResumableDataLoader`'s position are
        Lightning's."""
        from nntrain.adapters.interrupt import match_loader_position
        from nntrain.checkpoint_state import hyperparameters

        state = self.pending_state
        if state is None and self.exception_state is not None:  # OnExceptionCheckpoint: the state before cleanups
            state = self.exception_state
            match_loader_position(checkpoint, state["position"]["iter"])
        if state is None:
            state = capture(self.learn, self.epoch, self.train_iter, rng_state())
        if self.trainer.world_size > 1:  # every rank's own partial-epoch state (saving is collective)
            import torch.distributed as dist

            ranks: list[Any] = [None] * self.trainer.world_size
            dist.all_gather_object(ranks, {"subs": state["subs"], "rng": state["rng"]})
            state = {**state, "ranks": ranks}
        checkpoint[CHECKPOINT_KEY] = state
        checkpoint["hyper_parameters"] = hyperparameters(self.learn, self.plain_opt)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make the learner's resume plan from the checkpoint, for a fit (`validate` and `test`
        load only the weights).

        Raises:
            ValueError: the checkpoint was not written through `LearnerModule`.
        """
        if CHECKPOINT_KEY not in checkpoint:
            raise ValueError(
                "this Lightning checkpoint has no nntrain state (it was not written while training "
                "an nntrain LearnerModule): resume from a checkpoint of an nntrain fit, or load only "
                "the weights with learn.model.load_state_dict"
            )
        if self.trainer.state.fn == "fit":
            from nntrain.adapters.interrupt import refuse_not_resumable

            trainer = self.trainer
            refuse_not_resumable(getattr(trainer, "ckpt_path", None), checkpoint[CHECKPOINT_KEY])
            self.learn.resume_plan = ResumePlan.read(
                getattr(trainer, "ckpt_path", None) or "",
                checkpoint,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
            )
            self.epoch_offset = self.learn.resume_plan.epoch_offset

    def agree_on_resume(self) -> None:
        """Under DDP, check that every rank resumes from the same checkpoint (each process
        resolved `resume` on its own filesystem), before anything is trained.

        Raises:
            ValueError: on every rank, listing what each rank found, when they differ or one
                could not read its checkpoint.
        """
        import torch.distributed as dist

        trainer = self.trainer
        views: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(views, self.resume_view)
        keys = {None if v is None else v[0] for v in views}
        if len(keys) == 1 and not any(v is not None and v[0][0] == "failed" for v in views):
            return
        seen = "; ".join(f"rank {r}: {'no resume' if v is None else v[1]}" for r, v in enumerate(views))
        raise ValueError(
            f"the ranks of this DDP fit would resume from different checkpoints ({seen}). Every rank must "
            "read the same checkpoint: keep the checkpoint directory on a filesystem all nodes share "
            "(or copy the file to the same path on each node), then resume again"
        )

    def check_resumable_loader(self, plan: ResumePlan) -> None:
        """Lightning continues the checkpoint's epoch after its last trained batch; make sure the
        training loader continues there too (else the epoch would see the wrong batches)."""
        loader = self.trainer.train_dataloader
        skip = getattr(loader, "resumed_at", None)
        if skip is None:
            raise loader_cannot_resume("the checkpoint", {"epoch": plan.epoch, "iter": plan.iter}, loader)
        inside = plan.iter + 1 if plan.iter is not None else None  # a plan from inside an epoch
        if skip != inside:
            raise ValueError(
                f"checkpoint {plan.path} was taken inside epoch {plan.epoch} after training batch {plan.iter}, but "
                f"the loader position it holds would skip {skip} batches, not {inside}: it was saved in the "
                "middle of a batch (trainer.save_checkpoint from a hook?). Resume from a checkpoint saved between "
                "batches (CheckpointS, ModelCheckpoint, OnExceptionCheckpoint)"
            )

    # ----- loaders and modes ------------------------------------------------------------------

    def train_dataloader(self) -> Any:
        """The learner's training loader."""
        return self.learn.dls.train

    def val_dataloader(self) -> Any:
        """The learner's validation loader."""
        return self.learn.dls.valid

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward."""
        return self.model(*args, **kwargs)

    def on_validation_model_zero_grad(self) -> None:
        """Keep gradients across validation: the learner owns them (MomentumLearner keeps mom * grad)."""

    def restore_mode(self) -> None:
        """Put the model in the mode of the last pass run, as a native fit leaves it (Lightning
        switches back to train after validation)."""
        self.model.train(self.learn.mode == "train")

    # ----- steps ------------------------------------------------------------------------------

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """Run the learner's step (predict, loss, backward, step, zero_grad) in the open batch."""
        learn = self.learn
        dispatch = learn.dispatch
        if dispatch.top != "batch":  # not opened: cancelled, trained before a checkpoint, or train=False
            return
        try:
            dispatch.run("batch", learn.run_step)
        except Exception as exc:
            check_batch_structure(exc, learn.batch, "train")
            raise
        finally:
            if self.autocast_boundary is not None:
                self.autocast_boundary.leave()
        engine = learn.engine
        if engine.logs_steps and dispatch.cancelled is None:
            engine.log_step(learn.loss)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Run the learner's step in eval mode (predict, loss) in the open batch."""
        self._eval_step("valid")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Run the learner's step in eval mode (predict, loss) in the open batch."""
        self._eval_step("test")

    def _eval_step(self, mode: str) -> None:
        learn = self.learn
        dispatch = learn.dispatch
        if dispatch.top != "batch":
            return
        try:
            dispatch.run("batch", learn.run_step)
        except Exception as exc:
            check_batch_structure(exc, learn.batch, mode)
            raise
        finally:
            if self.autocast_boundary is not None:
                self.autocast_boundary.leave()

    def predict_step(self, batch: Any, batch_idx: int) -> tuple[torch.Tensor, Any]:
        """`learn.predict_batch()`: the predictions, and the targets where the batch has them."""
        self.learn.batch = batch
        return self.learn.predict_batch()
