"fastopt's optimizers against fastai 2.8's same-named optimizers: 100 steps, several param groups, per-group lrs"
from copy import deepcopy
from functools import partial

import pytest
import torch
from torch import nn
import torch.nn.functional as F

torch.set_num_threads(1)
import fastai.optimizer as fa
import fastopt as fo

TOL = 1e-6
NSTEPS = 100
LRS = (0.3, 0.6, 1.0)  # per-group multipliers of the optimizer's lr


class Net(nn.Module):
    "A conv layer, a batchnorm, a two-layer MLP, and a parameter that never gets a gradient"
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm1d(16)
        self.lin1 = nn.Linear(64, 16)
        self.lin2 = nn.Linear(16, 3)
        self.unused = nn.Parameter(torch.randn(5))
        nn.init.normal_(self.bn.bias, 0, 0.1)  # not zero: LARC never moves a zero tensor (its trust ratio is 0)
    def forward(self, x):
        x = F.relu(self.conv(x)).flatten(1)
        return self.lin2(self.bn(F.relu(self.lin1(x))))


def groups(m):
    "Three param groups, as a fastai splitter would give them"
    return [list(m.conv.parameters()), [*m.lin1.parameters(), *m.bn.parameters()], [*m.lin2.parameters(), m.unused]]


def make_models(seed=0):
    torch.manual_seed(seed)
    m = Net()
    return m, deepcopy(m)


def set_grads(ma, mb, gen):
    "A real backward pass on random data through `ma`; `mb` gets identical grads"
    x = torch.randn(8, 2, 6, 6, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    for p in ma.parameters(): p.grad = None
    F.cross_entropy(ma(x), y).backward()
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        pb.grad = None if pa.grad is None else pa.grad.clone()


def max_diff(ma, mb):
    return max((pa - pb).abs().max().item() for pa, pb in zip(ma.parameters(), mb.parameters()))


def hyper_list(opt, k):
    return [h[k] for h in opt.hypers]


def run_both(oa, ob, ma, mb, nsteps=NSTEPS, seed=1, schedule=True, check_every=1):
    "Step both optimizers `nsteps` times on identical grads, changing lr (and mom) each step like a scheduler"
    gen = torch.Generator().manual_seed(seed)
    base_lr = hyper_list(oa, 'lr')
    has_mom = 'mom' in oa.hypers[0]
    base_mom = hyper_list(oa, 'mom') if has_mom else None
    for i in range(nsteps):
        if schedule:  # like fit_one_cycle: both lr and mom change every step
            f = 1 + 0.5 * ((i % 20) / 20)
            for o in (oa, ob):
                o.set_hyper('lr', [lr * f for lr in base_lr])
                if has_mom: o.set_hyper('mom', [min(m * (2 - f) ** 0.1, 0.999) for m in base_mom])
        set_grads(ma, mb, gen)
        oa.step(); ob.step()
        if (i + 1) % check_every == 0:
            d = max_diff(ma, mb)
            assert d <= TOL, f"step {i}: parameters differ by {d}"
    # the parameters moved (otherwise the comparison proves nothing), the unused one did not
    return ma


def make_opts(fa_func, fo_func, lr, seed=0, mods=(fa, fo)):
    ma, mb = make_models(seed)
    oa = fa_func(groups(ma), lr=lr)
    ob = fo_func(groups(mb), lr=lr)
    for o in (oa, ob): o.set_hyper('lr', [lr * f for f in LRS])
    return ma, mb, oa, ob


# name, kwargs: fastai's optimizer `fa.NAME(**kw)` against `fo.NAME(**kw)`
CASES = [
    ('SGD', dict(lr=0.1)),
    ('SGD', dict(lr=0.05, mom=0.9)),
    ('SGD', dict(lr=0.05, mom=0.9, wd=0.1)),
    ('SGD', dict(lr=0.05, mom=0.9, wd=0.1, decouple_wd=False)),
    ('RMSProp', dict(lr=1e-3)),                       # fastai's effective eps is 1e-8, fastopt's default too
    ('RMSProp', dict(lr=1e-3, mom=0.9, wd=0.05)),
    ('RMSProp', dict(lr=1e-3, sqr_mom=0.9, wd=0.05, decouple_wd=False)),
    ('Adam', dict(lr=1e-2)),
    ('Adam', dict(lr=1e-2, wd=0.1, eps=1e-7)),
    ('Adam', dict(lr=1e-2, wd=0.1, decouple_wd=False, mom=0.8, sqr_mom=0.999)),
    ('RAdam', dict(lr=1e-2)),                         # r <= 5 for the first steps, then rectified
    ('RAdam', dict(lr=1e-2, wd=0.1, beta=5.)),        # SAdam: softplus of the denominator
    ('RAdam', dict(lr=1e-2, sqr_mom=0.999, wd=0.1, decouple_wd=False)),  # long r <= 5 phase (6 steps)
    ('QHAdam', dict(lr=1e-2)),
    ('QHAdam', dict(lr=1e-2, nu_1=0.5, nu_2=0.9, mom=0.9, sqr_mom=0.99, wd=0.1)),
    ('Larc', dict(lr=0.5)),
    ('Larc', dict(lr=0.5, clip=False, wd=0.01)),
    ('Larc', dict(lr=0.5, mom=0., clip=True, trust_coeff=0.1)),
    ('Larc', dict(lr=0.5, mom=0., clip=False, decouple_wd=False, wd=0.01)),
    ('Lamb', dict(lr=1e-2)),
    ('Lamb', dict(lr=1e-2, wd=0.1, sqr_mom=0.999)),
    ('Lamb', dict(lr=1e-2, wd=0.1, decouple_wd=False)),
    ('ranger', dict(lr=1e-2)),
    ('ranger', dict(lr=1e-2, k=3, alpha=0.7, wd=0.)),
]


@pytest.mark.parametrize('name,kw', CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k,v in kw.items())}" for n,kw in CASES])
def test_same_as_fastai(name, kw):
    kw = dict(kw); lr = kw.pop('lr')
    ma, mb, oa, ob = make_opts(partial(getattr(fa, name), **kw), partial(getattr(fo, name), **kw), lr)
    assert [dict(h) for h in ob.hypers] == [dict(h) for h in oa.hypers], "same hypers, defaults included"
    start = [p.detach().clone() for p in mb.parameters()]  # `unused` first: a module's own params precede its children's
    # fastai's `do_wd` state: no weight decay on biases (as `wd_bn_bias=False` does in a Learner)
    for o, m in ((oa, ma), (ob, mb)):
        for p in (m.conv.bias, m.lin1.bias, m.lin2.bias): o.state[p]['do_wd'] = False
    run_both(oa, ob, ma, mb)
    moved = [(p - s).abs().max().item() for p, s in zip(mb.parameters(), start)]
    assert min(moved[1:]) > 1e-4, "every trained parameter moved"
    assert moved[0] == 0, "the parameter without a gradient did not move"
    # the state each one kept agrees too (for the keys both have)
    ia, ib = oa.all_params(), ob.all_params()
    for (pa, _, sa, _), (pb, _, sb, _) in zip(ia, ib):
        for k in set(sa) & set(sb):
            va, vb = sa[k], sb[k]
            if isinstance(va, torch.Tensor): assert (va - vb).abs().max() <= TOL * max(1, va.abs().max()), k
            else: assert va == vb, k


LOOKAHEAD_INNER = [
    ('SGD', dict(lr=0.05, mom=0.9, wd=0.01)),
    ('Adam', dict(lr=1e-2, wd=0.1)),
    ('Adam', dict(lr=1e-2, decouple_wd=False, wd=0.1)),
]


@pytest.mark.parametrize('k,alpha', [(6, 0.5), (2, 0.8)])
@pytest.mark.parametrize('name,kw', LOOKAHEAD_INNER, ids=lambda o: str(o))
def test_lookahead_same_as_fastai(name, kw, k, alpha):
    kw = dict(kw); lr = kw.pop('lr')
    ma, mb = make_models(0)
    oa = fa.Lookahead(getattr(fa, name)(groups(ma), lr=lr, **kw), k=k, alpha=alpha)
    ob = fo.Lookahead(getattr(fo, name)(groups(mb), lr=lr, **kw), k=k, alpha=alpha)
    for o in (oa, ob): o.set_hyper('lr', [lr * f for f in LRS])
    run_both(oa, ob, ma, mb)
    assert oa.count == ob.count == NSTEPS
    # fastai keeps its slow weights in a list of lists, for every parameter; fastopt in the state of each parameter that
    # has had a gradient (as torch's optimizers give state): one that never had one is its own slow weight
    for pg_slow, pg in zip(oa.slow_weights, ob.param_lists):
        for sa, p in zip(pg_slow, pg): assert (sa - ob.state[p].get('slow_weight', p.detach())).abs().max() <= TOL


def test_rmsprop_eps_fix():
    "fastai's `RMSProp` drops its `eps` argument (always 1e-8); fastopt's uses it: the difference, shown explicitly"
    lr, eps = 1e-3, 1e-2
    # fastopt RMSProp(eps) == fastai RMSProp whose eps hyper is then set by hand
    ma, mb, oa, ob = make_opts(partial(fa.RMSProp, mom=0.9), partial(fo.RMSProp, mom=0.9, eps=eps), lr)
    assert hyper_list(oa, 'eps') == [1e-8] * 3 and hyper_list(ob, 'eps') == [eps] * 3
    oa.set_hyper('eps', eps)
    run_both(oa, ob, ma, mb, nsteps=30)
    # ... and differs from fastai RMSProp(eps) as it is
    ma, mb, oa, ob = make_opts(partial(fa.RMSProp, eps=eps), partial(fo.RMSProp, eps=eps), lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        set_grads(ma, mb, gen); oa.step(); ob.step()
    assert max_diff(ma, mb) > 1e-4


# Bare callback lists: fastai's `adam_step`, `radam_step`, `qhadam_step`, `lamb_step` set `_defaults` (read by nothing),
# so fastai needs eps (and beta) passed; fastopt's callbacks supply them through `defaults`.
BARE = [
    ([fa.weight_decay, partial(fa.average_grad, dampening=True), fa.average_sqr_grad, fa.step_stat, fa.adam_step],
     [fo.weight_decay, partial(fo.average_grad, dampening=True), fo.average_sqr_grad, fo.step_stat, fo.adam_step],
     dict(eps=1e-5)),
    ([partial(fa.average_grad, dampening=True), fa.average_sqr_grad, fa.step_stat, fa.radam_step],
     [partial(fo.average_grad, dampening=True), fo.average_sqr_grad, fo.step_stat, fo.radam_step],
     dict(eps=1e-5, beta=0.)),
    ([partial(fa.average_grad, dampening=True), fa.average_sqr_grad, fa.step_stat, fa.qhadam_step],
     [partial(fo.average_grad, dampening=True), fo.average_sqr_grad, fo.step_stat, fo.qhadam_step],
     dict(eps=1e-8, nu_1=0.7, nu_2=1.0)),
    ([partial(fa.average_grad, dampening=True), fa.average_sqr_grad, fa.step_stat, fa.lamb_step],
     [partial(fo.average_grad, dampening=True), fo.average_sqr_grad, fo.step_stat, fo.lamb_step],
     dict(eps=1e-6)),
]


@pytest.mark.parametrize('fa_cbs,fo_cbs,need', BARE, ids=['adam', 'radam', 'qhadam', 'lamb'])
def test_bare_callbacks_defaults(fa_cbs, fo_cbs, need):
    nu = {k: need.pop(k) for k in ('nu_1', 'nu_2') if k in need}
    ma, mb = make_models(0)
    # fastai lacks the defaults: its step fails with a bare list ...
    mc = deepcopy(ma)
    o = fa.Optimizer(groups(mc), fa_cbs, lr=1e-2, mom=0.9, sqr_mom=0.99, **nu)
    for p in mc.parameters(): p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match='eps'): o.step()
    # ... fastopt has them, and equals fastai given them by hand
    # (fastai's `partial(average_grad, ...)` loses `average_grad.defaults` too: fastopt looks through the partial)
    need = {**need, 'mom': 0.9, 'sqr_mom': 0.99}
    oa = fa.Optimizer(groups(ma), fa_cbs, lr=1e-2, **nu, **need)
    ob = fo.Optimizer(groups(mb), fo_cbs, lr=1e-2, **nu)
    assert {k: ob.hypers[0][k] for k in need} == need
    run_both(oa, ob, ma, mb, nsteps=30)


# -- state dicts saved by fastai 2.8 load into fastopt, and continuing gives fastai's results ----------------------

SD_CASES = [('SGD', dict(lr=0.05, mom=0.9, wd=0.01)), ('RMSProp', dict(lr=1e-3, mom=0.9)), ('Adam', dict(lr=1e-2, wd=0.1)),
            ('RAdam', dict(lr=1e-2)), ('QHAdam', dict(lr=1e-2)), ('Larc', dict(lr=0.5)), ('Lamb', dict(lr=1e-2, wd=0.1))]


def _snapshot(sd):
    "A deep copy of a state dict to check the loader did not change the caller's dict"
    return deepcopy(sd)


def _deep_equal(a, b):
    if isinstance(a, torch.Tensor): return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_deep_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize('name,kw', SD_CASES, ids=[n for n, _ in SD_CASES])
def test_load_fastai_state_dict(name, kw):
    kw = dict(kw); lr = kw.pop('lr')
    ma, mb, oa, ob = make_opts(partial(getattr(fa, name), **kw), partial(getattr(fo, name), **kw), lr)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):  # fastai trains alone for a while
        set_grads(ma, mb, gen); oa.step()
    oa.set_hyper('lr', [lr * f for f in (0.1, 0.2, 0.4)])
    with torch.no_grad():
        for pa, pb in zip(ma.parameters(), mb.parameters()): pb.copy_(pa)
    # fastopt, made with other hypers, loads what fastai saved
    ob.set_hyper('lr', 1.)
    sd = oa.state_dict()
    before = _snapshot(sd)
    ob.load_state_dict(sd)
    assert _deep_equal(sd, before), "load_state_dict changed the dict it was given"
    assert [dict(h) for h in ob.hypers] == [dict(h) for h in oa.hypers]
    run_both(oa, ob, ma, mb, nsteps=30, seed=7)
    # the loaded state is fastopt's own copy, not fastai's tensors
    for (pa, *_), (pb, *_) in zip(oa.all_params(), ob.all_params()):
        for k, v in ob.state[pb].items():
            if isinstance(v, torch.Tensor): assert v is not oa.state[pa].get(k)


@pytest.mark.parametrize('inner', ['SGD', 'Adam'])
def test_load_fastai_lookahead_state_dict(inner):
    kw = dict(lr=0.05, mom=0.9) if inner == 'SGD' else dict(lr=1e-2, wd=0.1)
    ma, mb = make_models(0)
    oa = fa.Lookahead(getattr(fa, inner)(groups(ma), **kw), k=4)
    ob = fo.Lookahead(getattr(fo, inner)(groups(mb), **kw), k=4)
    gen = torch.Generator().manual_seed(5)
    for _ in range(10):  # 10 steps: mid-cycle (count % k != 0), so the slow weights differ from the fast ones
        set_grads(ma, mb, gen); oa.step()
    with torch.no_grad():
        for pa, pb in zip(ma.parameters(), mb.parameters()): pb.copy_(pa)
    sd = oa.state_dict()
    before = _snapshot(sd)
    ob.load_state_dict(sd)
    assert _deep_equal(sd, before), "Lookahead.load_state_dict popped keys out of (or changed) the caller's dict"
    assert ob.count == oa.count == 10
    run_both(oa, ob, ma, mb, nsteps=30, seed=7)


def test_fastopt_state_dict_roundtrip():
    "fastopt's own (torch-format) state dict, loaded into a fresh optimizer, continues identically"
    ma, mb, oa, ob = make_opts(partial(fo.Adam, wd=0.1), partial(fo.Adam, wd=0.1), 1e-2)
    gen = torch.Generator().manual_seed(5)
    for _ in range(10):
        set_grads(ma, mb, gen); oa.step()
    with torch.no_grad():
        for pa, pb in zip(ma.parameters(), mb.parameters()): pb.copy_(pa)
    sd = deepcopy(oa.state_dict())
    assert set(sd) == {'state', 'param_groups', 'fastopt'}  # torch's keys plus fastopt's type/chain metadata
    ob.load_state_dict(sd)
    run_both(oa, ob, ma, mb, nsteps=20, seed=7)


@pytest.mark.parametrize('name,hypers', [
    ('SGD', dict(mom=[0.5, 0.8, 0.9], wd=[0., 0.1, 0.01])),
    ('Adam', dict(mom=[0.8, 0.9, 0.95], sqr_mom=[0.9, 0.99, 0.999], wd=[0.1, 0., 0.01], eps=[1e-8, 1e-5, 1e-3])),
    ('RAdam', dict(sqr_mom=[0.9, 0.99, 0.999], beta=[0., 5., 0.])),
    ('Lamb', dict(wd=[0.1, 0., 0.01], eps=[1e-6, 1e-5, 1e-3])),
])
def test_per_group_hypers_same_as_fastai(name, hypers):
    "Every hyper set per group (not just lr) and scheduled lr/mom: still fastai's numbers"
    kw = {'mom': 0.9} if name == 'SGD' else {}
    ma, mb, oa, ob = make_opts(partial(getattr(fa, name), **kw), partial(getattr(fo, name), **kw), 1e-2)
    for o in (oa, ob): o.set_hypers(**hypers)
    assert [dict(h) for h in ob.hypers] == [dict(h) for h in oa.hypers]
    run_both(oa, ob, ma, mb, nsteps=50)
