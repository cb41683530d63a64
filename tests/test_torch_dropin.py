"""What a torch user (and an adversarial one) does with a fastopt optimizer: named parameters, tensor learning rates,
every route a hyper-parameter can arrive by checked before anything changes, state dicts that cannot be stepped
refused whole, complex parameters refused at `step`, gradients never written, torch's `repr`, a built
`OptimWrapper` as a fastai `opt_func`."""
import math
from copy import deepcopy
from functools import partial

import pytest
import torch
from torch import nn
from fastopt import Adam, SGD, Lamb, RAdam, Optimizer, OptimWrapper
from fastopt.sgd import weight_decay, momentum_step, average_grad

torch.set_num_threads(1)
ENGINES = ['eager', 'fused']


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def train(model, opt, steps=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(16, 6, generator=g)).pow(2).mean().backward()
        opt.step(); opt.zero_grad()


def snapshot(model, opt):
    "Everything a refused call must leave as it was: weights, state (tensors by value), groups"
    return ([p.detach().clone() for p in model.parameters()], deepcopy(opt.state_dict()),
            [{k: (v.clone() if isinstance(v, torch.Tensor) else deepcopy(v)) for k, v in g.items() if k != 'params'} for g in opt.param_groups])


def same(a, b):
    if isinstance(a, torch.Tensor): return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict): return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def assert_unchanged(model, opt, before):
    assert same(snapshot(model, opt), before)


# ---- named parameters

@pytest.mark.parametrize('engine', ENGINES)
def test_named_parameters_step_as_unnamed(engine):
    "`named_parameters()` (bare or in group dicts) gives the same steps as `parameters()`, and `param_names` in the state dict"
    m1, m2, m3 = make_model(), make_model(), make_model()
    o1 = Adam(m1.parameters(), lr=1e-2); o2 = Adam(m2.named_parameters(), lr=1e-2)
    o3 = Adam([{'params': m3[0].named_parameters(), 'lr': 1e-2}, {'params': m3[2].named_parameters()}], lr=1e-2)
    for o in (o1, o2, o3): o.engine = engine
    for m, o in ((m1, o1), (m2, o2), (m3, o3)): train(m, o)
    for a, b, c in zip(m1.parameters(), m2.parameters(), m3.parameters()): assert torch.equal(a, b) and torch.equal(a, c)
    assert o2.param_groups[0]['param_names'] == [n for n, _ in m2.named_parameters()]
    assert o3.state_dict()['param_groups'][1]['param_names'] == ['weight', 'bias']
    assert 'param_names' not in o2.hypers[0] and 'param_names' not in o1.state_dict()['param_groups'][0]


def test_named_and_unnamed_state_dicts_load_both_ways():
    "As torch: names in a loaded state dict replace the optimizer's; a state dict without names keeps them"
    m = make_model(); named = Adam(m.named_parameters(), lr=1e-2); train(m, named)
    m2 = make_model(); plain = Adam(m2.parameters(), lr=1e-2)
    plain.load_state_dict(named.state_dict())
    assert plain.param_groups[0]['param_names'] == [n for n, _ in m.named_parameters()]
    m3 = make_model(); named2 = Adam(m3.named_parameters(), lr=1e-2)
    unnamed = Adam(make_model().parameters(), lr=1e-2); train(make_model(), unnamed)
    named2.load_state_dict(unnamed.state_dict())
    assert named2.param_groups[0]['param_names'] == [n for n, _ in m3.named_parameters()]
    train(m3, named2)   # and it steps


def test_named_parameters_mixed_refused():
    m = make_model()
    with pytest.raises(ValueError, match='name all or none'): Adam([('w', m[0].weight), m[0].bias], lr=1e-2)
    with pytest.raises(ValueError, match='name all or none'):
        Adam([{'params': m[0].named_parameters()}, {'params': m[2].parameters()}], lr=1e-2)
    opt = Adam(m[0].named_parameters(), lr=1e-2)
    with pytest.raises(ValueError, match='with/without names'): opt.add_param_group({'params': m[2].parameters()})
    assert len(opt.param_groups) == 1
    opt.add_param_group({'params': m[2].named_parameters()})
    assert opt.param_groups[1]['param_names'] == ['weight', 'bias']


# ---- tensor hyper-parameters

@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('shape', [(), (1,), (1, 1)])
@pytest.mark.parametrize('opt_f', [Adam, partial(SGD, mom=0.9), Lamb])
def test_tensor_lr_any_one_element_shape(engine, shape, opt_f):
    "A learning rate in any one-element tensor steps as the same float does, and a scheduler's in-place update is seen"
    ma, mb = make_model(), make_model()
    a = opt_f(ma.parameters(), lr=1e-2); b = opt_f(mb.parameters(), lr=torch.full(shape, 1e-2))
    a.engine = b.engine = engine
    sa, sb = (torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (a, b))
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x = torch.randn(16, 6, generator=g)
        for m, o, s in ((ma, a, sa), (mb, b, sb)):
            m(x).pow(2).mean().backward(); o.step(); o.zero_grad(); s.step()
    assert tuple(b.param_groups[0]['lr'].shape) == shape and math.isclose(float(b.param_groups[0]['lr']), 1e-2 / 16, rel_tol=1e-6)
    for p, q in zip(ma.parameters(), mb.parameters()): torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    if engine == 'fused': assert b.engine.failed is None


# ---- every route a hyper-parameter arrives by

def _trained(seed=0):
    m = make_model(seed); opt = Adam([list(m[0].parameters()), list(m[2].parameters())], lr=1e-2); train(m, opt)
    return m, opt


def _set_item(opt, k, v): opt.param_groups[0][k] = v
def _set_hypers_list(opt, **kw): opt.hypers = [{**dict(h), **kw} for h in opt.hypers]

BAD = {
    'set_hyper alias weight_decay nan': lambda o: o.set_hyper('weight_decay', math.nan),
    'set_hyper alias momentum 2':       lambda o: o.set_hyper('momentum', 2.0),
    'set_hyper betas nan':              lambda o: o.set_hyper('betas', (0.9, math.nan)),
    'set_hyper lr inf':                 lambda o: o.set_hyper('lr', math.inf),
    'set_hyper wd inf':                 lambda o: o.set_hyper('wd', math.inf),
    'set_hyper eps inf':                lambda o: o.set_hyper('eps', math.inf),
    'set_hypers twins':                 lambda o: o.set_hypers(mom=0.5, betas=(0.8, 0.99)),
    'set_hypers betas not a pair':      lambda o: o.set_hypers(mom=0.5, betas=0.9),
    'set_hypers second bad':            lambda o: o.set_hypers(lr=0.5, wd=-1.),
    'hypers= betas nan':                lambda o: _set_hypers_list(o, betas=(0.9, math.nan)),
    'hypers= params':                   lambda o: _set_hypers_list(o, params=[]),
    'group item lr nan':                lambda o: _set_item(o, 'lr', math.nan),
    'group item weight_decay inf':      lambda o: _set_item(o, 'weight_decay', math.inf),
    'group item betas bad':             lambda o: _set_item(o, 'betas', (1.5, 0.99)),
    'add_param_group lr inf':           lambda o: o.add_param_group({'params': [nn.Parameter(torch.ones(2))], 'lr': math.inf}),
    'add_param_group without params':   lambda o: o.add_param_group({'lr': 0.1}),
}

@pytest.mark.parametrize('case', list(BAD))
def test_bad_hyper_refused_whole(case):
    "Each bad value raises a clear error naming what is wrong, and the optimizer is bit-identical afterwards"
    m, opt = _trained()
    before = snapshot(m, opt)
    with pytest.raises((ValueError, TypeError, KeyError)) as e: BAD[case](opt)
    assert '`' in str(e.value)   # names the argument
    assert_unchanged(m, opt, before)
    train(m, opt)                # and still steps


@pytest.mark.parametrize('kw', [dict(lr=math.inf), dict(lr=1e-2, wd=math.inf), dict(lr=1e-2, eps=math.inf), dict(lr=1e-2, betas=(0.9, math.nan)),
                                dict(lr=1e-2, weight_decay=math.nan)])
def test_constructor_refuses_non_finite(kw):
    with pytest.raises((ValueError, TypeError), match='`'): Adam(make_model().parameters(), **kw)


def test_good_values_by_every_route():
    m, opt = _trained()
    opt.set_hyper('betas', (0.8, 0.95)); assert (opt.hypers[0]['mom'], opt.hypers[1]['sqr_mom']) == (0.8, 0.95)
    opt.set_hyper('betas', [(0.7, 0.9), (0.6, 0.9)]); assert [h['mom'] for h in opt.hypers] == [0.7, 0.6]
    opt.param_groups[1]['weight_decay'] = 0.2; assert opt.hypers[1]['wd'] == 0.2
    opt.hypers = [{**{k: v for k, v in dict(h).items() if k not in ('mom', 'sqr_mom')}, 'betas': (0.9, 0.99)} for h in opt.hypers]
    assert opt.hypers[0]['mom'] == 0.9 and 'betas' not in dict(opt.hypers[0])
    with pytest.raises(ValueError, match='both `betas` and `mom`'): opt.hypers = [{**dict(h), 'betas': (0.9, 0.99)} for h in opt.hypers]
    train(m, opt)


# ---- state dicts that cannot be stepped

def _broken(kind, sd, opt):
    sd = deepcopy(sd); st = sd['state'][0]
    if kind == 'int state': st['grad_avg'] = st['grad_avg'].long()
    elif kind == 'complex state': st['sqr_avg'] = st['sqr_avg'].to(torch.complex64)
    elif kind == '0-d state': st['grad_avg'] = st['grad_avg'].sum()
    elif kind == 'wrong shape': st['sqr_avg'] = st['sqr_avg'].flatten()
    elif kind == 'step str': st['step'] = 'three'
    elif kind == 'step negative': st['step'] = -1
    elif kind == 'missing hyper': del sd['param_groups'][1]['eps']
    elif kind == 'bad hyper': sd['param_groups'][0]['lr'] = math.inf
    elif kind == 'group without params': del sd['param_groups'][0]['params']
    elif kind == 'groups not a list': sd['param_groups'] = {'0': sd['param_groups'][0]}
    elif kind == 'state not a dict': sd['state'] = list(sd['state'].values())
    elif kind == 'bad param_names': sd['param_groups'][0]['param_names'] = ['only one']
    elif kind == 'fresh: 0-d state': return kind
    return sd

KINDS = ['int state', 'complex state', '0-d state', 'wrong shape', 'step str', 'step negative', 'missing hyper', 'bad hyper',
         'group without params', 'groups not a list', 'state not a dict', 'bad param_names']

@pytest.mark.parametrize('fresh', [False, True], ids=['trained', 'fresh'])
@pytest.mark.parametrize('kind', KINDS)
def test_state_dict_that_cannot_step_is_refused(kind, fresh):
    "Refused with a message naming what does not fit, into a trained optimizer or a fresh one, which stays bit-identical"
    src_m, src = _trained()
    sd = _broken(kind, src.state_dict(), src)
    m, opt = (make_model(), None) if fresh else _trained(1)
    if fresh: opt = Adam([list(m[0].parameters()), list(m[2].parameters())], lr=1e-2)
    before = snapshot(m, opt)
    with pytest.raises((ValueError, TypeError), match='`'): opt.load_state_dict(sd)
    assert_unchanged(m, opt, before)
    train(m, opt)


def test_load_state_dict_not_a_dict():
    m, opt = _trained()
    with pytest.raises(TypeError, match='must be a dict'): opt.load_state_dict(list(opt.state_dict().values()))


# ---- complex parameters, whatever route

@pytest.mark.parametrize('engine', ENGINES)
def test_complex_param_appended_by_hand_refused_at_step(engine):
    m, opt = _trained(); opt.engine = engine
    before = snapshot(m, opt)
    z = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt.param_groups[0]['params'].append(z)
    m(torch.randn(4, 6)).pow(2).mean().backward(); z.grad = torch.randn_like(z)
    grads = [p.grad.clone() for p in m.parameters()]; zb = z.detach().clone()
    with pytest.raises(TypeError, match='complex'): opt.step()
    assert torch.equal(z.detach(), zb)
    opt.param_groups[0]['params'].pop()
    assert_unchanged(m, opt, before)
    assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), grads))


def test_complex_and_sparse_params_refused_by_constructor():
    with pytest.raises(TypeError, match='complex'): Adam([nn.Parameter(torch.randn(3, dtype=torch.complex64))], lr=1e-2)
    with pytest.raises(TypeError, match='sparse_coo'): Adam([nn.Parameter(torch.eye(3).to_sparse())], lr=1e-2)


# ---- gradients are never written

@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('opt_f', [partial(Adam, lr=1e-2, wd=0.1, decouple_wd=False), partial(SGD, lr=1e-2, mom=0.9, wd=0.1, decouple_wd=False),
                                   partial(RAdam, lr=1e-2, wd=0.1, decouple_wd=False)])
def test_l2_leaves_grad_alone(engine, opt_f):
    "`p.grad` after a step is the tensor backward made, its values and version unchanged, on both engines"
    m = make_model(); opt = opt_f(m.parameters()); opt.engine = engine
    ref_m = make_model(); ref = opt_f(ref_m.parameters()); ref.engine = 'eager'
    for _ in range(3):
        for mm in (m, ref_m): mm(torch.ones(4, 6)).pow(2).mean().backward()
        before = [(p.grad, p.grad.clone(), p.grad._version) for p in m.parameters()]
        opt.step(); ref.step()
        for p, (g, v, ver) in zip(m.parameters(), before): assert p.grad is g and g._version == ver and torch.equal(g, v)
        opt.zero_grad(); ref.zero_grad()
    for p, q in zip(m.parameters(), ref_m.parameters()): torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_l2_math_unchanged():
    "L2 still adds `wd*p` to the gradient the next callbacks read: SGD with L2 equals SGD on `grad + wd*p`"
    p = nn.Parameter(torch.tensor([1., 2., 3.])); q = nn.Parameter(p.detach().clone())
    a = SGD([p], lr=0.1, wd=0.5, decouple_wd=False); b = SGD([q], lr=0.1)
    p.grad = torch.tensor([0.1, 0.2, 0.3]); q.grad = p.grad + 0.5 * q.detach()
    a.step(); b.step()
    assert torch.equal(p, q)


# ---- repr

def test_repr_like_torch():
    m = make_model()
    opt = Optimizer(m.parameters(), [weight_decay, average_grad, momentum_step], lr=0.1, mom=0.9, wd=0.)
    r = repr(opt)
    assert r.startswith(f'{opt.name} (') and 'Callbacks: weight_decay, average_grad, momentum_step' in r
    assert 'Engine: ' in r and 'Parameter Group 0' in r and '    lr: 0.1' in r and r.endswith(')')


# ---- fastai: a built OptimWrapper as opt_func

def test_built_optim_wrapper_as_learner_opt_func():
    pytest.importorskip('fastai')
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    torch.manual_seed(0)
    x = torch.randn(64, 6); y = (x.sum(1) > 0).long()
    dls = DataLoaders.from_dsets(torch.utils.data.TensorDataset(x[:48], y[:48]), torch.utils.data.TensorDataset(x[48:], y[48:]),
                                 bs=16, device='cpu', num_workers=0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    built = OptimWrapper(opt=torch.optim.SGD(model.parameters(), lr=0.1))
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=built)
    w0 = model[0].weight.detach().clone()
    with learn.no_logging(): learn.fit(1, lr=0.05)
    assert learn.opt is built and not torch.equal(model[0].weight, w0)
    assert built.opt.param_groups[0]['lr'] == 0.05
