"fastopt.optim's optimizers follow torch's same-named ones step for step, on both engines; torch's keyword names on the fastai-flavoured ones."
import inspect
from copy import deepcopy
import pytest, torch
from torch import nn
import fastopt, fastopt.demo
from fastopt import optim

def make_model(seed=0):
    "A small model with 2-D weights, 1-D biases and a conv kernel"
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(18, 7), nn.LayerNorm(7))

def run_pair(make_ours, make_ref, engine, steps=100, dtype=torch.float32):
    "Step both optimizers with the same random gradients; return both models and our optimizer"
    m1 = make_model().to(dtype); m2 = deepcopy(m1)
    o1,o2 = make_ours(m1),make_ref(m2)
    o1.engine = engine
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        for p1,p2 in zip(m1.parameters(), m2.parameters()):
            gr = torch.randn(p1.shape, generator=g, dtype=dtype) * (3. if i < 20 else 0.5)  # shrinking, so AMSGrad's max matters
            p1.grad,p2.grad = gr.clone(),gr.clone()
        o1.step(); o2.step()
    return m1,m2,o1

def rel_diff(m1, m2):
    "Largest difference between the weights, relative to the weights' scale"
    scale = max(p.detach().abs().max().item() for p in m2.parameters())
    return max((a - b).abs().max().item() for a,b in zip(m1.parameters(), m2.parameters())) / max(scale, 1.)

def two_groups(model, **extra):
    "The 2-D and 3-D weights in one group, the rest in a second one with the hyper-parameters `extra`"
    ps = list(model.parameters())
    return [{'params': [p for p in ps if p.ndim >= 2]}, {'params': [p for p in ps if p.ndim < 2], **extra}]

# (name, options): every optimizer with each of its options on and off
CASES = [
    ('Adam', {}), ('Adam', dict(weight_decay=0.1)), ('Adam', dict(amsgrad=True, weight_decay=0.1)),
    ('Adam', dict(maximize=True, betas=(0.8, 0.99), eps=1e-6)), ('Adam', dict(weight_decay=0.1, decoupled_weight_decay=True)),
    ('AdamW', {}), ('AdamW', dict(weight_decay=0.)), ('AdamW', dict(amsgrad=True, maximize=True)),
    ('SGD', {}), ('SGD', dict(momentum=0.9)), ('SGD', dict(momentum=0.9, dampening=0.3, weight_decay=0.1)),
    ('SGD', dict(momentum=0.9, nesterov=True, maximize=True)), ('SGD', dict(weight_decay=0.1, maximize=True)),
    ('RMSprop', {}), ('RMSprop', dict(alpha=0.9, weight_decay=0.1)), ('RMSprop', dict(momentum=0.9)),
    ('RMSprop', dict(centered=True)), ('RMSprop', dict(centered=True, momentum=0.5, maximize=True, weight_decay=0.1)),
    ('RAdam', {}), ('RAdam', dict(weight_decay=0.1)), ('RAdam', dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    ('RAdam', dict(betas=(0.9, 0.99))),
    ('NAdam', {}), ('NAdam', dict(weight_decay=0.1, momentum_decay=1e-2)),
    ('NAdam', dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    ('Adamax', {}), ('Adamax', dict(weight_decay=0.1)), ('Adamax', dict(maximize=True, betas=(0.8, 0.99))),
]
LRS = {'SGD': 1e-2}

def _id(c): return c[0] + ('-' + '-'.join(f'{k}={v}' for k,v in c[1].items()) if c[1] else '')

@pytest.mark.parametrize('engine', ['eager', 'fused'])
@pytest.mark.parametrize('case', CASES, ids=_id)
def test_matches_torch(case, engine):
    name,kw = case
    kw = {'lr': LRS.get(name, 1e-3), **kw}
    ours = lambda m: getattr(optim, name)(m.parameters(), **kw)
    ref = lambda m: getattr(torch.optim, name)(m.parameters(), foreach=False, **kw)
    m1,m2,o1 = run_pair(ours, ref, engine)
    assert rel_diff(m1, m2) <= 1e-6
    if engine == 'fused':   # the kernels took every step after the first (which makes the state)
        n = len(list(m1.parameters()))
        assert o1.engine.failed is None
        assert o1.engine.stepped == {'fused': 99*n, 'eager': n}

@pytest.mark.parametrize('name', ['Adam', 'AdamW', 'SGD', 'RMSprop', 'RAdam', 'NAdam', 'Adamax'])
def test_param_groups_with_torch_names(name):
    "Per-group hyper-parameters given with torch's names, as torch takes them"
    extra = {'lr': 3e-3, 'weight_decay': 0.05}
    if name == 'RMSprop': extra['alpha'] = 0.9
    if name == 'NAdam': extra['momentum_decay'] = 1e-2
    if name == 'SGD': extra['momentum'] = 0.5
    ours = lambda m: getattr(optim, name)(two_groups(m, **extra))
    ref = lambda m: getattr(torch.optim, name)(two_groups(m, **extra), foreach=False)
    m1,m2,_ = run_pair(ours, ref, 'eager', steps=30)
    assert rel_diff(m1, m2) <= 1e-6

@pytest.mark.parametrize('name', ['Adam', 'AdamW', 'SGD', 'RMSprop', 'RAdam', 'NAdam', 'Adamax'])
def test_torch_signature_and_defaults(name):
    "The same parameters, in the same order, with the same defaults, as torch's"
    ours,ref = inspect.signature(getattr(optim, name)).parameters,inspect.signature(getattr(torch.optim, name)).parameters
    assert list(ours) == list(ref)
    assert {k: p.default for k,p in ours.items()} == {k: p.default for k,p in ref.items()}
    assert [p.kind for p in ours.values()] == [p.kind for p in ref.values()]

def test_torch_names_in_param_groups_and_state():
    w = nn.Parameter(torch.ones(3))
    opt = optim.Adam([w], amsgrad=True)
    g = opt.param_groups[0]
    assert (g['lr'], g['betas'], g['eps'], g['weight_decay'], g['amsgrad'], g['maximize']) == (1e-3, (0.9, 0.999), 1e-8, 0, True, False)
    w.grad = torch.ones(3); opt.step()
    assert sorted(opt.state[w]) == ['grad_avg', 'max_sqr_avg', 'sqr_avg', 'step']
    opt = optim.SGD([w], momentum=0.9); w.grad = torch.ones(3); opt.step()
    assert sorted(opt.state[w]) == ['grad_avg'] and opt.param_groups[0]['momentum'] == 0.9

def test_implementation_switches():
    w = nn.Parameter(torch.ones(3))
    assert optim.AdamW([w], fused=True).engine.name == 'fused'
    for f in (optim.Adam, optim.SGD, optim.RMSprop):
        f([w], foreach=True); f([w], foreach=False); f([w], differentiable=False)
    with pytest.raises(NotImplementedError, match='capturable=True'): optim.Adam([w], capturable=True)
    with pytest.raises(NotImplementedError, match='differentiable=True'): optim.SGD([w], differentiable=True)
    with pytest.raises(ValueError, match='momentum=0'): optim.SGD([w], nesterov=True)
    with pytest.raises(TypeError, match='amsgrad'): optim.Adam([w], amsgrad='yes')
    with pytest.raises(ValueError, match='both `alpha` and `sqr_mom`'): optim.RMSprop([{'params': [w], 'alpha': 0.9, 'sqr_mom': 0.9}])

def test_reachable_as_fastopt_optim():
    "`torch.optim.X` → `fastopt.optim.X`, without shadowing fastai's `fastopt.Adam`"
    assert fastopt.optim.AdamW is optim.AdamW
    assert fastopt.Adam is not optim.Adam and 'optim' not in fastopt.__all__

# fastai-flavoured optimizers: torch's keyword names give the same optimizer as fastai's
P = lambda: [nn.Parameter(torch.ones(4))]

def chain(opt):
    "The callbacks' names, with a `partial`'s keywords (two partials, or two of Muon's branches, are never `==`)"
    name = lambda c: getattr(c, '__name__', None) or getattr(getattr(c, 'func', None), '__name__', None) or type(c).__name__
    return [(name(c), getattr(c, 'keywords', None)) for c in opt.cbs]
SAME = [
    (fastopt.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1), dict(lr=0.1, mom=0.9, wd=0.1)),
    (fastopt.RMSProp, dict(lr=0.1, alpha=0.9, momentum=0.5, weight_decay=0.1), dict(lr=0.1, sqr_mom=0.9, mom=0.5, wd=0.1)),
    (fastopt.Adam, dict(lr=0.1, betas=(0.8, 0.9), weight_decay=0.), dict(lr=0.1, mom=0.8, sqr_mom=0.9, wd=0.)),
    (fastopt.RAdam, dict(lr=0.1, betas=(0.8, 0.9), weight_decay=0.1), dict(lr=0.1, mom=0.8, sqr_mom=0.9, wd=0.1)),
    (fastopt.QHAdam, dict(lr=0.1, betas=(0.8, 0.9)), dict(lr=0.1, mom=0.8, sqr_mom=0.9)),
    (fastopt.Larc, dict(lr=0.1, momentum=0.8, weight_decay=0.1), dict(lr=0.1, mom=0.8, wd=0.1)),
    (fastopt.Lamb, dict(lr=0.1, betas=(0.8, 0.9), weight_decay=0.1), dict(lr=0.1, mom=0.8, sqr_mom=0.9, wd=0.1)),
    (fastopt.zoo.Lion, dict(betas=(0.8, 0.9), weight_decay=0.1), dict(mom=0.8, sqr_mom=0.9, wd=0.1)),
    (fastopt.zoo.Adan, dict(betas=(0.9, 0.8, 0.95), weight_decay=0.1), dict(mom=0.9, diff_mom=0.8, sqr_mom=0.95, wd=0.1)),
    (fastopt.zoo.NAdam, dict(betas=(0.8, 0.9), momentum_decay=1e-2), dict(mom=0.8, sqr_mom=0.9, mom_decay=1e-2)),
    (fastopt.zoo.AMSGrad, dict(betas=(0.8, 0.9), weight_decay=0.1), dict(mom=0.8, sqr_mom=0.9, wd=0.1)),
    (fastopt.zoo.Adamax, dict(betas=(0.8, 0.9)), dict(mom=0.8, sqr_mom=0.9)),
    (fastopt.zoo.StableAdamW, dict(lr=0.1, betas=(0.8, 0.9), weight_decay=0.), dict(lr=0.1, mom=0.8, sqr_mom=0.9, wd=0.)),
    (fastopt.zoo.KahanAdamW, dict(lr=0.1, betas=(0.8, 0.9), weight_decay=0.), dict(lr=0.1, mom=0.8, sqr_mom=0.9, wd=0.)),
    (fastopt.zoo.ScheduleFreeAdamW, dict(betas=(0.8, 0.9), weight_decay=0.1), dict(mom=0.8, sqr_mom=0.9, wd=0.1)),
    (fastopt.zoo.Muon, dict(momentum=0.9, weight_decay=0.05), dict(mom=0.9, wd=0.05)),
    (fastopt.zoo.LambPaper, dict(betas=(0.8, 0.9), weight_decay=0.1), dict(mom=0.8, sqr_mom=0.9, wd=0.1)),
    (fastopt.zoo.LambTimm, dict(betas=(0.8, 0.9), weight_decay=0.1), dict(mom=0.8, sqr_mom=0.9, wd=0.1)),
    (fastopt.DebiasedAdam, dict(lr=0.1, betas=(0.8, 0.9), weight_decay=0.1), dict(lr=0.1, mom=0.8, sqr_mom=0.9, wd=0.1)),
    (fastopt.CentredRMSProp, dict(lr=0.1, alpha=0.9, momentum=0.5), dict(lr=0.1, sqr_mom=0.9, mom=0.5)),
    (fastopt.GuardedAdam, dict(lr=0.1, betas=(0.8, 0.9), weight_decay=0.1), dict(lr=0.1, mom=0.8, sqr_mom=0.9, wd=0.1)),
    (fastopt.PerExampleAdam, dict(lr=0.1, betas=(0.8, 0.9), weight_decay=0.1), dict(lr=0.1, mom=0.8, sqr_mom=0.9, wd=0.1)),
    (fastopt.PerExampleRMSProp, dict(lr=0.1, alpha=0.9, weight_decay=0.1), dict(lr=0.1, sqr_mom=0.9, wd=0.1)),
    (fastopt.demo.Signum, dict(lr=0.1, momentum=0.8, weight_decay=0.1), dict(lr=0.1, mom=0.8, wd=0.1)),
]

@pytest.mark.parametrize('f,torch_kw,fastai_kw', SAME, ids=[f.__name__ for f,_,_ in SAME])
def test_torch_names_on_fastai_optimizers(f, torch_kw, fastai_kw):
    o1,o2 = f(P(), **torch_kw),f(P(), **fastai_kw)
    assert o1.hypers == o2.hypers and chain(o1) == chain(o2)
    params = inspect.signature(f).parameters
    for k in torch_kw:
        if k != 'lr': assert params[k].kind == inspect.Parameter.KEYWORD_ONLY and params[k].default is None

@pytest.mark.parametrize('f,torch_kw,fastai_kw', SAME, ids=[f.__name__ for f,_,_ in SAME])
def test_torch_name_and_fastai_twin_together_raise(f, torch_kw, fastai_kw):
    k = next(k for k in torch_kw if k != 'lr')
    twin = next(n for n in f.torch_names[k])
    with pytest.raises(ValueError, match=f'both `{k}` and `{twin}`'): f(P(), **{k: torch_kw[k], twin: fastai_kw[twin]})

def test_fastai_defaults_unchanged():
    h = fastopt.Adam(P(), 1e-3).hypers[0]
    assert (h['mom'], h['sqr_mom'], h['eps'], h['wd']) == (0.9, 0.99, 1e-5, 0.01)
    assert fastopt.SGD(P(), 0.1, weight_decay=None).hypers[0]['wd'] == 0.   # None: not given

def test_bad_torch_name_value():
    ps = P()
    with pytest.raises(TypeError, match='`betas` must be a sequence of 2'): fastopt.Adam(ps, 1e-3, betas=0.9)
    with pytest.raises(TypeError, match='betas'): fastopt.SGD(ps, 1e-3, betas=(0.9, 0.99))   # SGD has no sqr_mom
