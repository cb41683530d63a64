"Fused engine == eager engine: property tests over shapes, dtypes, hypers and step counts, and the cases that break flat buffers"
import copy, warnings
from functools import partial
import pytest, torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck
import fastopt
from fastopt import *
from fastopt import fused
from fastopt.fused import FusedEngine

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
    tol = dict(atol=1e-5, rtol=1e-4) if dtype != torch.bfloat16 else dict(atol=3e-2, rtol=3e-2)
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

@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
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

# ---- the things that break flat buffers: each must give what eager gives
def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

def train(engine, hook=None, steps=5, opt_f=partial(Adam, lr=1e-2, wd=0.01), zero='opt', groups=False):
    m = model()
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

def test_state_views():
    "State stays readable: tensors of the param's shape, in torch's state_dict, and writable in place"
    m,opt = check(steps=3)
    for p in m.parameters():
        assert opt.state[p]['grad_avg'].shape == p.shape
    sd = opt.state_dict()
    assert all(v['grad_avg'].shape == p.shape for v,p in zip(sd['state'].values(), m.parameters()))

def test_scheduler_no_recompile():
    from torch._dynamo.utils import counters
    m = model(); opt = Adam(m.parameters(), lr=1e-2, wd=0.01); opt.engine = 'fused'
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
    for s in range(20):
        m(torch.randn(16, 6)).pow(2).mean().backward()
        opt.step(); sched.step(); opt.zero_grad()
        if s == 2: c0,g0 = fused.compile_count, counters['stats']['unique_graphs']
    assert fused.compile_count == c0 and counters['stats']['unique_graphs'] == g0
    assert opt.engine.failed is None

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
    for a,b in zip(me.parameters(), mf.parameters()): torch.testing.assert_close(a, b)

def test_user_callback_compiles(monkeypatch):
    "A user-written fastai-style callback (seed 003's style) runs fused, stateless chains included"
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
    for a,b in zip(m.parameters(), m2.parameters()): torch.testing.assert_close(a, b)

@pytest.fixture
def isa_fresh(monkeypatch):
    "The engine's instruction-set decision not yet taken, inductor's setting restored afterwards"
    from torch._inductor import config
    monkeypatch.setattr(fused, '_isa_forced', None)
    old = config.cpp.vec_isa_ok
    yield config
    config.cpp.vec_isa_ok = old

def test_isa_user_setting_kept(isa_fresh):
    "A `vec_isa_ok` the user set (TORCHINDUCTOR_VEC_ISA_OK) is left alone"
    isa_fresh.cpp.vec_isa_ok = False
    fused._before_cpu_compile()
    assert isa_fresh.cpp.vec_isa_ok is False and fused._isa_forced is False

@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ('AVX2', 'AVX512'), reason="x86 with AVX2 or AVX-512")
def test_isa_compile_failure_retries(isa_fresh, monkeypatch):
    "A compile that fails with the checks skipped is retried with inductor's checks: same result, no fallback, no warning"
    isa_fresh.cpp.vec_isa_ok = None
    monkeypatch.setattr(fused, '_compiled', {}); monkeypatch.setattr(fused, '_sources', {})
    real, seen = torch.compile, []
    def compile_(fn, **kw):
        c = real(fn, **kw)
        def f(*a):
            seen.append(isa_fresh.cpp.vec_isa_ok)
            if isa_fresh.cpp.vec_isa_ok: raise RuntimeError("compiler: unknown option -mavx512f")
            return c(*a)
        return f
    monkeypatch.setattr(torch, 'compile', compile_)
    me,oe = train('eager')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        mf,of = train('fused')
    assert not [x for x in w if 'fused engine' in str(x.message)]
    assert seen[0] is True and None in seen and fused._isa_forced == 'undone' and isa_fresh.cpp.vec_isa_ok is None
    assert of.engine.failed is None
    for a,b in zip(me.parameters(), mf.parameters()): torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

# the trace cache: built-in chains are traced once per structure, then replayed from their scalar program

def count_traces(monkeypatch):
    n = [0]
    real = fused.trace_chain
    def counted(*a, **k): n[0] += 1; return real(*a, **k)
    monkeypatch.setattr(fused, 'trace_chain', counted)
    monkeypatch.setattr(fused, '_traces', {})
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
    "Close: a training run amplifies the last-bit differences of a fused kernel (FMAs) through the model"
    for x,y in zip(a.parameters(), b.parameters()): torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3)

def uncached(monkeypatch, *args, **kw):
    "The same run with every step traced"
    with monkeypatch.context() as m:
        m.setattr(fused, 'trace_cached', fused.trace_chain)
        return sched_train('fused', *args, **kw)

def assert_models_equal(a, b):
    for x,y in zip(a.parameters(), b.parameters()): assert torch.equal(x, y)

def test_trace_cache_hits(monkeypatch):
    "Adam under OneCycleLR (lr and mom change every step): traced on one step only, then replayed, same as eager"
    n = count_traces(monkeypatch)
    opt_f = partial(Adam, lr=1e-2, wd=0.01)
    me,_ = sched_train('eager', opt_f)
    mf,of = sched_train('fused', opt_f)
    assert n[0] == 2 and [len(v) for v in fused._traces.values()] == [1]   # one step traced twice: plain and symbolic
    assert_models_close(me, mf); assert_models_equal(mf, uncached(monkeypatch, opt_f)[0])
    assert of.engine.failed is None and of.state[next(mf.parameters())]['step'] == 12

def test_trace_cache_branch_flips(monkeypatch):
    "A hyper that changes a python branch (`wd` to 0 mid-training) gets a second cached trace; results stay eager's"
    n = count_traces(monkeypatch)
    def hook(s, opt):
        if s == 6: opt.set_hyper('wd', 0.)
    opt_f = partial(Adam, lr=1e-2, wd=0.1)
    me,_ = sched_train('eager', opt_f, hook=hook)
    mf,_ = sched_train('fused', opt_f, hook=hook)
    assert n[0] == 4 and [len(v) for v in fused._traces.values()] == [2]
    assert_models_close(me, mf); assert_models_equal(mf, uncached(monkeypatch, opt_f, hook=hook)[0])

def test_trace_cache_gives_up(monkeypatch):
    "RAdam turns a number that changes every step into a python float (`math.sqrt`): traced every step, as eager"
    n = count_traces(monkeypatch)
    opt_f = partial(RAdam, lr=1e-2, wd=0.01)
    me,_ = sched_train('eager', opt_f, steps=14)
    mf,_ = sched_train('fused', opt_f, steps=14)
    assert_models_close(me, mf)
    assert list(fused._traces.values()) == [None] and n[0] >= 14

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
    assert n[0] == 11 and not fused._traces   # the first step creates the (empty) state eagerly
    monkeypatch.setattr(scaled_sgd, 'pure', True, raising=False)
    n[0] = 0; sched_train('fused', opt_f, hook=hook)
    assert n[0] == 2   # marked pure: cached (and now wrong for this callback, which is why it is opt-in)

def test_scalar_program():
    "The program redoes the arithmetic for new inputs and fails on a branch taken otherwise or an exact value changed"
    prog = fused._ScalarProgram()
    mom, step, wd = prog.input(0.9), prog.input(3), prog.input(0.1)
    db = (1 - mom**step) / (1 - mom)
    assert bool(wd != 0) and type(db) is fused._Sym
    run = prog.run([0.8, 5, 0.2])
    assert run(db.ref) == (1 - 0.8**5) / (1 - 0.8)
    assert prog.run([0.8, 5, 0.]) is None          # `wd != 0` was true when traced
    prog.guards.clear(); int(step)                  # a python int made from `step`: exact
    assert prog.run([0.9, 3, 0.1]) is not None and prog.run([0.9, 4, 0.1]) is None

def test_trace_cache_shared(monkeypatch):
    "Optimizers of the same chain share one cached trace (each makes its own `partial`s of the callbacks)"
    n = count_traces(monkeypatch)
    for _ in range(3): sched_train('fused', partial(Adam, lr=1e-2, wd=0.01), steps=4)
    assert n[0] == 2 and [len(v) for v in fused._traces.values()] == [1]

def test_trace_cache_numpy_hypers(monkeypatch):
    "numpy numbers as hypers (fastai's discriminative lrs), changing every step: replayed, as the uncached engine"
    import numpy as np
    n = count_traces(monkeypatch)
    def hook(s, opt): opt.set_hypers(lr=np.float64(1e-2*(1 + s/10)), mom=np.float64(0.9 - s/100))
    mf,_ = sched_train('fused', partial(Adam, lr=1e-2, wd=0.01), hook=hook)
    assert n[0] == 2 and [len(v) for v in fused._traces.values()] == [1]
    assert_models_equal(mf, uncached(monkeypatch, partial(Adam, lr=1e-2, wd=0.01), hook=hook)[0])
    me,_ = sched_train('eager', partial(Adam, lr=1e-2, wd=0.01), hook=hook)
    assert_models_close(me, mf)

# --- two-pass chains as one C++ function (native_step) ---
from fastopt.fused import NativeStep, native_step
from fastopt.zoo import LambPaper, LambTimm

TWO_PASS = {'lamb': lambda ps: Lamb(ps, 1e-2, wd=0.1), 'lamb_nowd': lambda ps: Lamb(ps, 1e-2),
            'lamb_paper': lambda ps: LambPaper(ps, 1e-2, wd=0.1), 'lamb_timm': lambda ps: LambTimm(ps, 1e-2, wd=0.1)}
NATIVE_SHAPES = [(3,), (700,), (64, 3, 3, 3), (1030,), (5,), (2048, 3), (512,)]

def run_native(name, native=True, group_elems=None, threads=1, steps=4, nan_at=None, engine='fused'):
    torch.manual_seed(1)
    ps = [nn.Parameter(torch.randn(s)) for s in NATIVE_SHAPES]
    opt = TWO_PASS[name](ps); opt.engine = engine
    if engine == 'fused':
        opt.engine.native = native
        if group_elems: opt.engine.group_elems = group_elems
    old = torch.get_num_threads(); torch.set_num_threads(threads)
    try:
        for s in range(steps):
            for i,p in enumerate(ps):
                p.grad = torch.randn_like(p)
                if nan_at == (s, i): p.grad[0] = float('nan')
            opt.step()
    finally: torch.set_num_threads(old)
    return ps, opt

def native_fns(opt):
    return [f for f in opt.engine.compiled.values() if isinstance(f, NativeStep)]

@pytest.mark.parametrize('name', list(TWO_PASS))
def test_native_step_matches_eager_and_compiled(name):
    ps_n, opt_n = run_native(name)
    assert native_fns(opt_n), "the two-pass chain should run as a native step on the CPU in fp32"
    ps_c, _ = run_native(name, native=False)
    ps_e, opt_e = run_native(name, engine='eager')
    for a,b,c in zip(ps_n, ps_c, ps_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    for p,q in zip(ps_n, ps_e):
        for k in ('grad_avg', 'sqr_avg'):
            torch.testing.assert_close(opt_n.state[p][k], opt_e.state[q][k], rtol=1e-5, atol=1e-7)

def test_native_step_groups_and_threads_bitwise():
    "Block sums are added per tensor in block order: neither the groups nor the thread count change a bit"
    ref,_ = run_native('lamb', group_elems=1 << 30)
    for ge,th in [(1024, 1), (4096, 2), (1 << 20, 2)]:
        ps,opt = run_native('lamb', group_elems=ge, threads=th)
        assert native_fns(opt)
        for a,b in zip(ref, ps): assert torch.equal(a, b), (ge, th)

def test_native_step_padding_stays_zero():
    ps,opt = run_native('lamb')
    b = opt.engine.data[opt].buckets[0]
    used = torch.zeros(b.P.numel(), dtype=torch.bool)
    for off,p in zip(b.offs, b.params): used[off:off+p.numel()] = True
    for buf in [b.P] + list(b.S.values()): assert (buf[~used] == 0).all()

def test_native_step_nan_grad():
    "A nan gradient spreads as in eager: through its tensor's norm into that tensor only"
    ps_n,_ = run_native('lamb', nan_at=(2, 1))
    ps_e,_ = run_native('lamb', nan_at=(2, 1), engine='eager')
    for a,b in zip(ps_n, ps_e): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert ps_n[1].isnan().all() and not ps_n[0].isnan().any()

def test_native_step_unknown_op_falls_back():
    "An op the emitter does not know gives None (the engine keeps the compiled passes)"
    p1 = [('t0', 'exp', [('n', 'n0')], {})]
    args = ([('t1', 'sum', 't0')], [], [], ['t1'], [('t2', 'mul', [('n', 'n0'), ('n', 't1')], {})], [('n0', 't2')], ['n0', 'n1'], [], None)
    assert native_step(p1, *args) is None
    assert native_step([('t0', 'mul', [('n', 'n0'), ('n', 'n1')], {})], *args) is not None

def test_native_step_user_two_pass_chain():
    "A user's chain with a per-tensor reduction of its state runs natively too, and equals eager"
    def avg(p, grad_avg=None, **kw):
        if grad_avg is None: grad_avg = torch.zeros_like(p)
        grad_avg.mul_(0.9).add_(p.grad, alpha=0.1)
        return {'grad_avg': grad_avg}
    def normed_step(p, lr, grad_avg, **kw):
        p.add_(grad_avg / (grad_avg.norm() + 1e-6), alpha=-lr)
    avg.pure = normed_step.pure = True
    out = []
    for engine in ('fused', 'eager'):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(s)) for s in NATIVE_SHAPES]
        opt = fastopt.Optimizer(ps, [avg, normed_step], lr=0.1); opt.engine = engine
        for _ in range(3):
            for p in ps: p.grad = torch.randn_like(p)
            opt.step()
        out.append((ps, opt))
    assert native_fns(out[0][1])
    for a,b in zip(out[0][0], out[1][0]): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
