"""The drop-in API: fastai 2.8's names, signatures and defaults; the callback contract;
param groups as lists and as dicts; set_hyper(s); freeze/force_train/do_wd; clear_state; zero_grad; closures."""
import inspect
from functools import partial

import pytest
import torch
from torch import nn

torch.set_num_threads(1)
import fastai.optimizer as fa
import fastopt as fo

NAMES = ('Optimizer sgd_step weight_decay l2_reg average_grad average_sqr_grad momentum_step SGD rms_prop_step RMSProp '
         'step_stat debias adam_step Adam radam_step RAdam qhadam_step QHAdam larc_layer_lr larc_step Larc lamb_step '
         'Lamb Lookahead ranger detuplify_pg set_item_pg pytorch_hp_map OptimWrapper').split()


def test_names_exported():
    import fastopt
    for n in NAMES:
        assert hasattr(fastopt, n), n
        assert n in dir(fastopt)
    ns = {}
    exec('from fastopt import *', ns)
    assert all(n in ns for n in NAMES), [n for n in NAMES if n not in ns]
    assert fo.pytorch_hp_map == fa.pytorch_hp_map


def _params(f): return [(p.name, p.default, p.kind) for p in inspect.signature(f).parameters.values()]


@pytest.mark.parametrize('name', [n for n in NAMES if n != 'pytorch_hp_map'])
def test_signature(name):
    "Every fastai parameter, in fastai's order, with fastai's default and kind; any extra one has a default"
    fa_ps, fo_ps = _params(getattr(fa, name)), _params(getattr(fo, name))
    fo_by_name = {p[0]: p for p in fo_ps}
    assert [p for p in fo_ps if p[0] in dict((q[0], q) for q in fa_ps)] == fa_ps, (fa_ps, fo_ps)
    extra = [p for p in fo_ps if p[0] not in {q[0] for q in fa_ps}]
    for n, default, kind in extra:  # e.g. Optimizer's `engine`: never breaks a call written for fastai
        assert default is not inspect.Parameter.empty and kind != inspect.Parameter.VAR_POSITIONAL, n
    assert all(fo_by_name[n][1] == d for n, d, _ in fa_ps)


@pytest.mark.parametrize('name', ['weight_decay', 'l2_reg', 'average_grad', 'average_sqr_grad', 'rms_prop_step',
                                  'larc_layer_lr'])
def test_callback_defaults_as_fastai(name):
    assert getattr(fo, name).defaults == getattr(fa, name).defaults


@pytest.mark.parametrize('name', ['adam_step', 'radam_step', 'qhadam_step', 'lamb_step'])
def test_fixed_defaults(name):
    "fastai sets `_defaults` (read by nothing); fastopt's `defaults` hold the same values (radam_step: plus beta=0)"
    d = getattr(fo, name).defaults
    assert {k: d[k] for k in getattr(fa, name)._defaults} == getattr(fa, name)._defaults
    ps = [nn.Parameter(torch.ones(2))]
    cbs = [partial(fo.average_grad, dampening=True), fo.average_sqr_grad, fo.step_stat, getattr(fo, name)]
    opt = fo.Optimizer(ps, cbs, lr=0.1, nu_1=0.7, nu_2=1.)
    for k, v in d.items(): assert opt.hypers[0][k] == v
    ps[0].grad = torch.ones(2)
    opt.step()


def test_functions_same_results():
    "The plain functions compute what fastai's do"
    assert fo.debias(0.9, 0.1, 5) == fa.debias(0.9, 0.1, 5)
    assert fo.step_stat(None, step=3) == fa.step_stat(None, step=3) == {'step': 4}
    pg = {'params': [], 'betas': (0.9, 0.99), 'lr': 1e-3}
    assert fo.detuplify_pg(pg) == fa.detuplify_pg(pg) == {'betas__0': 0.9, 'betas__1': 0.99, 'lr': 1e-3}
    assert fo.set_item_pg(dict(pg), 'betas__1', 0.5) == fa.set_item_pg(dict(pg), 'betas__1', 0.5)


# -- the callback contract -------------------------------------------------------------------------------------------

def test_callback_contract():
    "cb(p, **{**state, **hyper}): a returned dict is merged into the state, None leaves it; defaults via partial"
    seen = []
    def count(p, n=0, **kw): return {'n': n + 1}
    def look(p, lr, n, my_hyper, **kw): seen.append((lr, n, my_hyper))  # returns None
    look.defaults = dict(my_hyper=7)
    def step(p, lr, **kw): p.data.add_(p.grad, alpha=-lr)
    p = nn.Parameter(torch.tensor([1.]))
    opt = fo.Optimizer([p], [count, partial(look), step], lr=0.5)
    assert opt.hypers[0]['my_hyper'] == 7
    for _ in range(2):
        p.grad = torch.tensor([1.]); opt.step()
    assert seen == [(0.5, 1, 7), (0.5, 2, 7)]
    assert opt.state[p] == {'n': 2}
    assert p.item() == 0.


def test_no_grad_skipped():
    p, q = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = fo.Adam([p, q], lr=0.1)
    p.grad = torch.ones(2)
    opt.step()
    assert torch.equal(q, torch.ones(2)) and opt.state[q] == {} and opt.state[p]['step'] == 1


# -- closure ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('opt_func', [fo.SGD, fo.Adam, fo.ranger, partial(fo.OptimWrapper, opt=torch.optim.SGD)],
                         ids=['SGD', 'Adam', 'ranger', 'wrapper'])
def test_closure(opt_func):
    "The closure is evaluated once, with grad enabled (even under no_grad), and its loss returned"
    p = nn.Parameter(torch.tensor([2.]))
    opt = opt_func([p], lr=0.1)
    calls = []
    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss
    with torch.no_grad(): loss = opt.step(closure)
    assert calls == [True] and loss.item() == 4.
    assert p.item() < 2.
    assert opt.step() is None


# -- param groups -----------------------------------------------------------------------------------------------------

def test_param_groups_lists_and_dicts():
    ps = [nn.Parameter(torch.ones(2)) for _ in range(4)]
    opt = fo.Adam([ps[:2], ps[2:]], lr=1e-2)
    assert isinstance(opt, torch.optim.Optimizer)
    assert len(opt.param_groups) == 2 and [len(g) for g in opt.param_lists] == [2, 2]
    opt = fo.Adam([{'params': ps[:2], 'lr': 1e-3, 'mom': 0.5}, {'params': ps[2:], 'wd': 0.}], lr=1e-2)
    h0, h1 = opt.hypers
    assert (h0['lr'], h0['mom'], h0['wd']) == (1e-3, 0.5, 0.01)
    assert (h1['lr'], h1['mom'], h1['wd']) == (1e-2, 0.9, 0.)
    # torch's names alias fastai's
    g = opt.param_groups[0]
    assert g['betas'] == (0.5, 0.99) and g['weight_decay'] == 0.01 and g['momentum'] == 0.5
    g['betas'] = (0.8, 0.9); g['weight_decay'] = 0.2
    assert (h0['mom'], h0['sqr_mom'], h0['wd']) == (0.8, 0.9, 0.2)
    # hypers are live views of the groups
    h1['lr'] = 0.3
    assert opt.param_groups[1]['lr'] == 0.3
    # per-group values at construction, as fastai's set_hypers spreads them
    opt = fo.Adam([ps[:2], ps[2:]], lr=slice(1e-3, 1e-1))
    assert [h['lr'] for h in opt.hypers] == pytest.approx([1e-3, 1e-1])
    assert [h['lr'] for h in fa.Adam([ps[:2], ps[2:]], lr=slice(1e-3, 1e-1)).hypers] == pytest.approx([1e-3, 1e-1])


def test_set_hyper_like_fastai():
    ps = [nn.Parameter(torch.ones(2)) for _ in range(3)]
    oa, ob = fa.Adam([ps[:1], ps[1:2], ps[2:]], lr=1e-2), fo.Adam([ps[:1], ps[1:2], ps[2:]], lr=1e-2)
    for args in [('lr', 0.1), ('lr', [0.1, 0.2, 0.3]), ('lr', slice(1e-3)), ('lr', slice(1e-4, 1e-2)), ('mom', 0.8)]:
        oa.set_hyper(*args); ob.set_hyper(*args)
        for ha, hb in zip(oa.hypers, ob.hypers):
            assert set(ha) == set(hb) and all(hb[k] == pytest.approx(ha[k]) for k in ha), args
    oa.set_hypers(lr=[1, 2, 3], wd=0.5); ob.set_hypers(lr=[1, 2, 3], wd=0.5)
    assert [h['lr'] for h in ob.hypers] == [1, 2, 3] and [h['wd'] for h in ob.hypers] == [0.5] * 3


def test_torch_lr_scheduler():
    p = nn.Parameter(torch.ones(2))
    opt = fo.Adam([p], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        p.grad = torch.ones(2); opt.step(); sched.step()
    assert opt.hypers[0]['lr'] == pytest.approx(0.025)


# -- freezing, force_train, do_wd -------------------------------------------------------------------------------------

def test_freeze_like_fastai():
    ps = [nn.Parameter(torch.ones(2)) for _ in range(6)]
    qs = [nn.Parameter(torch.ones(2)) for _ in range(6)]
    oa = fa.SGD([qs[:2], qs[2:4], qs[4:]], lr=0.1)
    ob = fo.SGD([ps[:2], ps[2:4], ps[4:]], lr=0.1)
    for o, xs in ((oa, qs), (ob, ps)): o.state[xs[1]]['force_train'] = True
    for op in [('freeze',), ('freeze_to', 1), ('freeze_to', -2), ('unfreeze',), ('freeze_to', 2)]:
        getattr(oa, op[0])(*op[1:]); getattr(ob, op[0])(*op[1:])
        assert [p.requires_grad for p in ps] == [q.requires_grad for q in qs], op
        assert ob.frozen_idx == oa.frozen_idx
    ob.freeze()
    assert [p.requires_grad for p in ps] == [False, True, False, False, True, True]
    with pytest.warns(UserWarning, match='whole model is frozen'): ob.freeze_to(3)
    with pytest.raises(ValueError, match='2 parameter groups'): fo.SGD(ps, lr=0.1).freeze()


def test_do_wd():
    p, q = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = fo.SGD([p, q], lr=0.1, wd=0.5)
    opt.state[q]['do_wd'] = False
    p.grad, q.grad = torch.zeros(2), torch.zeros(2)
    opt.step()
    assert torch.allclose(p, torch.full((2,), 0.95)) and torch.equal(q, torch.ones(2))


def test_clear_state():
    ps = [nn.Parameter(torch.ones(2)) for _ in range(2)]
    opt = fo.Adam(ps, lr=0.1)
    opt.state[ps[0]]['force_train'] = True; opt.state[ps[1]]['do_wd'] = False
    for p in ps: p.grad = torch.ones(2)
    opt.step()
    assert 'grad_avg' in opt.state[ps[0]]
    opt.clear_state()
    assert opt.state[ps[0]] == {'force_train': True} and opt.state[ps[1]] == {'do_wd': False}
    la = fo.ranger(ps, lr=0.1)
    for p in ps: p.grad = torch.ones(2)
    la.step(); la.clear_state()
    assert la.count == 0 and 'slow_weight' not in la.state[ps[0]]


def test_zero_grad():
    p = nn.Parameter(torch.ones(2))
    opt = fo.SGD([p], lr=0.1)
    (p * 3).sum().backward()
    g = p.grad
    opt.zero_grad()
    assert p.grad is g and torch.equal(g, torch.zeros(2)), "fastai: zeroed in place"
    opt.zero_grad(set_to_none=True)
    assert p.grad is None
    opt.zero_grad()  # no grad: nothing to do


# -- OptimWrapper -----------------------------------------------------------------------------------------------------

def test_optim_wrapper_hypers():
    ps = [nn.Parameter(torch.ones(2)) for _ in range(2)]
    w = fo.OptimWrapper([ps[:1], ps[1:]], opt=torch.optim.AdamW, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    assert w.hypers[0] == {**{k: v for k, v in w.hypers[0].items()}, 'mom': 0.9, 'sqr_mom': 0.99, 'wd': 0.1}
    w.set_hyper('mom', [0.8, 0.85]); w.set_hyper('lr', slice(1e-3))
    assert [g['betas'] for g in w.opt.param_groups] == [(0.8, 0.99), (0.85, 0.99)]
    assert [g['lr'] for g in w.opt.param_groups] == pytest.approx([1e-4, 1e-3])
    w.freeze()
    assert [p.requires_grad for p in ps] == [False, True]
    built = torch.optim.SGD(ps, lr=0.1)
    assert fo.OptimWrapper(opt=built).opt is built
    with pytest.raises(ValueError): fo.OptimWrapper(ps, opt=built)
    with pytest.raises(ValueError): fo.OptimWrapper()


@pytest.mark.parametrize('copy_fn', ['deepcopy', 'pickle'])
@pytest.mark.parametrize('opt_func', [fo.Adam, fo.ranger, partial(fo.SGD, mom=0.9)], ids=['Adam', 'ranger', 'SGD'])
def test_copy_continues_identically(opt_func, copy_fn):
    "A copied optimizer (with its copied params) keeps cbs, engine, state, Lookahead's count, and steps alike"
    import copy, pickle
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(3)) for _ in range(4)]
    opt = opt_func([ps[:2], ps[2:]], lr=1e-2)
    opt.freeze_to(0)
    for _ in range(3):
        for p in ps: p.grad = torch.randn(3)
        opt.step()
    opt2 = copy.deepcopy(opt) if copy_fn == 'deepcopy' else pickle.loads(pickle.dumps(opt))
    ps2 = [p for g in opt2.param_groups for p in g['params']]
    name = lambda c: getattr(c, '__name__', None) or c.func.__name__
    assert [name(c) for c in opt2.cbs] == [name(c) for c in opt.cbs]
    assert type(opt2.engine) is type(opt.engine) and getattr(opt2, 'count', 0) == getattr(opt, 'count', 0)
    for _ in range(4):
        gs = [torch.randn(3) for _ in ps]
        for p, q, g in zip(ps, ps2, gs): p.grad, q.grad = g, g.clone()
        opt.step(); opt2.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, ps2))


# -- no host reads of tensor values in a step (fastai's lamb_step/larc_layer_lr compare tensors in Python) -------------

class _HostReads(torch.overrides.TorchFunctionMode):
    "Record every read of a tensor's value on the host (`bool(t)`, `t.item()`, `float(t)`...) during a step"
    names = {'__bool__', 'item', '__float__', '__int__', '__index__', 'tolist'}
    def __init__(self): super().__init__(); self.calls = []
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, '__name__', '') in self.names: self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('name,kw', [('Lamb', {}), ('Larc', {}), ('Larc', dict(clip=False)), ('Adam', {}),
                                     ('RAdam', {}), ('QHAdam', {}), ('RMSProp', {}), ('SGD', dict(mom=0.9)),
                                     ('ranger', {})], ids=str)
def test_no_host_reads(name, kw):
    ps = [nn.Parameter(torch.randn(3)) for _ in range(2)]
    opt = getattr(fo, name)(ps, lr=1e-2, **kw)
    for _ in range(7):  # RAdam: past the un-rectified steps; ranger: past a lookahead sync
        for p in ps: p.grad = torch.randn(3)
        with _HostReads() as rec: opt.step()
        assert rec.calls == [], rec.calls
    if name == 'Lamb' or name == 'Larc' and kw.get('clip', True):  # the check sees fastai's reads, so it would see ours
        qs = [nn.Parameter(torch.randn(3)) for _ in range(2)]
        opt = getattr(fa, name)(qs, lr=1e-2, **kw)
        for q in qs: q.grad = torch.randn(3)
        with _HostReads() as rec: opt.step()
        assert rec.calls
