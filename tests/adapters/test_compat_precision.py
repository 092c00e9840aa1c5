"""Every Lightning precision on a transformer with attention dropout gives the native numbers:
`*-mixed` those of `MixedPrecisionS` (one autocast policy: forward and loss under autocast,
backward and step outside, `nntrain.amp`), `*-true` those of a native fit of the model in that
dtype (`32-true`: `test_parity.py`); afterwards the model and its optimizer state are back in
float32."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from nntrain.learner import Learner
from nntrain.subscribers.metrics import MetricsS
from nntrain.subscribers.precision import MixedPrecisionS


class TinyTransformer(nn.Module):
    """Token embedding, one encoder layer (scaled-dot-product attention with dropout), a head."""

    def __init__(self, vocab: int = 50, dim: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.enc = nn.TransformerEncoderLayer(dim, 2, 64, dropout=0.1, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(1))


def tokens(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (n, 12), generator=g)
    return x, x.sum(1) % 3


def token_dls() -> SimpleNamespace:
    x, y = tokens()
    return SimpleNamespace(train=DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16, shuffle=True),
                           valid=DataLoader(TensorDataset(x[32:], y[32:]), batch_size=16))


def fit(make_model, dls, engine, subs=(), dtype=None, **options):
    metrics = MetricsS()
    metrics.output = lambda row: None
    torch.manual_seed(0)
    model = make_model() if dtype is None else make_model().to(dtype)
    learn = Learner(model, dls, F.cross_entropy, torch.optim.AdamW, lr=1e-3, subs=[metrics, *subs])
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn.fit(1, engine=engine, **options)
    return learn, metrics


def fp16_plugin() -> MixedPrecision:
    """Lightning's 16-mixed with a GradScaler (on CPU, precision="16-mixed" alone becomes bf16)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


CASES = {  # precision: a fresh (native arguments, Lightning options)
    "bf16-mixed": lambda: (dict(subs=[MixedPrecisionS(torch.bfloat16)]), dict(precision="bf16-mixed")),
    "16-mixed": lambda: (dict(subs=[MixedPrecisionS(torch.float16)]), dict(plugins=[fp16_plugin()])),
    "64-true": lambda: (dict(dtype=torch.float64), dict(precision="64-true")),
    "bf16-true": lambda: (dict(dtype=torch.bfloat16), dict(precision="bf16-true")),
}


@pytest.mark.parametrize("precision", sorted(CASES))
def test_a_transformer_gets_the_native_numbers_at_every_precision(precision):
    native_kw, options = CASES[precision]()
    native, nm = fit(TinyTransformer, token_dls(), "native", **native_kw)
    bridged, bm = fit(TinyTransformer, token_dls(), "lightning", **options)
    assert bm.history == nm.history
    for p, q in zip(native.model.parameters(), bridged.model.parameters()):
        assert torch.equal(p.float(), q)
    assert {p.dtype for p in bridged.model.parameters()} == {torch.float32}
    assert {v.dtype for s in bridged.opt.state.values() for v in s.values() if v.ndim} == {torch.float32}


class TokenPairs(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.x[i]}, self.y[i]


def test_bert_with_attention_dropout_gets_mixed_precision_s_numbers_under_lightnings_plugins():
    """Hugging Face BERT from a config (no download): max |dw| was 1.5e-3 with backward under autocast."""
    transformers = pytest.importorskip("transformers")

    def bert():
        config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=16, num_labels=3,
                                         attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1)
        return transformers.BertForSequenceClassification(config)

    x, y = tokens()
    dls = SimpleNamespace(train=DataLoader(TokenPairs(x[:32], y[:32]), batch_size=16, shuffle=True),
                          valid=DataLoader(TokenPairs(x[32:], y[32:]), batch_size=16))
    for precision in ("bf16-mixed", "16-mixed"):
        native_kw, options = CASES[precision]()
        native, nm = fit(bert, dls, "native", **native_kw)
        bridged, bm = fit(bert, dls, "lightning", **options)
        assert bm.history == nm.history, precision
        assert all(torch.equal(p, q) for p, q in zip(native.model.parameters(), bridged.model.parameters()))
