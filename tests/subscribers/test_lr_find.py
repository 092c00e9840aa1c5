"""The LR finder: suggestion functions and fastai's trimming, the `LRFindS` subscriber, the
`SuggestedLRs` result `lr_find` returns, and `lr_find`'s restore."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

import nntrain.subscribers.lr_find as lr_find_module
from nntrain.learner import Learner, MomentumLearner
from nntrain.lr_suggest import minimum, slide, suggestions, trimmed_range
from nntrain.subscribers.lr_find import (
    LRFindS,
    SuggestedLRs,
    _mean_over_ranks,
    plot_ylim,
    smooth,
    smooth_centered,
    steepest,
    suggestion,
    valley,
)
from tests.helpers import Recorder, tiny_dls, tiny_model


class BasicOptim:
    """A hand-written SGD with only `lr`, `step` and `zero_grad`, like the seed's."""

    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr

    def step(self):
        with torch.no_grad():
            for p in self.params:
                p -= p.grad * self.lr

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def make_learner(optim_class=torch.optim.SGD, lr=0.1, cls=Learner, **kwargs):
    torch.manual_seed(0)
    return cls(tiny_model(), tiny_dls(shuffle=False), F.cross_entropy, optim_class, lr, **kwargs)


# ----- the algorithm ---------------------------------------------------------------------------

LRS = [10.0 ** (k - 6) for k in range(10)]
CURVE = [5.0, 4.0, 4.5, 3.0, 2.0, 2.2, 1.5, 1.0, 3.0, 9.0]


def test_smooth_is_a_debiased_ema():
    assert smooth([1.0, 2.0], beta=0.5) == pytest.approx([1.0, 1.25 / 0.75])
    assert smooth(CURVE, beta=0.0) == CURVE
    assert smooth([2.0] * 5) == pytest.approx([2.0] * 5)  # debiasing: a constant stays put


def test_valley_matches_fastai_on_a_handmade_curve():
    # Longest decreasing subsequence: 5, 4, 3, 2, 1.5, 1 (length 6) ending at index 7; fastai
    # takes its start as 7 - 6 = 1 and picks 1 + int(6 / 3) + int(6 / 6) = 4.
    assert valley(LRS, CURVE) == 4


def test_valley_clamps_where_fastai_would_wrap():
    # Decreasing from the first point: fastai's start is -1; with run 2 it would pick index -1.
    assert valley([1e-3, 1e-2], [2.0, 1.0]) == 0
    assert valley([1e-3, 1e-2, 1e-1, 1.0], [4.0, 3.0, 2.0, 1.0]) == 0


def test_steepest_picks_the_left_end_of_the_steepest_segment():
    # Equal log steps, so the steepest segment is the largest drop: 4.5 -> 3.0, starting at 2.
    assert steepest(LRS, CURVE) == 2
    with pytest.raises(ValueError, match="two or more"):
        steepest([1e-3], [1.0])


def test_suggestions_fall_in_the_descending_part_of_a_u_curve():
    lrs = [1e-6 * 1.25**k for k in range(70)]
    # Flat at 5 below lr 1e-4, down to 1 at lr 1e-2, then up: a U over log(lr) with a plateau.
    losses = [1 + min((math.log10(lr) + 2) ** 2, 4.0) for lr in lrs]
    lowest = lrs[min(range(len(losses)), key=losses.__getitem__)]
    for method in ("valley", "steepest"):
        lr = suggestion(lrs, losses, method)
        assert 1e-4 <= lr < lowest, method


def test_suggestion_ignores_the_non_finite_tail_and_checks_its_input():
    lrs = LRS[:8] + [1e-1, 1.0]
    assert suggestion(lrs, CURVE[:8] + [math.nan, math.inf], beta=0.0, trim=False) == LRS[4]
    with pytest.raises(ValueError, match="method"):
        suggestion(LRS, CURVE, method="middle")
    with pytest.raises(ValueError, match="finite"):
        suggestion(LRS[:2], [1.0, math.nan], trim=False)
    with pytest.raises(ValueError, match="trim=False"):  # 10 points: trimming keeps 1..4, the first nan is at 2
        suggestion(lrs, CURVE[:2] + [math.nan] * 8)


def test_minimum_suggests_a_tenth_of_the_lowest_losss_lr():
    assert minimum(LRS, CURVE) == 7
    assert suggestion(LRS, CURVE, "minimum", beta=0.0, trim=False) == pytest.approx(LRS[7] / 10)


def fastai_slide(lrs, losses, lr_diff=15, thresh=0.005):
    """fastai's `slide` as written there (negative indices, numpy's gradient), for comparison."""
    import numpy as np

    grad = np.gradient(np.array(losses))
    right, left = -1, -1 - lr_diff
    pick = lrs[left]
    while left >= -len(losses) and abs(grad[right] - grad[left]) > thresh:
        pick = lrs[left]
        right, left = right - 1, left - 1
    return pick


def test_slide_follows_fastais_interval_rule():
    # a straight fall, then the loss bends up: the window slides left until both ends are on the line
    lrs = [1e-4 * 1.25**k for k in range(40)]
    bent = [3.0 - 0.05 * k for k in range(30)] + [1.55 + 0.02 * k * k for k in range(10)]
    assert lrs[slide(lrs, bent)] == fastai_slide(lrs, bent)
    assert 0 < slide(lrs, bent) < 30 - 15
    assert lrs[slide(lrs[:20], CURVE * 2)] == fastai_slide(lrs[:20], CURVE * 2)
    straight = [3.0 - 0.05 * k for k in range(20)]
    assert slide(lrs[:20], straight) == 20 - 1 - 15  # the first window already agrees
    assert slide(lrs[:5], straight[:5]) == 0  # shorter than the window: the window is the whole curve


def test_trimming_leaves_out_the_first_tenth_and_the_last_five_points():
    assert trimmed_range(60, 60) == range(6, 55)
    assert trimmed_range(60, 52) == range(6, 52)  # and stops before a non-finite loss
    assert trimmed_range(60, 52, trim=False) == range(0, 52)
    # the fall at the end would be the steepest; trimmed, the earlier and gentler one is
    lrs = [1e-3 * 2**k for k in range(20)]
    losses = [3.0] * 5 + [2.9, 2.7, 2.3, 2.1, 2.0, 1.95, 1.9, 1.85, 1.8, 1.75] + [1.7, 1.6, 0.5, 0.3, 9.0]
    assert suggestion(lrs, losses, "steepest", beta=0.0, trim=False) == lrs[16]
    assert suggestion(lrs, losses, "steepest", beta=0.0) == lrs[6]


DIGITS = json.loads((Path(__file__).parent / "digits_lr_curve.json").read_text())


def test_on_the_digits_curve_the_suggestions_are_fastais():
    # fastai's lr_find trims the curve before suggesting: its steepest is 1.37 here, not 2.14
    lrs, losses = DIGITS["lrs"], DIGITS["losses"]
    assert suggestions(lrs, losses) == pytest.approx(
        {"valley": 0.0385, "steepest": 1.368, "minimum": 0.1711, "slide": 0.02465}, rel=1e-3)
    assert suggestion(lrs, losses, "steepest", trim=False) == pytest.approx(2.138, rel=1e-3)


# ----- the subscriber --------------------------------------------------------------------------


def test_finder_stops_when_the_loss_explodes():
    learn, finder, rec = make_learner(), LRFindS(mult=1.25, max_lr=1e8), Recorder()
    learn.fit(50, subs=[finder, rec], lr=1e-3)
    lrs, losses = finder.lrs, finder.losses
    assert len(lrs) == len(losses) > 5
    assert lrs[0] == 1e-3
    for a, b in zip(lrs, lrs[1:]):
        assert b > a and b == pytest.approx(a * 1.25)
    assert lrs[-1] * 1.25 <= 1e8  # stopped by the explosion, not by max_lr
    assert not math.isfinite(losses[-1]) or losses[-1] > 3 * min(losses[:-1])
    assert all(loss <= 3 * min(losses[: i + 1]) for i, loss in enumerate(losses[:-1]))
    # one record per training batch; validation was skipped
    assert len(lrs) == sum(1 for e in rec.trace if e[0] == "after_loss")
    assert all(mode == "train" for event, mode, *_ in rec.trace if event == "before_batch")


def test_finder_stops_before_max_lr_across_epochs():
    learn, finder = make_learner(), LRFindS(mult=1.25, max_lr=1e-3)
    learn.fit(5, subs=[finder], lr=1e-4)
    # 1e-4 * 1.25**10 = 9.3e-4 <= 1e-3 < 1e-4 * 1.25**11: eleven batches, over two epochs of six
    assert len(finder.lrs) == 11
    assert finder.lrs[-1] <= 1e-3 < finder.lrs[-1] * 1.25


def test_finder_records_a_non_finite_loss_then_stops():
    calls = []

    def loss_fn(preds, y):
        calls.append(1)
        loss = F.cross_entropy(preds, y)
        return loss * math.nan if len(calls) == 4 else loss

    torch.manual_seed(0)
    learn = Learner(tiny_model(), tiny_dls(shuffle=False), loss_fn, torch.optim.SGD, 0.1)
    finder = LRFindS()
    learn.fit(3, valid=False, subs=[finder], lr=1e-4)
    assert len(finder.losses) == 4 and math.isnan(finder.losses[-1])


def test_finder_works_with_a_hand_written_optimizer():
    learn = make_learner(BasicOptim)
    finder = learn.lr_find(start_lr=1e-3, max_lr=1.0)
    assert finder.lrs[0] == 1e-3 and len(finder.lrs) > 5
    assert all(b > a for a, b in zip(finder.lrs, finder.lrs[1:]))


def test_state_dict_round_trip():
    finder = LRFindS()
    finder.load_state_dict({"lrs": LRS, "losses": CURVE})
    other = LRFindS()
    other.load_state_dict(finder.state_dict())
    assert (other.lrs, other.losses, other.best) == (LRS, CURVE, 1.0)


# ----- the plot ----------------------------------------------------------------------------------


def test_smooth_centered_is_the_debiased_ema_forward_then_backward():
    # forward (beta 0.5): 1, 1.25 / 0.75 = 5/3, 2.125 / 0.875 = 17/7; backward over that, reversed
    assert smooth_centered([1.0, 2.0, 3.0], beta=0.5) == pytest.approx([205 / 147, 121 / 63, 17 / 7])
    assert smooth_centered([2.0] * 6) == pytest.approx([2.0] * 6)  # debiased: a constant stays put
    assert smooth_centered(CURVE, beta=0.0) == CURVE


def test_smooth_centered_does_not_lag():
    ramp = [float(i) for i in range(41)]
    assert smooth(ramp, beta=0.6)[20] == pytest.approx(20 - 0.6 / 0.4, abs=1e-3)  # one-sided: 1.5 points late
    assert smooth_centered(ramp, beta=0.6)[20] == pytest.approx(20.0, abs=1e-3)
    v = [abs(i - 20) + 1.0 for i in range(41)]
    argmin = lambda xs: min(range(len(xs)), key=xs.__getitem__)  # noqa: E731
    assert argmin(smooth(v)) == 27  # fastai's beta 0.98, one-sided: the minimum comes 7 points late
    assert argmin(smooth_centered(v)) == 20


def test_plot_ylim_runs_from_the_minimum_to_the_start_not_the_exploded_tail():
    # lowest 1.0 at index 7, highest before it 5.0 (the start); the tail's 9.0 is left out; 5% margins
    assert plot_ylim(CURVE) == pytest.approx((0.8, 5.2))
    assert plot_ylim(CURVE[:8] + [math.nan, math.inf]) == pytest.approx((0.8, 5.2))
    assert plot_ylim([2.0, 2.5, 3.0, 4.0]) == pytest.approx((1.9, 4.1))  # never falls: the whole range
    assert plot_ylim([2.0]) == pytest.approx((1.9, 2.1))
    with pytest.raises(ValueError, match="finite"):
        plot_ylim([math.nan])


def test_plot_shows_once_as_png_limits_y_and_marks_the_suggestions(tmp_path):
    finder = make_learner().lr_find(start_lr=1e-4, max_lr=10.0)
    assert isinstance(finder, SuggestedLRs)
    fig = finder.plot(method=("valley", "steepest"))
    assert isinstance(fig, Figure)
    bundle = fig._repr_mimebundle_()  # what a notebook shows: one PNG, and a text line where it cannot
    assert set(bundle) == {"image/png", "text/plain"} and base64.b64decode(bundle["image/png"])[:4] == b"\x89PNG"
    valley_lr, steep_lr = finder.suggestion(), finder.suggestion("steepest")
    assert bundle["text/plain"] == (f"<LR finder: {len(finder.lrs)} lrs, valley {valley_lr:.2e}, "
                                    f"steepest {steep_lr:.2e}>")
    ax = fig.axes[0]
    finite = [x for x in finder.losses if math.isfinite(x)]
    assert ax.get_ylim() == pytest.approx(plot_ylim(finite)) and ax.get_ylim()[1] < max(finite)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "loss", "smoothed", f"valley: {valley_lr:.2e}", f"steepest: {steep_lr:.2e}"]
    path = tmp_path / "lr_find.png"
    fig.savefig(path)  # a plain savefig: the tight layout keeps the axis labels inside
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    inside = fig.bbox.padded(1)
    for label in (ax.xaxis.label, ax.yaxis.label):
        box = label.get_window_extent()
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
    ax = Figure().add_subplot()
    assert finder.plot(ax=ax, suggest=False) is ax.figure
    assert finder.suggestion("steepest") in finder.lrs


def test_the_result_shows_its_suggestions_and_its_plot_by_itself():
    result = SuggestedLRs(DIGITS["lrs"], DIGITS["losses"])
    assert repr(result) == "SuggestedLRs(valley=0.0385, steepest=1.37, minimum=0.171, slide=0.0247)"
    assert str(result) == repr(result)  # print() in a terminal
    assert list(result.suggestions) == ["valley", "steepest", "minimum", "slide"]
    assert result.steepest == result.suggestion("steepest") != result.suggestion("steepest", trim=False)
    bundle = result._repr_mimebundle_()  # what a notebook shows for `learn.lr_find()` as a cell's value
    assert set(bundle) == {"image/png", "text/plain"} and bundle["text/plain"] == repr(result)
    assert base64.b64decode(bundle["image/png"])[:4] == b"\x89PNG"
    legend = [t.get_text() for t in result.plot().axes[0].get_legend().get_texts()]
    assert legend == ["loss", "smoothed", "valley: 3.85e-02", "steepest: 1.37e+00", "minimum: 1.71e-01",
                      "slide: 2.47e-02"]
    untrimmed = SuggestedLRs(DIGITS["lrs"], DIGITS["losses"], trim=False)
    assert untrimmed.steepest == pytest.approx(2.138, rel=1e-3)
    short = SuggestedLRs(LRS[:4], CURVE[:4])  # too short to trim: no suggestion, still a plot
    assert repr(short) == "SuggestedLRs(valley=None, steepest=None, minimum=None, slide=None, too few points (4 " \
                          "recorded))"
    assert "image/png" in short._repr_mimebundle_()


# ----- lr_find restores the learner --------------------------------------------------------------


def test_lr_find_restores_weights_adam_state_lr_and_step():
    learn = make_learner(torch.optim.Adam, lr=1e-3)
    learn.fit(1)
    opt = learn.opt
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    exp_avg = [opt.state[p]["exp_avg"].clone() for p in learn.model.parameters()]
    step = [opt.state[p]["step"].clone() for p in learn.model.parameters()]
    global_step = learn.global_step

    finder = learn.lr_find(start_lr=1e-4, max_lr=1.0)

    assert len(finder.lrs) > 5
    assert learn.opt is opt and learn.lr == 1e-3 and learn.global_step == global_step
    assert opt.param_groups[0]["lr"] == 1e-3
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for p, m, s in zip(learn.model.parameters(), exp_avg, step):
        assert torch.equal(opt.state[p]["exp_avg"], m) and torch.equal(opt.state[p]["step"], s)
    learn.fit(1)  # the restored optimizer still drives the same parameters
    assert learn.global_step == 2 * global_step


def test_lr_find_before_any_fit_leaves_no_optimizer():
    learn = make_learner(lr=0.05)
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.lr_find(start_lr=1e-4, max_lr=1.0)
    assert learn.opt is None and learn.lr == 0.05 and learn.global_step == 0
    assert all(torch.equal(v, weights[k]) for k, v in learn.model.state_dict().items())


def test_lr_find_restores_a_hand_written_optimizer_and_momentum_grads():
    learn = make_learner(BasicOptim, lr=0.1, cls=MomentumLearner)
    learn.fit(1, valid=False)
    grads = [p.grad.clone() for p in learn.model.parameters()]  # MomentumLearner keeps them
    weights = [p.detach().clone() for p in learn.model.parameters()]
    learn.lr_find(start_lr=1e-3, max_lr=1.0)
    assert learn.opt.lr == 0.1
    for p, w, g in zip(learn.model.parameters(), weights, grads):
        assert torch.equal(p, w) and torch.equal(p.grad, g)


def test_lr_find_restores_after_an_error():
    calls = []

    def loss_fn(preds, y):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return F.cross_entropy(preds, y)

    torch.manual_seed(0)
    learn = Learner(tiny_model(), tiny_dls(shuffle=False), loss_fn, torch.optim.SGD, 0.1)
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        learn.lr_find()
    assert learn.opt is None and learn.lr == 0.1 and learn.global_step == 0
    assert all(torch.equal(v, weights[k]) for k, v in learn.model.state_dict().items())


# ----- distributed: every rank takes the same decision -------------------------------------------


def test_ranks_average_the_loss_and_stop_together(monkeypatch):
    # Two ranks stood in by a fake all_reduce: the other rank's loss is 1.0, then 100 at batch 3.
    other = iter([1.0, 1.0, 1.0, 100.0] + [1.0] * 100)

    def all_reduce(tensor):
        tensor += next(other)

    fake_dist = SimpleNamespace(
        is_available=lambda: True, is_initialized=lambda: True, get_world_size=lambda: 2, all_reduce=all_reduce
    )
    monkeypatch.setattr(lr_find_module, "dist", fake_dist)
    assert float(_mean_over_ranks(torch.tensor(3.0))) == 2.0
    finder = make_learner().lr_find(start_lr=1e-4, max_lr=1.0)
    # this rank's own loss never explodes; the average does at the fourth batch (index 3 of `other`)
    assert len(finder.losses) == 3 and finder.losses[-1] > 50


# ----- both engines --------------------------------------------------------------------------------

LIGHTNING_QUIET = dict(accelerator="cpu", enable_progress_bar=False, logger=False, enable_checkpointing=False,
                       enable_model_summary=False)


def test_lightning_engine_records_the_same_search_and_suggests_the_same():
    native = make_learner().lr_find(start_lr=1e-4, max_lr=1.0)
    learn = make_learner()
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    bridged = learn.lr_find(start_lr=1e-4, max_lr=1.0, engine="lightning", **LIGHTNING_QUIET)
    assert bridged.lrs == native.lrs and bridged.losses == native.losses  # bitwise
    assert bridged.suggestions == native.suggestions and repr(bridged) == repr(native)
    assert native.valley is not None
    assert learn.opt is None and all(torch.equal(v, weights[k]) for k, v in learn.model.state_dict().items())


def test_lr_find_silences_reporting_subscribers_and_gives_them_back(capsys):
    from nntrain.subscribers.metrics import MetricsS
    from nntrain.subscribers.progress import ProgressS

    learn = make_learner()
    subs = [MetricsS(), ProgressS()]
    learn.add_subs(subs)
    finder = learn.lr_find(start_lr=1e-4, max_lr=1.0)
    out = capsys.readouterr()
    assert len(finder.losses) > 3
    assert out.out == "" and "epoch" not in out.err  # no rows, no bars
    assert learn.subs == subs and subs[0].history == []
