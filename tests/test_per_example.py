"Per-example second moment: the hooks' (1/B)Σ_b g_b² against brute-force per-example gradients"
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastopt import Adam
from fastopt.per_example import *

torch.set_num_threads(1)


def brute_s(model, x, y, loss_func):
    "(1/B)Σ_b g_b² per parameter, g_b = grad of example b's loss alone (a loop over examples)"
    ps = [p for p in model.parameters() if p.requires_grad]
    res = [torch.zeros_like(p) for p in ps]
    for b in range(len(x)):
        for r, g in zip(res, torch.autograd.grad(loss_func(model(x[b:b+1]), y[b:b+1]), ps)): r += g**2
    return [r / len(x) for r in res]


def per_ex_loss(out, y):
    "the loss of one example: squared error summed over everything but the batch dim"
    return (out - y).pow(2).flatten(1).sum(1)


def reduced(out, y, reduction):
    l = per_ex_loss(out, y)
    return l.mean() if reduction == 'mean' else l.sum()


def check(model, x, y, reduction, **kw):
    model = model.double(); x = x.double() if x.is_floating_point() else x
    y = y.double()
    s_true = brute_s(model, x, y, lambda o, t: per_ex_loss(o, t).sum())
    with PerExampleSqrGrads(model, reduction=reduction, **kw):
        model.zero_grad()
        reduced(model(x), y, reduction).backward()
        for (n, p), s in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], s_true):
            assert p.n_examples == len(x), n
            torch.testing.assert_close(per_example_sqr_grad(p), s, rtol=1e-10, atol=1e-12, msg=n)


MODELS = {
    'linear2d': lambda b: (nn.Sequential(nn.Linear(5, 7, bias=b), nn.Tanh(), nn.Linear(7, 3, bias=b)), (6, 5), (6, 3)),
    'linear3d': lambda b: (nn.Sequential(nn.Linear(5, 7, bias=b), nn.Tanh(), nn.Linear(7, 3, bias=b)), (6, 4, 5), (6, 4, 3)),
    'linear4d': lambda b: (nn.Linear(5, 3, bias=b), (4, 2, 3, 5), (4, 2, 3, 3)),
    'conv1d': lambda b: (nn.Sequential(nn.Conv1d(2, 4, 3, padding=1, bias=b), nn.ReLU(),
                                       nn.Conv1d(4, 3, 2, stride=2, dilation=2, bias=b)), (5, 2, 9), (5, 3, 3)),
    'conv2d': lambda b: (nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=b), nn.ReLU(),
                                       nn.Conv2d(4, 4, 3, groups=2, padding='same', padding_mode='reflect', bias=b)),
                         (5, 2, 7, 8), (5, 4, 4, 4)),
    'conv2d_circular_dilated': lambda b: (nn.Conv2d(3, 2, (3, 2), dilation=(2, 1), padding=(2, 1), padding_mode='circular', bias=b),
                                          (3, 3, 6, 5), (3, 2, 6, 6)),
    'cnn_mlp': lambda b: (nn.Sequential(nn.Conv2d(1, 3, 3, bias=b), nn.ReLU(), nn.Flatten(), nn.Linear(3*4*4, 2, bias=b)),
                          (7, 1, 6, 6), (7, 2)),
}


@pytest.mark.parametrize('reduction', ['mean', 'sum'])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('name', list(MODELS))
def test_matches_brute_force(name, bias, reduction):
    torch.manual_seed(0)
    model, xs, _ = MODELS[name](bias)
    x = torch.randn(xs)
    check(model, x, torch.randn_like(model(x)), reduction)


@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_func_layers(reduction):
    "LayerNorm, GroupNorm, Embedding go through torch.func"
    torch.manual_seed(0)
    check(nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)), torch.randn(5, 4), torch.randn(5, 2), reduction)
    check(nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(16, 2)),
          torch.randn(5, 2, 4, 4), torch.randn(5, 2), reduction)
    check(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), torch.randint(0, 10, (6, 3)), torch.randn(6, 3, 2), reduction)


def test_frozen_params_and_conv3d():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv3d(1, 2, 2), nn.Flatten(), nn.Linear(2*2*2*2, 2))
    m[2].bias.requires_grad_(False)
    check(m, torch.randn(4, 1, 3, 3, 3), torch.randn(4, 2), 'mean')
    assert getattr(m[2].bias, 'sum_grad_sqr', None) is None


@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_grad_accumulation_plain(reduction):
    "k micro-batches whose losses add up to the mean (or sum) over all of them: s over the union"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(9, 2)).double()
    x, y = torch.randn(12, 2, 5, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    s_true = brute_s(model, x, y, lambda o, t: per_ex_loss(o, t).sum())
    with PerExampleSqrGrads(model, reduction=reduction):
        model.zero_grad()
        for xb, yb in zip(x.split([4, 5, 3]), y.split([4, 5, 3])):
            l = per_ex_loss(model(xb), yb).sum()
            (l / len(x) if reduction == 'mean' else l).backward()
        for p, s in zip(model.parameters(), s_true):
            assert p.n_examples == 12
            torch.testing.assert_close(per_example_sqr_grad(p), s, rtol=1e-10, atol=1e-12)


def test_attach_resets_after_step_and_adam_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    opt = PerExampleAdam(model.parameters(), lr=1e-2, sqr_mom=0.9, wd=0.)
    s_true = brute_s(model, x, y, lambda o, t: per_ex_loss(o, t).sum())  # before the hooks, which would count it
    with PerExampleSqrGrads(model) as hooks:
        hooks.attach(opt)
        reduced(model(x), y, 'mean').backward()
        opt.step()
        for p, s in zip(model.parameters(), s_true):
            torch.testing.assert_close(opt.state[p]['sqr_avg'], 0.1 * s, rtol=1e-10, atol=1e-14)
            assert p.sum_grad_sqr is None and p.n_examples == 0
    assert not model[0]._forward_hooks and not opt._optimizer_step_post_hooks
    with pytest.raises(TypeError, match='torch.optim.Optimizer'): hooks.attach([opt])


def test_rmsprop_and_fallback_without_hooks():
    "no hooks: the callback uses grad², so PerExampleAdam is Adam"
    torch.manual_seed(0)
    m1 = nn.Linear(3, 2); m2 = nn.Linear(3, 2); m2.load_state_dict(m1.state_dict())
    o1, o2 = Adam(m1.parameters(), lr=1e-2), PerExampleAdam(m2.parameters(), lr=1e-2)
    x = torch.randn(5, 3)
    for _ in range(5):
        for m, o in ((m1, o1), (m2, o2)): m(x).pow(2).mean().backward(); o.step(); o.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()): torch.testing.assert_close(a, b)
    p = torch.zeros(2, requires_grad=True); p.grad = torch.tensor([1., -2.])
    opt = PerExampleRMSProp([p], lr=0.1, sqr_mom=0.5)
    opt.step()
    torch.testing.assert_close(opt.state[p]['sqr_avg'], torch.tensor([0.5, 2.]))


def test_batchnorm_warns_and_bad_input():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    h = PerExampleSqrGrads(m)
    assert h.uncovered == ['1.weight', '1.bias']
    with pytest.warns(UserWarning, match='1.weight'): h.install()
    h.remove()
    with pytest.raises(ValueError, match="'avg'"): PerExampleSqrGrads(m, reduction='avg')
    with pytest.raises(TypeError, match='nn.Module'): PerExampleSqrGrads([m])
    with pytest.raises(ValueError, match="'none'"): PerExampleSqrGradCallback(reduction='none')


def test_no_stats_under_no_grad():
    m = nn.Linear(3, 2)
    with PerExampleSqrGrads(m):
        with torch.no_grad(): m(torch.randn(4, 3))
        assert getattr(m.weight, 'sum_grad_sqr', None) is None


@pytest.mark.parametrize('n_acc', [None, 8])
def test_fastai_callback_with_gradient_accumulation(n_acc):
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.callback.core import Callback
    from fastai.callback.training import GradientAccumulation
    from fastai.losses import MSELossFlat
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x[:4], y[:4])), bs=4, shuffle=False, drop_last=False)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    seen = []

    class Check(Callback):
        order = GradientAccumulation.order + 1  # runs only for steps GradientAccumulation lets through
        def before_batch(self):
            if self.training: self.xs.append(self.xb[0]); self.ys.append(self.yb[0])
        def before_fit(self): self.xs, self.ys = [], []
        def before_step(self):
            xb, yb = torch.cat(self.xs), torch.cat(self.ys)
            got = [(p.n_examples, per_example_sqr_grad(p).clone()) for p in self.model.parameters()]
            s_true = brute_s(self.model, xb, yb, lambda o, t: F.mse_loss(o, t, reduction='sum'))  # (the hooks count it too)
            for (n, s), st in zip(got, s_true):
                assert n == len(xb)
                torch.testing.assert_close(s, st, rtol=1e-4, atol=1e-7)
            seen.append(len(xb)); self.xs, self.ys = [], []

    cbs = [PerExampleSqrGradCallback(), Check()] + ([GradientAccumulation(n_acc)] if n_acc else [])
    learn = Learner(dls, model, loss_func=MSELossFlat(), opt_func=PerExampleAdam, lr=1e-3, cbs=cbs)
    with learn.no_logging(): learn.fit(1)
    assert seen == ([8, 8] if n_acc else [4] * 4)
    assert model[0].weight.sum_grad_sqr is None and not model[0]._forward_hooks


def test_batch_size_independence():
    "E[ĝ²] falls like 1/B at the optimum of a regression; the mean of s does not depend on B"
    torch.manual_seed(0)
    X = torch.randn(8192, 5); w = torch.randn(5, 1); Y = X @ w + torch.randn(8192, 1)
    lin = nn.Linear(5, 1)
    with torch.no_grad(): lin.weight.copy_(w.t()); lin.bias.zero_()
    res = {}
    with PerExampleSqrGrads(lin):
        for bs in (16, 1024):
            g2 = s = 0.
            for idx in torch.arange(8192).split(bs)[:8]:
                lin.zero_grad(); lin.weight.sum_grad_sqr = None; lin.bias.sum_grad_sqr = None
                F.mse_loss(lin(X[idx]), Y[idx]).backward()
                g2 += sum(p.grad.pow(2).sum() for p in lin.parameters())
                s += sum(per_example_sqr_grad(p).sum() for p in lin.parameters())
            res[bs] = (g2 / 8, s / 8)
    assert res[1024][0] < res[16][0] / 20
    assert 0.5 < res[1024][1] / res[16][1] < 2
