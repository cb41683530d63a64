"""fastopt against torch.optim where the math is the same: 100 steps, several param groups (torch-style dicts with
per-group lrs), lr changed every step through `param_groups` on both, identical gradients from real backward passes.

How fastai's formulas map onto torch's (checked against torch 2.13's `torch/optim/*.py`):
- Adam: both compute `p -= lr/(1-β1^t) * m / (sqrt(v/(1-β2^t)) + eps)`: eps is added after the square root of the
  *debiased* v in both. fastai's decoupled `weight_decay` (`p *= 1-lr*wd`, before the step) is AdamW's; `l2_reg`
  (`g += wd*p`) is Adam's `weight_decay`.
- SGD with momentum: fastai's `average_grad` without dampening starts from zeros, so its first step is `buf = g`,
  exactly torch's first step (`buf = clone(g)`); later `buf = mom*buf + g` is torch's with `dampening=0`.
  torch's SGD `weight_decay` is L2, i.e. fastai's `decouple_wd=False`.
- RMSProp without momentum: `p -= lr * g / (sqrt(sq) + eps)` in both (torch's `alpha` is fastai's `sqr_mom`).
  With momentum they differ: torch accumulates the *scaled* step, `buf = mom*buf + g/(sqrt(sq)+eps)`,
  `p -= lr*buf`; fastai accumulates the raw gradient and scales it by today's denominator,
  `p -= lr * (mom*avg + g) / (sqrt(sq)+eps)`. Past gradients get today's scale instead of their own, so the two
  differ whenever sq changes (`test_rmsprop_momentum_differs` shows it).
- RAdam: the same rectification (`rho_t > 5`, same `rect` factor, un-rectified steps `p -= lr * m_hat`), and
  `decoupled_weight_decay=True` is fastai's `weight_decay`, False its `l2_reg`. Only eps is placed differently:
  torch divides by `(sqrt(v) + eps) / sqrt(1-β2^t)`, fastai by `sqrt(v/(1-β2^t)) + eps`, so torch's eps equals a
  step-dependent fastai eps `eps/sqrt(1-β2^t)`. With eps negligible next to sqrt(v) they agree
  (`test_radam_matches_torch`); with a large eps they differ exactly as that formula says
  (`test_radam_eps_placement`).
"""
from copy import deepcopy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

torch.set_num_threads(1)
import fastopt as fo

TOL = 1e-5
NSTEPS = 100
LR_MULTS = (0.3, 0.6, 1.0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.lin1 = nn.Linear(64, 16)
        self.lin2 = nn.Linear(16, 3)
    def forward(self, x): return self.lin2(F.relu(self.lin1(F.relu(self.conv(x)).flatten(1))))


def dict_groups(m, lr):
    mods = (m.conv, m.lin1, m.lin2)
    return [{'params': list(mod.parameters()), 'lr': lr * f} for mod, f in zip(mods, LR_MULTS)]


def run_both(ot, of, mt, mf, nsteps=NSTEPS, seed=1, tol=TOL):
    "Step both on identical grads; each step changes every group's lr through torch's `param_groups` API"
    gen = torch.Generator().manual_seed(seed)
    base = [g['lr'] for g in ot.param_groups]
    worst = 0.
    for i in range(nsteps):
        for o in (ot, of):
            for g, lr in zip(o.param_groups, base): g['lr'] = lr * (1 + 0.5 * ((i % 20) / 20))
        x = torch.randn(8, 2, 6, 6, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        ot.zero_grad(); F.cross_entropy(mt(x), y).backward()
        for pt, pf in zip(mt.parameters(), mf.parameters()): pf.grad = pt.grad.clone()
        ot.step(); of.step()
        worst = max(worst, max((pt - pf).abs().max().item() for pt, pf in zip(mt.parameters(), mf.parameters())))
        if tol is not None: assert worst <= tol, f"step {i}: parameters differ by {worst}"
    return worst


def make(torch_opt, fo_opt, lr, torch_kw, fo_kw, seed=0):
    torch.manual_seed(seed)
    mt = Net(); mf = deepcopy(mt)
    start = [p.detach().clone() for p in mf.parameters()]
    ot = torch_opt(dict_groups(mt, lr), lr=lr, **torch_kw)
    of = fo_opt(dict_groups(mf, lr), lr=lr, **fo_kw)
    return mt, mf, ot, of, start


def assert_moved(mf, start):
    assert min((p - s).abs().max().item() for p, s in zip(mf.parameters(), start)) > 1e-4


ADAMW = [dict(mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01), dict(mom=0.8, sqr_mom=0.999, eps=1e-8, wd=0.1),
         dict(mom=0.9, sqr_mom=0.99, eps=1e-3, wd=0.)]


@pytest.mark.parametrize('kw', ADAMW, ids=str)
def test_adam_vs_adamw(kw):
    mt, mf, ot, of, start = make(torch.optim.AdamW, fo.Adam, 3e-3,
                                 dict(betas=(kw['mom'], kw['sqr_mom']), eps=kw['eps'], weight_decay=kw['wd']), kw)
    run_both(ot, of, mt, mf)
    assert_moved(mf, start)


@pytest.mark.parametrize('kw', ADAMW, ids=str)
def test_adam_l2_vs_adam(kw):
    mt, mf, ot, of, start = make(torch.optim.Adam, fo.Adam, 3e-3,
                                 dict(betas=(kw['mom'], kw['sqr_mom']), eps=kw['eps'], weight_decay=kw['wd']),
                                 dict(kw, decouple_wd=False))
    run_both(ot, of, mt, mf)
    assert_moved(mf, start)


@pytest.mark.parametrize('mom,wd', [(0., 0.), (0.9, 0.), (0.9, 0.05), (0.5, 0.1), (0., 0.1)])
def test_sgd_vs_torch(mom, wd):
    # torch's weight_decay is L2: fastai's decouple_wd=False (for plain SGD the two are the same math anyway)
    mt, mf, ot, of, start = make(torch.optim.SGD, fo.SGD, 0.05, dict(momentum=mom, weight_decay=wd),
                                 dict(mom=mom, wd=wd, decouple_wd=False))
    run_both(ot, of, mt, mf)
    assert_moved(mf, start)


def test_sgd_first_step():
    "The first momentum step is a plain gradient step in both (no `(1-mom)` factor, no zero buffer step)"
    p1 = nn.Parameter(torch.tensor([1., 2.])); p2 = nn.Parameter(torch.tensor([1., 2.]))
    ot = torch.optim.SGD([p1], lr=0.1, momentum=0.9); of = fo.SGD([p2], lr=0.1, mom=0.9)
    for p in (p1, p2): p.grad = torch.tensor([1., -1.])
    ot.step(); of.step()
    assert torch.equal(p1, p2) and torch.allclose(p2, torch.tensor([0.9, 2.1]))


@pytest.mark.parametrize('sqr_mom,eps,wd', [(0.99, 1e-8, 0.), (0.9, 1e-3, 0.), (0.99, 1e-8, 0.05)])
def test_rmsprop_vs_torch(sqr_mom, eps, wd):
    mt, mf, ot, of, start = make(torch.optim.RMSprop, fo.RMSProp, 1e-3, dict(alpha=sqr_mom, eps=eps, weight_decay=wd),
                                 dict(sqr_mom=sqr_mom, eps=eps, wd=wd, decouple_wd=False))
    run_both(ot, of, mt, mf)
    assert_moved(mf, start)


def test_rmsprop_momentum_differs():
    "torch's RMSprop momentum accumulates scaled steps, fastai's raw grads: equal on step 1, apart afterwards"
    mt, mf, ot, of, _ = make(torch.optim.RMSprop, fo.RMSProp, 1e-3, dict(alpha=0.99, eps=1e-8, momentum=0.9),
                             dict(sqr_mom=0.99, eps=1e-8, mom=0.9))
    assert run_both(ot, of, mt, mf, nsteps=1) <= TOL
    assert run_both(ot, of, mt, mf, nsteps=20, tol=None) > 1e-3


@pytest.mark.parametrize('decoupled', [True, False])
@pytest.mark.parametrize('mom,sqr_mom,wd', [(0.9, 0.99, 0.), (0.9, 0.999, 0.05), (0.8, 0.99, 0.1)])
def test_radam_matches_torch(mom, sqr_mom, wd, decoupled):
    # eps=1e-12: negligible next to sqrt(v) so its placement (see the module docstring) does not matter
    mt, mf, ot, of, start = make(torch.optim.RAdam, fo.RAdam, 3e-3,
                                 dict(betas=(mom, sqr_mom), eps=1e-12, weight_decay=wd, decoupled_weight_decay=decoupled),
                                 dict(mom=mom, sqr_mom=sqr_mom, eps=1e-12, wd=wd, decouple_wd=decoupled))
    run_both(ot, of, mt, mf)
    assert_moved(mf, start)


def test_radam_eps_placement():
    "With a large eps: torch's eps is fastai's eps/sqrt(1-β2^t), step-dependent, so no constant eps makes them agree"
    eps, sqr_mom = 1e-2, 0.99
    mt, mf, ot, of, _ = make(torch.optim.RAdam, fo.RAdam, 3e-3, dict(betas=(0.9, sqr_mom), eps=eps),
                             dict(mom=0.9, sqr_mom=sqr_mom, eps=eps))
    assert run_both(ot, of, mt, mf, nsteps=5) <= TOL   # steps 1-5: r <= 5, un-rectified, eps unused in both
    assert run_both(ot, of, mt, mf, nsteps=20, tol=None) > 1e-4
    # ... and matching fastopt's eps to torch's at each step makes them agree again
    mt, mf, ot, of, _ = make(torch.optim.RAdam, fo.RAdam, 3e-3, dict(betas=(0.9, sqr_mom), eps=eps),
                             dict(mom=0.9, sqr_mom=sqr_mom, eps=eps))
    for t in range(1, 31):
        of.set_hyper('eps', eps / (1 - sqr_mom**t) ** 0.5)
        run_both(ot, of, mt, mf, nsteps=1, seed=t)
