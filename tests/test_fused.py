"""Fused engine == eager engine: property tests over shapes, dtypes, hypers and step counts; the user's tensors stay where
they are; the trace cache; every failure falls back exactly once; two threads"""
import copy, io, math, sys, warnings
from functools import partial
import pytest, torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck
from fastopt import *
from fastopt.zoo import Muon
from fastopt.fused import FusedEngine, engine as fengine, trace as ftrace

torch.set_num_threads(1)
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

# every built-in optimizer, with hypers drawn so that the chain's structure stays fixed (fewer compiles)
OPTS = {
    'sgd':     lambda ps, h: SGD(ps, lr=h['lr'], wd=h['wd']),
    'sgd_mom': lambda ps, h: SGD(ps, lr=h['lr'], mom=h['mom'], wd=h['wd']),
    'sgd_l2':  lambda ps, h: SGD(ps, lr=h['lr'], mom=h['mom'], wd=h['wd'], decouple_wd=False),
    'rmsprop': lambda ps, h: RMSProp(ps, lr=h['lr'], mom=h['mom'], sqr_mom=h['sqr_mom'], wd=h['wd']),
    'adam':    lambda ps, h: Adam(ps, lr=h['lr'], mom=h['mom'], sqr_mom=h['sqr_mom'], wd=h['wd']),
    'adam_l2': lambda ps, h: Adam(ps, lr=h['lr'], mom=h['mom'], sqr_mom=h['sqr_mom'], wd=h['wd'], decouple_wd=False),
    'radam':   lambda ps, h: RAdam(ps, lr=h['lr'], mom=h['mom'], sqr_mom=h['sqr_mom'], wd=h['wd']),
    'qhadam':  lambda ps, h: QHAdam(ps, lr=h['lr'], mom=h['mom'], sqr_mom=h['sqr_mom'], wd=h['wd']),
    'larc':    lambda ps, h: Larc(ps, lr=h['lr'], mom=h['mom'], wd=h['wd']),
    'lars':    lambda ps, h: Larc(ps, lr=h['lr'], mom=h['mom'], wd=h['wd'], clip=False),
    'lamb':    lambda ps, h: Lamb(ps, lr=h['lr'], mom=h['mom'], sqr_mom=h['sqr_mom'], wd=h['wd']),
    'ranger':  lambda ps, h: ranger(ps, lr=h['lr'], mom=h['mom'], sqr_mom=h['sqr_mom'], wd=h['wd'], k=2),
    'guarded': lambda ps, h: GuardedAdam(ps, lr=h['lr'], mom=h['mom'], sqr_mom=h['sqr_mom'], wd=h['wd'], v_floor_mom=0.9),  # per-tensor state
}

def make_param(kind, shape, dtype, gen):
    if kind == '0d': t = torch.randn((), generator=gen)
    elif kind == 'empty': t = torch.randn(0, 3, generator=gen)
    elif kind == 'transposed': t = torch.randn(shape[1], shape[0], generator=gen).t()
    elif kind == 'channels_last': t = torch.randn(2, shape[0], shape[1], 3, generator=gen).contiguous(memory_format=torch.channels_last)
    elif kind == 'strided': t = torch.randn(shape[0], 2*shape[1], generator=gen)[:, ::2]   # not dense: stepped eagerly
    else: t = torch.randn(*shape, generator=gen)
    return nn.Parameter(t.to(dtype))

kinds = st.sampled_from(['plain', 'plain', '0d', 'empty', 'transposed', 'channels_last', 'strided'])
shapes = st.tuples(st.integers(1, 7), st.integers(1, 9))
hypers = st.fixed_dictionaries(dict(lr=st.floats(1e-4, 0.1), mom=st.floats(0.5, 0.95), sqr_mom=st.floats(0.9, 0.999),
                                    wd=st.floats(1e-3, 0.1)))

def run_both(opt_name, specs, dtype, h, steps, grad_mask, seed=0, sched=True, device='cpu'):
    "Step the same params with the eager and the fused engine; `grad_mask[s][i]` False leaves param i without a grad at step s"
    out = []
    for engine in ('eager', 'fused'):
        gen = torch.Generator().manual_seed(seed)
        ps = [make_param(k, s, dtype, gen) for k,s in specs]
        if device != 'cpu': ps = [nn.Parameter(p.detach().to(device)) for p in ps]
        opt = OPTS[opt_name](ps, dict(h)); opt.engine = engine
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', 'fastopt fused engine: .* stepped eagerly')
            for s in range(steps):
                for i,p in enumerate(ps):
                    g = torch.randn(p.shape, generator=gen).to(dtype).to(device)
                    p.grad = g if grad_mask[s % len(grad_mask)][i % len(grad_mask[0])] else None
                if sched: opt.set_hypers(lr=h['lr']*(1 + s/10), mom=h['mom']*(1 - s/100))
                opt.step()
        out.append((ps, opt))
    return out

def assert_same(out, dtype=torch.float32):
    (pe,oe),(pf,of) = out
    tol = dict(atol=1e-5, rtol=1e-4, equal_nan=True) if dtype not in (torch.bfloat16, torch.float16) else dict(atol=3e-2, rtol=3e-2, equal_nan=True)
    for a,b in zip(pe, pf):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.detach(), b.detach(), **tol)
        se,sf = oe.state[a],of.state[b]
        assert se.keys() == sf.keys()
        for k in se:
            if isinstance(se[k], torch.Tensor): torch.testing.assert_close(se[k], sf[k], **tol)
            else: assert se[k] == sf[k], (k, se[k], sf[k])
    assert of.engine.failed is None if hasattr(of.engine, 'failed') else True

@pytest.mark.parametrize('opt_name', list(OPTS))
@settings(max_examples=4, **SETTINGS)
@given(specs=st.lists(st.tuples(kinds, shapes), min_size=1, max_size=6), h=hypers, steps=st.integers(1, 4),
       mask=st.lists(st.lists(st.booleans(), min_size=3, max_size=3), min_size=1, max_size=3), seed=st.integers(0, 100))
def test_fused_equals_eager(opt_name, specs, h, steps, mask, seed):
    "Every built-in optimizer: fused == eager over random shapes, hypers, step counts and params without grads"
    assert_same(run_both(opt_name, specs, torch.float32, h, steps, mask, seed))

@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16, torch.float16])
@settings(max_examples=3, **SETTINGS)
@given(specs=st.lists(st.tuples(kinds, shapes), min_size=1, max_size=5), h=hypers, steps=st.integers(1, 4), seed=st.integers(0, 100))
def test_fused_dtypes(dtype, specs, h, steps, seed):
    assert_same(run_both('adam', specs, dtype, h, steps, [[True, True, False], [True]*3], seed), dtype)

def test_per_param_steps():
    "Params that missed steps keep their own step count, and are stepped with it"
    specs = [('plain', (4, 5))]*4
    out = run_both('adam', specs, torch.float32, dict(lr=1e-2, mom=0.9, sqr_mom=0.99, wd=0.01), 6,
                   [[True, False, True, True], [True, True, False, True], [False, True, True, True]])
    assert_same(out)
    steps = [out[1][1].state[p]['step'] for p in out[1][0]]
    assert len(set(steps)) > 1, steps

# ---- what a user does to a model between steps: each gives what eager gives
def model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)

def train(engine, hook=None, steps=5, opt_f=partial(Adam, lr=1e-2, wd=0.01), zero='opt', groups=False, m=None):
    m = m or model()
    params = [list(m[:2].parameters()), list(m[3].parameters())] if groups else m.parameters()
    opt = opt_f(params); opt.engine = engine
    torch.manual_seed(1)
    for s in range(steps):
        if hook: m, opt = hook(s, m, opt) or (m, opt)
        x = torch.randn(16, 6, dtype=next(m.parameters()).dtype)
        m(x).pow(2).mean().backward()
        opt.step()
        if zero == 'opt': opt.zero_grad()
        elif zero == 'none': opt.zero_grad(set_to_none=True)
        else: m.zero_grad()
    return m, opt

def check(hook=None, **kw):
    me,oe = train('eager', hook, **kw)
    mf,of = train('fused', hook, **kw)
    for a,b in zip(me.parameters(), mf.parameters()): torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a,b in zip(me.parameters(), mf.parameters()):
        for k,v in oe.state[a].items():
            if isinstance(v, torch.Tensor): torch.testing.assert_close(v, of.state[b][k], atol=1e-5, rtol=1e-4)
            else: assert v == of.state[b][k]
    assert of.engine.failed is None
    return mf, of

def test_set_to_none(): check(zero='none')
def test_model_zero_grad(): check(zero='model')

def test_model_to():
    def hook(s, m, opt):
        if s == 2: m.to(torch.float64)
    check(hook)

def test_param_replaced():
    def hook(s, m, opt):
        if s == 2:
            new = nn.Parameter(m[3].weight.detach().clone() * 0.5)
            opt.param_groups[-1]['params'][0] = new; m[3].weight = new
    check(hook)

def test_param_data_replaced():
    def hook(s, m, opt):
        if s == 2: m[0].weight.data = m[0].weight.data.clone() * 2
    check(hook)

def test_freeze():
    def hook(s, m, opt):
        if s == 1: opt.freeze()
        if s == 3: opt.unfreeze()
    check(hook, groups=True)

def test_add_param_group():
    def hook(s, m, opt):
        if s == 0:   # start with the first layer only, add the rest later
            opt.param_groups[0]['params'] = list(m[0].parameters())
        if s == 2: opt.add_param_group({'params': list(m[1].parameters()) + list(m[3].parameters()), 'lr': 3e-3})
    check(hook, opt_f=partial(Adam, lr=1e-2))

def test_load_state_dict_and_clear_state():
    def hook(s, m, opt):
        if s == 2: opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        if s == 3:
            sd = opt.state_dict()
            for st in sd['state'].values(): st['grad_avg'] = st['grad_avg'] * 0.5
            opt.load_state_dict(sd)
        if s == 4: opt.clear_state()
    check(hook, steps=6)

def test_state_replaced_in_place_and_by_data():
    "State changed by the user between steps, in place or by `.data =`, is what the next step reads"
    def hook(s, m, opt):
        if s == 2:
            for st in opt.state.values(): st['grad_avg'].mul_(0.5)
        if s == 3:
            for st in opt.state.values(): st['sqr_avg'].data = st['sqr_avg'].data.clone() * 2
    check(hook, steps=5)

def test_scheduler_no_recompile(monkeypatch):
    "OneCycleLR moves lr and mom every step: no kernel is built after the first fused step"
    m = model(); opt = Adam(m.parameters(), lr=1e-2, wd=0.01); opt.engine = 'fused'
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
    for s in range(20):
        m(torch.randn(16, 6)).pow(2).mean().backward()
        opt.step(); sched.step(); opt.zero_grad()
        if s == 2: n0 = len(fengine._kernels)
    assert len(fengine._kernels) == n0 and opt.engine.failed is None

def clip_host(p, **kwargs):
    "A callback the engine cannot compile: a host sync on a tensor value"
    if p.grad.abs().max().item() > 0.5: p.grad.data.clamp_(-0.5, 0.5)

def test_fallback_one_warning():
    def opt_f(ps): return Optimizer(ps, [weight_decay, clip_host, average_grad, momentum_step], lr=1e-2, wd=0.01)
    me,oe = train('eager', opt_f=opt_f)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        mf,of = train('fused', opt_f=opt_f)
    assert len([x for x in w if 'fused engine' in str(x.message)]) == 1
    assert of.engine.failed and 'item' in of.engine.failed
    for a,b in zip(me.parameters(), mf.parameters()): assert torch.equal(a, b)

def test_muon_says_why_once():
    "Muon's chain asks for a tensor's number of dims (a Python branch on a shape): stepped eagerly, with one warning"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        mf,of = train('fused', opt_f=partial(Muon, lr=1e-2))
    msgs = [str(x.message) for x in w if 'fused engine' in str(x.message)]
    assert len(msgs) == 1 and of.engine.failed, msgs
    me,_ = train('eager', opt_f=partial(Muon, lr=1e-2))
    for a,b in zip(me.parameters(), mf.parameters()): assert torch.equal(a, b)

def test_user_callback_compiles(monkeypatch):
    "A user-written fastai-style callback runs fused, stateless chains included"
    n = count_traces(monkeypatch)
    def sign_sgd(p, lr, **kwargs): p.data.add_(torch.sign(p.grad.data), alpha=-lr)
    mf,of = check(opt_f=lambda ps: Optimizer(ps, [weight_decay, sign_sgd], lr=1e-2, wd=0.01))
    assert n[0] == 4   # 5 steps: the first creates the (empty) state eagerly, the others run fused

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize('opt_name', ['adam', 'lamb', 'larc', 'radam'])
def test_cuda(opt_name):
    specs = [('plain', (5, 7)), ('channels_last', (3, 4)), ('0d', ()), ('plain', (300, 200))]
    assert_same(run_both(opt_name, specs, torch.float32, dict(lr=1e-2, mom=0.9, sqr_mom=0.99, wd=0.01), 4,
                         [[True, True, False], [True]*3], device='cuda'))

def test_deepcopy():
    "A copy of an optimizer (deepcopy, as fastai and checkpoint code do) gets a fresh engine and steps like the original"
    m,opt = train('fused', steps=3)
    m2 = copy.deepcopy(m); opt2 = Adam(m2.parameters(), lr=1e-2, wd=0.01); opt2.engine = 'fused'
    opt2.load_state_dict(opt.state_dict())
    eng = copy.deepcopy(opt.engine)
    assert type(eng) is FusedEngine and eng is not opt.engine
    for mm,oo in ((m, opt), (m2, opt2)):
        torch.manual_seed(5); mm(torch.randn(16, 6)).pow(2).mean().backward(); oo.step()
    for a,b in zip(m.parameters(), m2.parameters()): assert torch.equal(a, b)

# ---- the user's tensors stay where they are
def test_params_keep_their_storage():
    "Any number of fused steps: `p.data` keeps its storage, earlier references alias it, a mask applied through one works"
    m = model(); opt = Adam(m.parameters(), lr=1e-2, wd=0.01); opt.engine = 'fused'
    w = m[0].weight.data                  # a reference taken before the first step
    ptrs = [p.data_ptr() for p in m.parameters()]
    for s in range(4):
        m(torch.randn(16, 6)).pow(2).mean().backward(); opt.step(); opt.zero_grad()
        if s == 1: w[:, :3] = 0           # prune through the old reference
        if s >= 1: assert (m[0].weight[:, :3] == 0).all() if s == 1 else True
    assert [p.data_ptr() for p in m.parameters()] == ptrs and w.data_ptr() == m[0].weight.data_ptr()
    assert torch.equal(w, m[0].weight.data) and opt.engine.failed is None
    for p in m.parameters(): assert p.untyped_storage().nbytes() == p.numel() * p.element_size()   # no padding

@pytest.mark.parametrize('opt_f', [partial(Adam, lr=1e-2, wd=0.1, decouple_wd=False), partial(SGD, lr=1e-2, mom=0.9, wd=0.1, decouple_wd=False),
                                   partial(Lamb, lr=1e-2, wd=0.1), partial(Larc, lr=1e-2, wd=0.1)])
@pytest.mark.parametrize('zero', ['none', 'opt'])
def test_grads_never_written(opt_f, zero):
    "`p.grad` after a fused step is the tensor backward made, with its values and `_version` unchanged (L2 decay included)"
    m = model(); opt = opt_f(m.parameters()); opt.engine = 'fused'
    for s in range(4):
        m(torch.randn(16, 6)).pow(2).mean().backward()
        before = [(p.grad, p.grad.clone(), p.grad._version) for p in m.parameters()]
        opt.step()
        if s >= 1:
            for p,(g,v,ver) in zip(m.parameters(), before): assert p.grad is g and g._version == ver and torch.equal(g, v)
        opt.zero_grad(set_to_none=zero == 'none')
    assert opt.engine.failed is None

@pytest.mark.parametrize('engine', ['eager', 'fused'])
def test_weights_stepped_under_a_saved_graph_raise_on_backward(engine):
    "A step between a forward and its backward changes weights autograd saved: backward raises on both engines"
    m = model(); opt = Adam(m.parameters(), lr=1e-2); opt.engine = engine
    m(torch.randn(16, 6)).pow(2).mean().backward(); opt.step()   # state exists: the next step is a kernel call
    opt.zero_grad()
    m(torch.randn(16, 6)).pow(2).mean().backward()
    loss = m(torch.randn(16, 6)).pow(2).mean()                  # saves the weights for its backward
    versions = [p._version for p in m.parameters()]
    opt.step()
    assert all(p._version > v for p,v in zip(m.parameters(), versions))
    with pytest.raises(RuntimeError, match='modified by an inplace operation'): loss.backward()
    if engine == 'fused': assert opt.engine.failed is None and opt.engine.stepped['fused'] > 0

def test_save_one_layer():
    "`torch.save` of one layer after fused steps writes that layer (its own storage), not the whole model"
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(64, 64) for _ in range(40)])
    opt = Adam(m.parameters(), lr=1e-3); opt.engine = 'fused'
    for _ in range(3):
        m(torch.randn(4, 64)).pow(2).mean().backward(); opt.step(); opt.zero_grad()
    buf = io.BytesIO(); torch.save(m[0].state_dict(), buf)
    assert buf.tell() < 2 * (64*64 + 64) * 4, buf.tell()
    assert opt.engine.failed is None

def test_two_optimizers_same_params_fused():
    "A second (third) optimizer over the same parameters runs fused too, and each gives what its eager twin gives"
    out = {}
    for engine in ('eager', 'fused'):
        m = model()
        opts = [Adam(m.parameters(), lr=1e-2), SGD(m.parameters(), lr=1e-2, mom=0.9), Lamb(m.parameters(), lr=1e-3)]
        for o in opts: o.engine = engine
        torch.manual_seed(3)
        with warnings.catch_warnings():
            warnings.simplefilter('error')   # no fallback, no warning
            for s in range(4):
                m(torch.randn(16, 6)).pow(2).mean().backward()
                for o in opts: o.step()
                m.zero_grad()
        out[engine] = m
        if engine == 'fused':   # 6 parameter tensors, 4 steps: the first creates the state, the next three run the kernels
            assert all(o.engine.failed is None and o.engine.stepped == {'fused': 6*3, 'eager': 6} for o in opts), [o.engine.stepped for o in opts]
    for a,b in zip(out['eager'].parameters(), out['fused'].parameters()): torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

def _held_bytes(o, skip, seen=None):
    "Bytes of the Python objects `o` holds (lists, arrays, dicts, objects), not counting tensors and the objects in `skip`"
    seen = set(skip) if seen is None else seen
    if id(o) in seen or isinstance(o, torch.Tensor): return 0
    seen.add(id(o))
    n = sys.getsizeof(o)
    if isinstance(o, dict): n += sum(_held_bytes(k, skip, seen) + _held_bytes(v, skip, seen) for k,v in o.items())
    elif isinstance(o, (list, tuple, set, frozenset)): n += sum(_held_bytes(x, skip, seen) for x in o)
    elif hasattr(o, '__dict__') and not isinstance(o, type): n += _held_bytes(vars(o), skip, seen)
    return n

def test_tiny_params_no_padding():
    """20,000 parameters of 10 elements: stepped fused, no padding, no tensor of the engine's own; what it keeps between
    steps is a few pointers and references per parameter tensor, less than the optimizer's own state dict of each"""
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(10)) for _ in range(20_000)]
    opt = Adam(ps, lr=1e-3); opt.engine = 'fused'
    for _ in range(3):
        for p in ps: p.grad = torch.randn(10)
        opt.step()
    assert opt.engine.failed is None and opt.engine.stepped['fused'] == 2 * len(ps)
    assert all(p.untyped_storage().nbytes() == 40 for p in ps)
    lay = opt.engine._layouts[opt]
    assert not [v for b in lay.buckets[0] for v in vars(b).values() if isinstance(v, torch.Tensor)]
    held = _held_bytes(lay, {id(st) for st in opt.state.values()} | {id(p) for p in ps}) / len(ps)
    assert held < sys.getsizeof(opt.state[ps[0]]) <= 250, held

# ---- the trace cache: built-in chains are traced once per structure, then replayed from their scalar program
def count_traces(monkeypatch):
    n = [0]
    real = ftrace._trace
    def counted(*a, **k): n[0] += 1; return real(*a, **k)
    monkeypatch.setattr(ftrace, '_trace', counted)
    monkeypatch.setattr(ftrace, '_traces', {})
    return n

def sched_train(engine, opt_f, steps=12, hook=None):
    m = model(); opt = opt_f(m.parameters()); opt.engine = engine
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    torch.manual_seed(1)
    for s in range(steps):
        if hook: hook(s, opt)
        m(torch.randn(16, 6)).pow(2).mean().backward()
        opt.step(); sched.step(); opt.zero_grad()
    return m, opt

def assert_models_close(a, b):
    "Close: a training run amplifies the last-bit differences of a kernel through the model"
    for x,y in zip(a.parameters(), b.parameters()): torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3)

def uncached(monkeypatch, *args, **kw):
    "The same run with every step traced"
    with monkeypatch.context() as m:
        m.setattr(fengine, 'trace_cached', lambda *a, **k: (ftrace.trace_chain(*a, **k), None))
        return sched_train('fused', *args, **kw)

def assert_models_equal(a, b):
    for x,y in zip(a.parameters(), b.parameters()): assert torch.equal(x, y)

def test_trace_cache_hits(monkeypatch):
    "Adam under OneCycleLR (lr and mom change every step): traced on one step only, then replayed, same as eager"
    n = count_traces(monkeypatch)
    opt_f = partial(Adam, lr=1e-2, wd=0.01)
    me,_ = sched_train('eager', opt_f)
    mf,of = sched_train('fused', opt_f)
    assert n[0] == 2 and [len(v) for v in ftrace._traces.values()] == [1]   # one step traced twice: plain and symbolic
    assert_models_close(me, mf); assert_models_equal(mf, uncached(monkeypatch, opt_f)[0])
    assert of.engine.failed is None and of.state[next(mf.parameters())]['step'] == 12

def test_trace_cache_branch_flips(monkeypatch):
    "A hyper that changes a Python branch (`wd` to 0 mid-training) gets a second cached trace; results stay eager's"
    n = count_traces(monkeypatch)
    def hook(s, opt):
        if s == 6: opt.set_hyper('wd', 0.)
    opt_f = partial(Adam, lr=1e-2, wd=0.1)
    me,_ = sched_train('eager', opt_f, hook=hook)
    mf,_ = sched_train('fused', opt_f, hook=hook)
    assert n[0] == 4 and [len(v) for v in ftrace._traces.values()] == [2]
    assert_models_close(me, mf); assert_models_equal(mf, uncached(monkeypatch, opt_f, hook=hook)[0])

def sqrt_decay_step(p, lr, step=0, **kwargs):
    "SGD at lr/sqrt(step): `math.sqrt` makes a Python float of a number that changes every step"
    p.data.add_(p.grad.data, alpha=-lr / math.sqrt(step + 1))
    return {'step': step + 1}
sqrt_decay_step.pure = True

def test_trace_cache_gives_up(monkeypatch):
    "A number that changes every step turned into a Python float (`math.sqrt(step)`): traced every step, as eager"
    n = count_traces(monkeypatch)
    opt_f = lambda ps: Optimizer(ps, [weight_decay, sqrt_decay_step], lr=1e-2, wd=0.01, mom=0.9)
    me,_ = sched_train('eager', opt_f, steps=14)
    mf,_ = sched_train('fused', opt_f, steps=14)
    assert_models_close(me, mf)
    assert list(ftrace._traces.values()) == [None] and n[0] >= 13

def test_trace_cache_num_sqrt(monkeypatch):
    "RAdam's and Adan's square roots of per-step numbers (`num_sqrt`) are replayed: a trace per branch, not per step"
    n = count_traces(monkeypatch)
    mf,_ = sched_train('fused', partial(RAdam, lr=1e-2, wd=0.01), steps=14)
    me,_ = sched_train('eager', partial(RAdam, lr=1e-2, wd=0.01), steps=14)
    assert_models_close(me, mf)
    assert n[0] <= 6, n[0]   # r <= 5 for the first steps, then r > 5: two structures, each traced plain and symbolic

scale = [1.]
def scaled_sgd(p, lr, **kwargs):
    "A user callback reading a global: no program of its inputs can redo it"
    p.data.add_(p.grad.data, alpha=-lr*scale[0])

def test_trace_cache_user_callback(monkeypatch):
    "A user's callback is traced every step (it may read globals), unless marked `pure`"
    n = count_traces(monkeypatch)
    def hook(s, opt): scale[0] = 1 + s
    opt_f = lambda ps: Optimizer(ps, [weight_decay, scaled_sgd], lr=1e-3, wd=0.01, mom=0.9)
    me,_ = sched_train('eager', opt_f, hook=hook)
    mf,_ = sched_train('fused', opt_f, hook=hook)
    assert_models_close(me, mf)
    assert n[0] == 11 and not ftrace._traces   # the first step creates the (empty) state eagerly
    monkeypatch.setattr(scaled_sgd, 'pure', True, raising=False)
    n[0] = 0; sched_train('fused', opt_f, hook=hook)
    assert n[0] == 2   # marked pure: cached (and now wrong for this callback, which is why it is opt-in)

def test_scalar_program():
    "The program redoes the arithmetic for new inputs and fails on a branch taken otherwise or an exact value changed"
    prog = ftrace._ScalarProgram()
    mom, step, wd = prog.input(0.9), prog.input(3), prog.input(0.1)
    db = (1 - mom**step) / (1 - mom)
    assert bool(wd != 0) and type(db) is ftrace._Sym
    run = prog.run([0.8, 5, 0.2])
    assert run(db.ref) == (1 - 0.8**5) / (1 - 0.8)
    assert prog.run([0.8, 5, 0.]) is None          # `wd != 0` was true when traced
    prog.guards.clear(); int(step)                  # a Python int made from `step`: exact
    assert prog.run([0.9, 3, 0.1]) is not None and prog.run([0.9, 4, 0.1]) is None

def test_trace_cache_shared(monkeypatch):
    "Optimizers of the same chain share one cached trace (each makes its own `partial`s of the callbacks)"
    n = count_traces(monkeypatch)
    for _ in range(3): sched_train('fused', partial(Adam, lr=1e-2, wd=0.01), steps=4)
    assert n[0] == 2 and [len(v) for v in ftrace._traces.values()] == [1]

def test_trace_cache_numpy_hypers(monkeypatch):
    "numpy numbers as hypers (fastai's discriminative lrs), changing every step: replayed, as the uncached engine"
    import numpy as np
    n = count_traces(monkeypatch)
    def hook(s, opt): opt.set_hypers(lr=np.float64(1e-2*(1 + s/10)), mom=np.float64(0.9 - s/100))
    mf,_ = sched_train('fused', partial(Adam, lr=1e-2, wd=0.01), hook=hook)
    assert n[0] == 2 and [len(v) for v in ftrace._traces.values()] == [1]
    assert_models_equal(mf, uncached(monkeypatch, partial(Adam, lr=1e-2, wd=0.01), hook=hook)[0])
    me,_ = sched_train('eager', partial(Adam, lr=1e-2, wd=0.01), hook=hook)
    assert_models_close(me, mf)

def test_graphs_differing_in_an_argument_kind_get_their_own_kernels(monkeypatch):
    "`p*lr + p` and `p*p + lr` trace to graphs alike but for a value (`v0`) where the other has a scalar (`s0`): two kernels"
    monkeypatch.setattr(fengine, '_kernels', {})
    def a(p, lr, **kwargs): p.data.copy_(p.data * lr + p.data)
    def b(p, lr, **kwargs): p.data.copy_(p.data * p.data + lr)
    for cb in (a, b, a):
        out = {}
        for engine in ('eager', 'fused'):
            torch.manual_seed(0)
            ps = [nn.Parameter(torch.randn(50))]
            opt = Optimizer(ps, [cb], lr=0.5, engine=engine)
            for _ in range(3):
                ps[0].grad = torch.randn(50); opt.step()
            out[engine] = ps[0].detach().clone()
        assert opt.engine.stepped['fused'] == 2 and torch.equal(out['eager'], out['fused']), cb.__name__
