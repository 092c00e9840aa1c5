"""MetricsS and MetricAccumulator: values against a direct computation, reporting, no per-batch sync, DDP."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchmetrics
from torch.utils.data import DataLoader, TensorDataset
from torcheval.metrics import MulticlassAccuracy
from torcheval.metrics.functional import multiclass_accuracy

from nntrain.learner import CancelEpochException, Learner, Subscriber
from nntrain.subscribers.metrics import (
    MetricAccumulator,
    MetricsS,
    batch_accuracy,
    format_row,
)
from tests.helpers import retry_on_worker_abort, tiny_data, tiny_dls, tiny_model

N_CLASSES = 3


def make_metrics(flush_every: int = 32) -> MetricsS:
    """Quiet MetricsS with one metric of each kind."""
    metrics = MetricsS(
        tev=MulticlassAccuracy(),
        tm=torchmetrics.Accuracy(task="multiclass", num_classes=N_CLASSES),
        fn=batch_accuracy,
        flush_every=flush_every,
    )
    metrics.sink = lambda row: None
    return metrics


class BatchProbe(Subscriber):
    """Keeps each batch's predictions, targets and loss, per mode."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {"train": [], "valid": []}

    def after_batch(self, learn) -> None:
        mode = "train" if learn.model.training else "valid"
        self.seen[mode].append((learn.preds.detach().clone(), learn.batch[1].clone(), learn.loss.detach().clone()))


def direct(seen) -> dict[str, float]:
    """The expected row values, computed over the whole epoch at once."""
    preds = torch.cat([p for p, _, _ in seen])
    targets = torch.cat([t for _, t, _ in seen])
    n = targets.shape[0]
    loss = sum(loss.double().item() * t.shape[0] for _, t, loss in seen) / n
    fn = sum(batch_accuracy(p, t).double().item() * t.shape[0] for p, t, _ in seen) / n
    acc = multiclass_accuracy(preds, targets).item()
    return {"loss": loss, "tev": acc, "tm": acc, "fn": fn}


@pytest.mark.parametrize("flush_every", [2, 32])
def test_rows_match_direct_computation(flush_every):
    # 100 = 6*16 + 4 and 37 = 2*16 + 5: the last batch is smaller; with flush_every=2 the
    # buffer is flushed mid-epoch and again (partly full) at the end.
    learn = Learner(tiny_model(), tiny_dls(n_train=100, n_valid=37, shuffle=False), F.cross_entropy)
    metrics, probe = make_metrics(flush_every), BatchProbe()
    learn.fit(1, subs=[metrics, probe])
    train, valid = metrics.history
    assert (train["epoch"], train["mode"], valid["epoch"], valid["mode"]) == (0, "train", 0, "valid")
    for row, mode in ((train, "train"), (valid, "valid")):
        expected = direct(probe.seen[mode])
        assert list(row) == ["epoch", "mode", "loss", "tev", "tm", "fn"]
        for name, value in expected.items():
            assert isinstance(row[name], float)
            assert row[name] == pytest.approx(value, rel=1e-6, abs=1e-6), (mode, name)


def test_function_is_weighted_by_batch_size():
    acc = MetricAccumulator({"mean": lambda p, t: p.mean()}, flush_every=2)
    for value, size in ((1.0, 4), (2.0, 4), (4.0, 1)):
        acc.add(torch.full((size,), value), torch.zeros(size), torch.tensor(value))
    out = acc.compute()
    assert out["mean"] == pytest.approx((4 + 8 + 4) / 9)
    assert out["loss"] == pytest.approx((4 + 8 + 4) / 9)
    assert acc.count == 9


def test_history_after_two_epochs_and_the_logged_values():
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy)
    metrics = make_metrics()
    learn.fit(2, subs=[metrics])
    last_epoch = {f"{r['mode']}/{k}": v for r in metrics.history[-2:] for k, v in r.items() if k not in ("epoch", "mode")}
    assert learn.logs == last_epoch  # the last epoch's values, as logged through learn.log
    assert [(r["epoch"], r["mode"]) for r in metrics.history] == [(0, "train"), (0, "valid"), (1, "train"), (1, "valid")]
    assert metrics.last is metrics.history[-1]
    assert [r["epoch"] for r in metrics.rows("valid")] == [0, 1]
    assert metrics.rows("train")[1]["loss"] < metrics.rows("train")[0]["loss"]


def test_output_prints_unless_sink_is_set(capsys):
    metrics = MetricsS(acc=batch_accuracy)
    row = {"epoch": 1, "mode": "valid", "loss": 0.5, "acc": 0.25}
    metrics.output(row)
    assert capsys.readouterr().out.strip() == format_row(row) == "epoch 1 | valid | loss 0.5000 | acc 0.2500"
    got = []
    metrics.sink = got.append
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy)
    learn.fit(1, subs=[metrics])
    assert capsys.readouterr().out == ""
    assert got == metrics.history and len(got) == 2


def test_state_dict_round_trip():
    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy)
    metrics = make_metrics()
    learn.fit(1, subs=[metrics])
    state = metrics.state_dict()
    restored = make_metrics()
    restored.load_state_dict(state)
    assert restored.history == metrics.history
    state["history"][0]["loss"] = -1.0  # the restored history is a copy
    assert restored.history[0]["loss"] != -1.0


def test_cancelled_epoch_reports_nothing_and_drops_buffer():
    class CancelTrain(Subscriber):
        order = 10

        def after_batch(self, learn):
            if learn.model.training and learn.iter == 2:
                raise CancelEpochException

    learn = Learner(tiny_model(), tiny_dls(), F.cross_entropy)
    metrics = make_metrics(flush_every=32)
    learn.fit(1, subs=[metrics, CancelTrain()])
    assert [r["mode"] for r in metrics.history] == ["valid"]
    assert metrics.acc._losses == [] and metrics.acc._preds == []


def test_empty_epoch_gives_nan():
    acc = MetricAccumulator({"tev": MulticlassAccuracy(), "fn": batch_accuracy})
    out = acc.compute()
    assert all(math.isnan(v) for v in out.values()) and list(out) == ["loss", "tev", "fn"]


def test_bad_arguments():
    with pytest.raises(TypeError, match="'bad'"):
        MetricsS(bad=3)
    with pytest.raises(ValueError, match="flush_every"):
        MetricsS(flush_every=0)
    with pytest.raises(ValueError, match="taken"):
        MetricsS(loss=batch_accuracy)


SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def test_batch_loop_never_copies_to_host(monkeypatch):
    """The hot path (and the flushes inside it) makes no `.item()`/`.cpu()`-like call."""
    calls = {"in_batch": [], "outside": []}

    class Window(Subscriber):
        order = -100  # its cleanup_batch runs after every after_batch
        active = False

        def before_batch(self, learn):
            Window.active = True

        def cleanup_batch(self, learn):
            Window.active = False

    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls["in_batch" if Window.active else "outside"].append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    learn = Learner(tiny_model(), tiny_dls(n_train=100, n_valid=37), F.cross_entropy)
    metrics = make_metrics(flush_every=2)
    learn.fit(2, subs=[Window(), metrics])
    monkeypatch.undo()
    assert calls["in_batch"] == []
    assert "tolist" in calls["outside"]  # the counters work: after_epoch converts to floats
    assert len(metrics.history) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_device_sync_in_batch_loop_on_cuda():
    from nntrain.subscribers.device import DeviceS

    class SyncGuard(Subscriber):
        order = -100

        def before_batch(self, learn):
            torch.cuda.set_sync_debug_mode("error")

        def cleanup_batch(self, learn):
            torch.cuda.set_sync_debug_mode("default")

    learn = Learner(tiny_model(), tiny_dls(n_train=100), F.cross_entropy)
    metrics = MetricsS(fn=batch_accuracy, flush_every=2)
    metrics.sink = lambda row: None
    try:
        learn.fit(1, subs=[DeviceS("cuda"), SyncGuard(), metrics])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(metrics.history) == 2


# ----- distributed ---------------------------------------------------------------------------

DDP_N, DDP_CUT = 75, 40  # rank 0 sees 40 samples, rank 1 sees 35: uneven on purpose


def _eval_row(x: torch.Tensor, y: torch.Tensor) -> dict:
    """The valid row of a 1-epoch `fit(train=False)` of the fixed model over (x, y)."""
    dl = DataLoader(TensorDataset(x, y), batch_size=16)
    learn = Learner(tiny_model(), SimpleNamespace(train=dl, valid=dl), F.cross_entropy)
    metrics = make_metrics(flush_every=2)
    learn.fit(1, train=False, subs=[metrics])
    return metrics.last


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = tiny_data(DDP_N, seed=3).tensors
        part = slice(0, DDP_CUT) if rank == 0 else slice(DDP_CUT, None)
        row = _eval_row(x[part], y[part])
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(row, f)
    finally:
        dist.destroy_process_group()
    # The results are on disk. Skip interpreter teardown: torch 2.13's gloo aborts there now and
    # then ("terminate called without an active exception"), after all the work is done.
    os._exit(0)


def test_distributed_rows_are_global(tmp_path):
    x, y = tiny_data(DDP_N, seed=3).tensors
    expected = _eval_row(x, y)
    local = _eval_row(x[:DDP_CUT], y[:DDP_CUT])
    assert local["loss"] != pytest.approx(expected["loss"])  # the halves differ from the whole
    stores = iter(("store", "store-retry"))  # a retry needs a fresh file store
    retry_on_worker_abort(lambda: mp.spawn(_ddp_worker, args=(2, str(tmp_path / next(stores)), str(tmp_path)),
                                           nprocs=2, join=True))
    for rank in range(2):
        row = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert row.keys() == expected.keys()
        for name in ("loss", "tev", "tm", "fn"):
            assert row[name] == pytest.approx(expected[name], abs=1e-6), (rank, name)


def test_buffer_is_folded_in_when_it_reaches_max_buffered_elements():
    acc = MetricAccumulator({"mean": lambda p, t: p.mean()}, flush_every=1000, max_buffered=25)
    preds, targets, loss = torch.ones(4, 3), torch.zeros(4, dtype=torch.long), torch.tensor(2.0)
    acc.add(preds, targets, loss)
    acc.add(preds, targets, loss)
    assert acc.count == 0 and len(acc._sizes) == 2  # 24 elements buffered, under the budget
    acc.add(preds, targets, loss)
    assert acc.count == 12 and acc._sizes == []  # 36 >= 25: folded in
    assert acc.compute() == {"loss": 2.0, "mean": 1.0}


@pytest.mark.parametrize("n, world, expected", [(61, 2, [31, 30]), (359, 2, [180, 179]), (10, 4, [3, 3, 2, 2]),
                                                (64, 2, [None, None])])
def test_real_samples_counts_what_a_distributed_sampler_did_not_pad(n, world, expected):
    from torch.utils.data import DataLoader, DistributedSampler

    from nntrain.subscribers.metrics import real_samples
    from tests.helpers import tiny_data

    data = tiny_data(n)
    got = [real_samples(DataLoader(data, sampler=DistributedSampler(data, num_replicas=world, rank=r, shuffle=False)))
           for r in range(world)]
    assert got == expected
    if expected[0] is not None:
        assert sum(got) == n
    assert real_samples(DataLoader(data)) is None


def test_padded_samples_at_the_end_of_a_rank_are_left_out():
    """One 'rank' of 2 over 5 samples gets positions 1, 3 and the repeat of sample 0: its row
    covers the 2 real ones, with the loss of the last batch computed again on them."""
    from torch.utils.data import DataLoader, DistributedSampler

    data = tiny_data(5)
    dl = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=1, shuffle=False))
    metrics = MetricsS()
    learn = Learner(tiny_model(), SimpleNamespace(train=dl, valid=dl), F.cross_entropy, subs=[metrics])
    learn.fit(1, train=False)
    x = torch.stack([data[i][0] for i in (1, 3)])
    y = torch.stack([data[i][1] for i in (1, 3)])
    with torch.no_grad():
        expected = F.cross_entropy(learn.model(x), y).item()
    assert metrics.last["loss"] == pytest.approx(expected, abs=1e-6)
