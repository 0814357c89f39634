"""Tests for ``models/``: the four docs/problems.md test problems as LightningModules."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_msvag.models import (
    CharLSTM,
    CharTransformer,
    ClassificationProblem,
    PreActResidualUnit,
    TFLSTMLayer,
    TFSameConv2d,
    TFSameMaxPool2d,
    TFSamePad,
    ThreeC3D,
    TwoC2D,
    WideResNet404,
    tf_same_padding,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*The number of training batches.*"),
]


@pytest.fixture(scope="module")
def wrn404() -> WideResNet404:
    torch.manual_seed(0)
    return WideResNet404()


# --------------------------------------------------------------------------- shapes and counts
def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "cls, expected",
    [(TwoC2D, 3_274_634), (ThreeC3D, 895_210), (CharLSTM, 284_499)],
)
def test_parameter_counts(cls, expected):
    assert _n_params(cls()) == expected


def test_parameter_count_wrn404(wrn404):
    # 8,935,856 conv weights + 5,392 BN channels x (gamma, beta) + fc 256*100 + 100.
    assert _n_params(wrn404) == 8_972_340
    n_bn = sum(m.num_features for m in wrn404.modules() if isinstance(m, nn.BatchNorm2d))
    assert n_bn == 5_392
    assert wrn404.hparams.depth == 40 and wrn404.hparams.width == 4 and wrn404.num_classes == 100


def test_char_lstm_parameter_breakdown():
    model = CharLSTM()
    names = {n: p.numel() for n, p in model.named_parameters()}
    assert names["embedding.weight"] == 83 * 128
    for i in range(2):  # one bias per layer, like TF's LSTMCell
        assert names[f"lstm_layers.{i}.weight_ih"] + names[f"lstm_layers.{i}.weight_hh"] == 256 * 512
        assert names[f"lstm_layers.{i}.bias"] == 512
    assert names["dense.weight"] + names["dense.bias"] == 128 * 83 + 83
    # The constant forget-gate bias is a non-persistent buffer: no parameter, no state_dict entry.
    assert not any("forget_bias" in k for k in model.state_dict())


def test_forward_shapes(wrn404):
    torch.manual_seed(0)
    with torch.no_grad():
        assert TwoC2D()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        assert ThreeC3D()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert wrn404.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 100)
        logits, (h, c) = CharLSTM().eval()(torch.randint(0, 83, (3, 7)))
    assert logits.shape == (3, 7, 83)
    assert h.shape == c.shape == (2, 3, 128)


def test_no_configure_optimizers_defined():
    # Optimizers come from LightningCLI (--optimizer) or the user, never from the modules.
    for cls in (ClassificationProblem, TwoC2D, ThreeC3D, WideResNet404, CharLSTM):
        assert "configure_optimizers" not in vars(cls), cls


def test_hyperparameters_saved():
    assert dict(ThreeC3D().hparams) == {"num_classes": 10, "weight_decay": 0.002, "conv_init": "glorot_normal"}
    assert CharLSTM().hparams.dropout == 0.2
    assert WideResNet404(depth=10, width=1).hparams.weight_decay == 5e-4
    assert TwoC2D().hparams.weight_decay == 0.0


# --------------------------------------------------------------------------- TF "SAME" padding
@pytest.mark.parametrize(
    "size, k, s, expected",
    [
        (28, 3, 2, (0, 1)),  # 3c3d pool 1: 28 -> 14
        (12, 3, 2, (0, 1)),  # 3c3d pool 2: 12 -> 6
        (6, 3, 2, (0, 1)),  # 3c3d pool 3: 6 -> 3
        (32, 3, 2, (0, 1)),  # WRN stride-2 conv: 32 -> 16
        (16, 3, 2, (0, 1)),  # WRN stride-2 conv: 16 -> 8
        (32, 1, 2, (0, 0)),  # WRN 1x1 stride-2 shortcut
        (28, 2, 2, (0, 0)),  # 2c2d pool: even sizes need no pad
        (28, 5, 1, (2, 2)),  # 2c2d conv 5x5 same: symmetric
        (5, 3, 2, (1, 1)),  # odd size: symmetric again
        (7, 2, 2, (0, 1)),
    ],
)
def test_tf_same_padding_table(size, k, s, expected):
    assert tf_same_padding(size, k, s) == expected
    before, after = expected
    assert (size + before + after - k) // s + 1 == math.ceil(size / s)


def test_tf_same_maxpool_hand_computed():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # TF SAME 3/2 on 4x4: out 2x2, one pad row/col at the bottom/right.
    # Windows: rows {0,1,2} / {2,3}, cols {0,1,2} / {2,3}.
    out = TFSameMaxPool2d(3, 2)(x)
    assert out.tolist() == [[[[10.0, 11.0], [14.0, 15.0]]]]
    # PyTorch's symmetric padding=1 uses shifted windows and gives something else.
    assert nn.MaxPool2d(3, 2, padding=1)(x).tolist() == [[[[5.0, 7.0], [13.0, 15.0]]]]
    # The padding never wins the max (-inf, not 0): all-negative input.
    out_neg = TFSameMaxPool2d(3, 2)(-x)
    assert out_neg.tolist() == [[[[-0.0, -2.0], [-8.0, -10.0]]]]


def test_tf_same_conv_hand_computed():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    conv = TFSameConv2d(1, 1, 3, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    # Sums over rows {0,1,2}/{2,3} x cols {0,1,2}/{2,3}; zero padding bottom/right.
    assert conv(x).tolist() == [[[[45.0, 39.0], [66.0, 50.0]]]]
    assert isinstance(conv, nn.Conv2d)


def test_tf_same_pad_module():
    pad = TFSamePad(3, 2, value=-1.0)
    y = pad(torch.zeros(1, 2, 6, 5))
    assert y.shape == (1, 2, 7, 7)  # H: (0, 1); W 5 -> out 3: (1, 1)
    assert y[0, 0, -1].eq(-1).all() and y[0, 0, 0, 1:-1].eq(0).all()
    x = torch.zeros(1, 1, 28, 28)
    assert TFSamePad(2, 2)(x) is x  # no copy when no padding is needed


def test_3c3d_spatial_sizes():
    m = ThreeC3D()
    x = torch.randn(1, 3, 32, 32)
    sizes = []
    for conv, pool in ((m.conv1, m.pool1), (m.conv2, m.pool2), (m.conv3, m.pool3)):
        x = conv(x)
        sizes.append(x.shape[-1])
        x = pool(x)
        sizes.append(x.shape[-1])
    assert sizes == [28, 14, 12, 6, 6, 3]


def test_wrn_structure_and_stride2_padding():
    torch.manual_seed(0)
    m = WideResNet404(depth=10, width=2)
    unit = m.group2[0]
    assert isinstance(unit, PreActResidualUnit) and unit.first
    assert isinstance(unit.conv1, TFSameConv2d) and unit.conv1.stride == (2, 2)
    assert isinstance(unit.shortcut, nn.Conv2d) and unit.shortcut.kernel_size == (1, 1)
    x = torch.randn(2, 32, 16, 16)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), unit.conv1.weight, stride=2)
    torch.testing.assert_close(unit.conv1(x), expected)
    # All convs bias-free; BN momentum 0.1 (TF decay 0.9), eps 1e-5.
    assert all(c.bias is None for c in m.modules() if isinstance(c, nn.Conv2d))
    assert all(b.momentum == 0.1 and b.eps == 1e-5 for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    # Width 1: the first group keeps 16 channels at stride 1 -> identity shortcut.
    assert WideResNet404(depth=10, width=1).group1[0].shortcut is None


def test_wrn_unit_shortcut_semantics():
    torch.manual_seed(0)
    first = PreActResidualUnit(16, 16, stride=1, first=True).eval()
    other = PreActResidualUnit(16, 16, stride=1, first=False).eval()
    other.load_state_dict(first.state_dict())
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        pre = F.relu(first.bn1(x))
        branch = first.conv2(F.relu(first.bn2(first.conv1(pre))))
        torch.testing.assert_close(first(x), branch + pre)  # shortcut on the pre-activated input
        torch.testing.assert_close(other(x), branch + x)  # shortcut on the raw input


# --------------------------------------------------------------------------- initialisation
def test_init_2c2d():
    torch.manual_seed(0)
    m = TwoC2D()
    for layer in (m.conv1, m.conv2, m.fc1, m.fc2):
        assert layer.weight.abs().max() <= 0.1 + 1e-7  # truncated at 2 sigma
        assert torch.all(layer.bias == 0.05)
    assert abs(m.fc1.weight.std().item() - 0.05 * 0.8796) < 2e-3  # std of a 2-sigma truncated normal


def test_init_3c3d():
    torch.manual_seed(0)
    m = ThreeC3D()
    w = m.conv2.weight  # fan_in 576, fan_out 864
    target = math.sqrt(2.0 / (576 + 864))
    assert abs(w.std().item() / target - 1) < 0.02
    assert w.abs().max() <= 2 * target / 0.87962566103423978 + 1e-6
    for fc in (m.fc1, m.fc2, m.fc3):
        limit = math.sqrt(6.0 / (fc.in_features + fc.out_features))
        assert fc.weight.abs().max() <= limit and fc.weight.abs().max() > 0.95 * limit
    assert all(torch.all(layer.bias == 0) for layer in (m.conv1, m.conv2, m.conv3, m.fc1, m.fc2, m.fc3))
    u = ThreeC3D(conv_init="glorot_uniform").conv2.weight
    assert u.abs().max() <= math.sqrt(6.0 / (576 + 864))


def test_init_wrn_glorot_uniform():
    torch.manual_seed(0)
    m = WideResNet404()
    checked = 0
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(mod.weight)
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            n = mod.weight.numel()
            # U[-L, L] has std L/√3; the sample std of n draws is within ~3/√(5n) of it
            tolerance = max(0.03, 3 / math.sqrt(5 * n))
            assert abs(mod.weight.std().item() / (limit / math.sqrt(3)) - 1) < tolerance, (mod, n)
            assert limit >= mod.weight.abs().max() > 0.95 * limit
            checked += 1
        elif isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
    assert checked == 1 + 3 * 6 * 2 + 3 + 1  # stem, two convs per unit, three shortcuts, fc
    assert torch.all(m.fc.bias == 0)


def test_init_char_lstm():
    torch.manual_seed(0)
    m = CharLSTM()
    lstm_limit = math.sqrt(6.0 / (256 + 512))  # joint TF kernel [in + h, 4h]
    for layer in m.lstm_layers:
        for w in (layer.weight_ih, layer.weight_hh):
            assert w.abs().max() <= lstm_limit and w.abs().max() > 0.95 * lstm_limit
        assert torch.all(layer.bias == 0)
        fb = layer.forget_bias_hh
        assert torch.all(fb[128:256] == 1) and fb.sum() == 128  # only the forget slice (i, f, g, o)
    assert m.embedding.weight.abs().max() <= math.sqrt(6.0 / (83 + 128))
    b_limit = math.sqrt(6.0 / (83 + 83))  # TF get_variable default on the 1-D softmax bias
    assert m.dense.bias.abs().max() <= b_limit and m.dense.bias.abs().max() > 0.5 * b_limit


def test_tf_lstm_layer_matches_tf_cell_equations():
    torch.manual_seed(0)
    layer = TFLSTMLayer(5, 4)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(3, 6, 5)
    h = torch.randn(1, 3, 4)
    c = torch.randn(1, 3, 4)
    out, (h_n, c_n) = layer(x, (h, c))
    # TF LSTMCell(forget_bias=1): one bias, +1 on the forget gate pre-activation.
    hh, cc = h[0], c[0]
    outs = []
    for t in range(6):
        z = x[:, t] @ layer.weight_ih.T + hh @ layer.weight_hh.T + layer.bias
        i, f, g, o = z.chunk(4, dim=1)
        cc = torch.sigmoid(f + 1.0) * cc + torch.sigmoid(i) * torch.tanh(g)
        hh = torch.sigmoid(o) * torch.tanh(cc)
        outs.append(hh)
    torch.testing.assert_close(out, torch.stack(outs, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_n[0], hh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_n[0], cc, atol=1e-5, rtol=1e-5)


def test_char_lstm_dropout_on_layer_inputs_and_outputs(monkeypatch):
    torch.manual_seed(0)
    m = CharLSTM(vocab_size=11, embedding_dim=6, hidden_size=5).train()
    calls = []
    orig = F.dropout

    def spy(x, p=0.5, training=True, inplace=False):
        calls.append((p, training))
        return orig(x, p, training, inplace)

    monkeypatch.setattr(F, "dropout", spy)
    m(torch.randint(0, 11, (2, 4)))
    assert calls == [(0.2, True)] * 4  # 2 layers x (input, output), as DropoutWrapper(0.8, 0.8)
    monkeypatch.undo()
    m.eval()
    x = torch.randint(0, 11, (2, 4))
    torch.testing.assert_close(m(x)[0], m(x)[0])  # deterministic in eval


# --------------------------------------------------------------------------- L2 term
def test_l2_3c3d_hand_computed():
    torch.manual_seed(0)
    m = ThreeC3D()
    layers = [m.conv1, m.conv2, m.conv3, m.fc1, m.fc2, m.fc3]
    expected = 0.001 * sum((layer.weight.detach() ** 2).sum() for layer in layers)
    torch.testing.assert_close(m.regularizer().detach(), expected)
    assert {id(w) for w in m.l2_weights()} == {id(layer.weight) for layer in layers}
    # Biases are excluded: changing them leaves the term unchanged.
    with torch.no_grad():
        for layer in layers:
            layer.bias.add_(3.0)
    torch.testing.assert_close(m.regularizer().detach(), expected)
    # Gradient of (wd/2)||W||^2 is wd * W.
    m.regularizer().backward()
    torch.testing.assert_close(m.conv1.weight.grad, 0.002 * m.conv1.weight.detach())
    assert m.conv1.bias.grad is None


def test_l2_wrn_excludes_bn_and_bias():
    torch.manual_seed(0)
    m = WideResNet404(depth=10, width=1)
    expected_weights = [p for n, p in m.named_parameters() if p.dim() > 1]  # conv + fc kernels
    assert {id(w) for w in m.l2_weights()} == {id(w) for w in expected_weights}
    expected = 0.5 * 5e-4 * sum((w.detach() ** 2).sum() for w in expected_weights)
    torch.testing.assert_close(m.regularizer().detach(), expected)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.mul_(3.0)
                mod.bias.add_(1.0)
        m.fc.bias.add_(1.0)
    torch.testing.assert_close(m.regularizer().detach(), expected)
    # 41 regularised kernels in the full WRN-40-4: stem + 36 unit convs + 3 shortcuts + fc.
    assert len(WideResNet404().l2_weights()) == 41


def test_l2_defaults_and_override():
    assert TwoC2D().regularizer().item() == 0.0
    assert CharLSTM().regularizer().item() == 0.0
    m = TwoC2D(weight_decay=0.1)
    expected = 0.05 * sum((layer.weight.detach() ** 2).sum() for layer in (m.conv1, m.conv2, m.fc1, m.fc2))
    torch.testing.assert_close(m.regularizer().detach(), expected)
    lstm = CharLSTM(weight_decay=0.1)
    assert [id(w) for w in lstm.l2_weights()] == [id(lstm.dense.weight)]  # conv/linear kernels only


def test_l2_list_survives_assign_load():
    m = ThreeC3D()
    sd = {k: v.clone() * 2 for k, v in m.state_dict().items()}
    m.load_state_dict(sd, assign=True)
    expected = 0.001 * sum((m.get_parameter(f"{n}.weight").detach() ** 2).sum()
                           for n in ("conv1", "conv2", "conv3", "fc1", "fc2", "fc3"))
    torch.testing.assert_close(m.regularizer().detach(), expected)


# --------------------------------------------------------------------------- CharLSTM state carry
def _tokens(b: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 83, (b, t), generator=g)


def test_state_is_carried_between_batches():  # (a)
    torch.manual_seed(0)
    m = CharLSTM().eval()
    x1, x2 = _tokens(3, 7, 1), _tokens(3, 7, 2)
    with torch.no_grad():
        m.step_logits(x1, "train", 0)
        carried = m.step_logits(x2, "train", 1)
        fresh = m(x2)[0]
        reference = m(x2, m(x1)[1])[0]
    assert not torch.allclose(carried, fresh)
    torch.testing.assert_close(carried, reference)


def test_state_reset_at_batch_idx_zero_and_on_batch_size_change():  # (b)
    torch.manual_seed(0)
    m = CharLSTM().eval()
    x1, x2 = _tokens(3, 7, 1), _tokens(3, 7, 2)
    with torch.no_grad():
        m.step_logits(x1, "train", 0)
        torch.testing.assert_close(m.step_logits(x2, "train", 0), m(x2)[0])
        m.step_logits(x1, "train", 1)
        x_small = _tokens(2, 7, 3)  # last partial batch
        torch.testing.assert_close(m.step_logits(x_small, "train", 2), m(x_small)[0])
        assert m.stream_state("train")[0].shape == (2, 2, 128)
        # Streams are independent.
        m.step_logits(x1, "val/0", 0)
        m.step_logits(x2, "val/1", 0)
        assert set(m._stream_states) == {"train", "val/0", "val/1"}
        m.on_validation_epoch_start()
        assert set(m._stream_states) == {"train"}


def test_no_gradient_across_batches():  # (c)
    torch.manual_seed(0)
    m = CharLSTM().eval()  # eval: no dropout, so both gradients below are deterministic
    x1, x2 = _tokens(3, 7, 1), _tokens(3, 7, 2)
    m.step_logits(x1, "train", 0).sum().backward()
    h, c = m.stream_state("train")
    assert not h.requires_grad and not c.requires_grad and h.grad_fn is None
    m.zero_grad()
    m.step_logits(x2, "train", 1).sum().backward()  # would fail (freed graph) if not detached
    g_carried = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m(x2, (h.clone(), c.clone()))[0].sum().backward()  # same state as a constant
    for a, b in zip(g_carried, (p.grad for p in m.parameters())):
        torch.testing.assert_close(a, b)


def test_checkpoint_round_trips_train_state(tmp_path):  # (d)
    torch.manual_seed(0)
    m = CharLSTM().eval()
    with torch.no_grad():
        m.step_logits(_tokens(3, 7, 1), "train", 0)
        m.step_logits(_tokens(3, 7, 2), "val/0", 0)
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)

    m2 = CharLSTM().eval()
    m2.load_state_dict(loaded["state_dict"])
    m2.on_load_checkpoint(loaded)
    torch.testing.assert_close(m2.stream_state("train"), m.stream_state("train"))
    assert m2.stream_state("val/0") is None  # evaluation streams restart
    x3 = _tokens(3, 7, 3)
    with torch.no_grad():
        torch.testing.assert_close(m2.step_logits(x3, "train", 1), m.step_logits(x3, "train", 1))

    # No state yet -> None is stored and nothing is restored.
    empty: dict = {}
    CharLSTM().on_save_checkpoint(empty)
    m3 = CharLSTM()
    m3.on_load_checkpoint(empty)
    assert m3.stream_state("train") is None


# --------------------------------------------------------------------------- Lightning fits
def _with_sgd(model: pl.LightningModule) -> pl.LightningModule:
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.01)
    return model


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        max_steps=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _image_loaders(shape, num_classes, batch=4):
    g = torch.Generator().manual_seed(0)

    def loader(n, bs):
        x = torch.randn(n, *shape, generator=g)
        y = torch.randint(0, num_classes, (n,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=bs)

    # Two training batches: the epoch (and its validation) ends at step 2.
    return loader(2 * batch, batch), [loader(batch, batch), loader(3, 3)]


TRAIN_KEYS = {"train/loss", "train/cross_entropy", "train/accuracy"}
EVAL_KEYS = {"train_eval/loss", "train_eval/accuracy", "test/loss", "test/accuracy"}


@pytest.mark.parametrize(
    "make, shape, num_classes",
    [
        (lambda: TwoC2D(), (1, 28, 28), 10),
        (lambda: ThreeC3D(), (3, 32, 32), 10),
        (lambda: WideResNet404(depth=10, width=1), (3, 32, 32), 100),
    ],
    ids=["2c2d", "3c3d", "wrn-10-1"],
)
def test_fit_logs_metrics_image(make, shape, num_classes):
    torch.manual_seed(0)
    model = _with_sgd(make())
    train, vals = _image_loaders(shape, num_classes)
    trainer = _trainer()
    trainer.fit(model, train_dataloaders=train, val_dataloaders=vals)
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    assert TRAIN_KEYS | EVAL_KEYS <= set(metrics)
    assert not any("dataloader_idx" in k for k in metrics)

    # The logged test split equals an independent evaluation of the final model.
    model.eval()
    x, y = next(iter(vals[1]))
    with torch.no_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y) + model.regularizer()
        acc = (logits.argmax(-1) == y).float().mean()
    torch.testing.assert_close(metrics["test/loss"], loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["test/accuracy"], acc)


def test_fit_single_val_loader_is_train_eval_and_test_step():
    torch.manual_seed(0)
    model = _with_sgd(ThreeC3D())
    train, vals = _image_loaders((3, 32, 32), 10)
    trainer = _trainer(num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=train, val_dataloaders=vals[0])
    assert {"train_eval/loss", "train_eval/accuracy"} <= set(trainer.callback_metrics)
    assert "test/loss" not in trainer.callback_metrics
    results = trainer.test(model, dataloaders=vals[1], verbose=False)
    assert set(results[0]) == {"test/loss", "test/accuracy"}


class _StateProbe(pl.Callback):
    def __init__(self):
        self.after_sanity = None
        self.first_train_batch_state = "unset"

    def on_sanity_check_end(self, trainer, pl_module):
        self.after_sanity = {k: v[0].shape[1] for k, v in pl_module._stream_states.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and self.first_train_batch_state == "unset":
            self.first_train_batch_state = pl_module.stream_state("train")


def _char_loaders(train_bs=4, seq=6, train_batches=2):
    def loader(n, bs, seed):
        x = _tokens(n, seq, seed)
        y = torch.roll(x, -1, dims=1)
        return DataLoader(TensorDataset(x, y), batch_size=bs)

    return loader(train_batches * train_bs, train_bs, 10), [loader(5, 5, 11), loader(3, 3, 12)]


def test_fit_char_lstm_logs_and_sanity_check_keeps_train_stream_clean(tmp_path):  # (e)
    torch.manual_seed(0)
    model = _with_sgd(CharLSTM())
    train, vals = _char_loaders()
    probe = _StateProbe()
    trainer = _trainer(callbacks=[probe])  # default sanity check: 1 batch per val loader
    trainer.fit(model, train_dataloaders=train, val_dataloaders=vals)
    metrics = trainer.callback_metrics
    assert TRAIN_KEYS | EVAL_KEYS <= set(metrics)
    # The sanity check evaluated both loaders in their own streams, not in "train".
    assert probe.after_sanity == {"val/0": 5, "val/1": 3}
    assert probe.first_train_batch_state is None
    assert model.stream_state("train")[0].shape == (2, 4, 128)
    assert model.stream_state("val/0")[0].shape[1] == 5 and model.stream_state("val/1")[0].shape[1] == 3

    # Per-character accuracy over batch x time equals an independent evaluation.
    model.eval()
    x, y = next(iter(vals[1]))
    with torch.no_grad():
        logits = model(x)[0]
        acc = (logits.argmax(-1) == y).float().mean()
        loss = F.cross_entropy(logits.reshape(-1, 83), y.reshape(-1))
    torch.testing.assert_close(metrics["test/accuracy"], acc)
    torch.testing.assert_close(metrics["test/loss"], loss, rtol=1e-5, atol=1e-5)

    # (d) through Lightning: a real checkpoint file carries the training stream.
    path = tmp_path / "char.ckpt"
    trainer.save_checkpoint(path)
    restored = CharLSTM.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(restored.stream_state("train"), model.stream_state("train"))


class _TrainStreamRecorder(pl.Callback):
    def __init__(self):
        self.seen = {}
        self.inputs = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state = pl_module.stream_state("train")
        self.seen[batch_idx] = None if state is None else state[0].clone()
        self.inputs[batch_idx] = batch[0].clone()


def test_mid_epoch_resume_continues_train_stream(tmp_path):  # (d) end to end
    """A mid-epoch checkpoint resumes with the next batch of the text *and* the state carried to it.

    No warning is filtered: the Tolstoi training loader is resumable, so Lightning has
    nothing to warn about (tests/test_resume.py checks the bitwise equality of whole runs).
    """
    from lightning_msvag.datamodules import TolstoiDataModule

    def data():
        return TolstoiDataModule(str(tmp_path), batch_size=4, seq_len=6)

    torch.manual_seed(0)
    straight_recorder = _TrainStreamRecorder()
    straight = _with_sgd(CharLSTM(dropout=0.0))
    _trainer(max_steps=3, limit_train_batches=3, limit_val_batches=0, callbacks=[straight_recorder]).fit(
        straight, datamodule=data()
    )

    torch.manual_seed(0)
    first = _with_sgd(CharLSTM(dropout=0.0))
    trainer = _trainer(max_steps=2, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(first, datamodule=data())  # stops after batch 1 of a 3-batch epoch
    saved = first.stream_state("train")[0].clone()
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)

    recorder = _TrainStreamRecorder()
    resumed = _with_sgd(CharLSTM(dropout=0.0))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not resumable.*")
        _trainer(max_steps=3, limit_train_batches=3, limit_val_batches=0, callbacks=[recorder]).fit(
            resumed, datamodule=data(), ckpt_path=path
        )
    assert list(recorder.seen) == [2]  # Lightning continues the epoch at batch_idx 2 ...
    torch.testing.assert_close(recorder.seen[2], saved)  # ... with the carried state ...
    # ... on the text that follows (batch 2 of the uninterrupted run), not batch 0 again
    assert torch.equal(recorder.inputs[2], straight_recorder.inputs[2])
    assert not torch.equal(recorder.inputs[2], straight_recorder.inputs[0])


# --------------------------------------------------------------------------- CharTransformer
def test_char_transformer_shapes_tied_head_and_count():
    """Defaults: width 128, 2 blocks, 4 heads, context 50: 413,824 parameters, the output layer's
    weight is the embedding (one parameter), logits [B, T, 83], a sequence beyond the context refused."""
    model = CharTransformer()
    width, blocks, vocab, context = 128, 2, 83, 50
    per_block = 2 * 2 * width + (width * 3 * width + 3 * width) + (width * width + width) \
        + (width * 4 * width + 4 * width) + (4 * width * width + width)
    assert sum(p.numel() for p in model.parameters()) == vocab * width + context * width + blocks * per_block + 2 * width == 413_824
    assert model.head.weight is model.embedding.weight
    assert model.eval()(torch.randint(0, vocab, (3, 7))).shape == (3, 7, vocab)
    with pytest.raises(ValueError, match="longer than the context 50"):
        model(torch.randint(0, vocab, (2, 51)))


def test_char_transformer_is_causal():
    """A later character never changes an earlier position's logits (the attention is causal)."""
    torch.manual_seed(0)
    model = CharTransformer(width=16, depth=2, heads=2, context=10).eval()
    x = torch.randint(0, 83, (2, 10))
    changed = x.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 83
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])
