"""What torch promises of any `torch.optim.Optimizer`, checked for every ready-made fastopt optimizer on both engines.

For each optimizer factory exported by `fastopt` (SGD with and without momentum, RMSProp, Adam and its L2 variant, RAdam,
QHAdam, Larc, Lamb, ranger, the zoo and the other ready-made ones) and for the 'eager' and 'fused' engines:

1. state dicts are deterministic, and `state_dict` → `load_state_dict` → N more steps equals the uninterrupted run
   (bit for bit on the eager engine, within 1e-6 on the fused one);
2. optimizers built on `named_parameters()` and on `parameters()` load each other's state dicts (torch >= 2.6: saved
   `param_names` replace the optimizer's, a state dict without names keeps them) and continue identically;
3. a state dict survives `torch.save` / `torch.load(weights_only=True)` and loads;
4. torch's hooks: step pre/post (per optimizer and global), state_dict pre/post, load_state_dict pre/post, and their
   handles' `remove()`;
5. a parameter whose `.grad` is None keeps its values bit for bit and gets no state;
6. zero gradients with no weight decay leave the parameters unchanged;
7. `step` never writes the gradients: same tensor object, same values, same `_version`;
8. tensor learning rates (0-d and one-element) step like the float, and an LR scheduler writing them in place moves the steps;
9. LR schedulers over groups with different learning rates give each group the lr (and momentum) torch's own optimizer gets
   under the same scheduler, and their state dicts round-trip;
10. `zero_grad` (both `set_to_none` values) and `model.zero_grad()` before a step.

Where fastopt breaks torch's contract the test is kept and marked `xfail(strict=True)` with the reason.
"""
import inspect
import io
import math
from copy import deepcopy
from functools import partial

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import fastopt

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings('ignore:fastopt fused engine')

# ---- deliberate differences from torch.optim (checked below in `test_deliberate_differences`)
DELIBERATE_DIFFERENCES = {
    'zero_grad default': "`Optimizer.zero_grad(set_to_none=False)`: fastai zeroes the gradients in place; torch's default "
                         "is `set_to_none=True`. `model.zero_grad()` (torch's default, None) works as well.",
    'hyper-parameter names': "groups store fastai's `mom`, `sqr_mom`, `wd`; torch's `momentum`, `betas` (a (mom, sqr_mom) "
                             "pair) and `weight_decay` are read/write aliases on `param_groups`/`defaults`, not stored keys.",
    'Adam defaults': "fastai's `Adam`: `wd=0.01` decoupled (AdamW), `eps=1e-5`, `sqr_mom=0.99`; torch's `Adam`: "
                     "`weight_decay=0` (L2), `eps=1e-8`, `betas=(0.9, 0.999)`.",
    'weight decay kind': "fastai's own optimizers (SGD, RMSProp, Adam, RAdam, QHAdam, Larc, Lamb) decay the weights "
                         "(`decouple_wd=True`) by default; torch's `weight_decay` of SGD/Adam/RMSprop is L2 (fastopt: "
                         "`decouple_wd=False`, the default of the zoo's NAdam, AMSGrad and Adamax, as in torch).",
    'bare tensor params': "a single tensor is accepted as `params`; torch raises TypeError.",
    'state dict extra key': "`state_dict()` has a top-level `fastopt` entry (optimizer type, callback names, skipped "
                            "steps); `load_state_dict` refuses a state dict saved with another type or callback chain.",
    'state dtype on load': "`load_state_dict` keeps the saved state tensors' dtype (moving them to the parameter's "
                           "device); torch casts floating-point state to the parameter's dtype. fastopt's `fp32_math` keeps "
                           "fp32 state for bf16/fp16 weights on purpose, which a cast would undo.",
    'lr required': "fastai's core optimizers (SGD, RMSProp, Adam, RAdam, QHAdam, Larc, Lamb, ...) have no default `lr`; "
                   "torch's SGD and Adam default to `lr=1e-3`.",
}

LR = 1e-2
ENGINES = ['eager', 'fused']

# every ready-made optimizer: id -> (factory, extra kwargs); `lr` is given by the tests
CASES = {
    'SGD':               (fastopt.SGD, {}),
    'SGD-mom':           (fastopt.SGD, dict(mom=0.9)),
    'SGD-mom-l2':        (fastopt.SGD, dict(mom=0.9, wd=1e-2, decouple_wd=False)),
    'RMSProp':           (fastopt.RMSProp, {}),
    'Adam':              (fastopt.Adam, {}),
    'Adam-l2':           (fastopt.Adam, dict(decouple_wd=False)),
    'RAdam':             (fastopt.RAdam, {}),
    'QHAdam':            (fastopt.QHAdam, {}),
    'Larc':              (fastopt.Larc, {}),
    'Lamb':              (fastopt.Lamb, {}),
    'ranger':            (fastopt.ranger, dict(k=2)),   # k=2: the lookahead pull happens within the tests' few steps
    'Lion':              (fastopt.zoo.Lion, {}),
    'Adan':              (fastopt.zoo.Adan, {}),
    'NAdam':             (fastopt.zoo.NAdam, {}),
    'Adamax':            (fastopt.zoo.Adamax, {}),
    'AMSGrad':           (fastopt.zoo.AMSGrad, {}),
    'StableAdamW':       (fastopt.zoo.StableAdamW, {}),
    'ScheduleFreeAdamW': (fastopt.zoo.ScheduleFreeAdamW, {}),
    'KahanAdamW':        (fastopt.zoo.KahanAdamW, {}),
    'LambPaper':         (fastopt.zoo.LambPaper, {}),
    'LambTimm':          (fastopt.zoo.LambTimm, {}),
    'GuardedAdam':       (fastopt.GuardedAdam, {}),
    'Muon':              (fastopt.zoo.Muon, {}),   # Muon for the 2-D weights, AdamW for the biases: the model has both
    'Adam-fp32-kahan':   (lambda params, **kw: fastopt.fp32_math(fastopt.Adam(params, **kw), 'kahan'), {}),
    'DebiasedAdam':      (fastopt.DebiasedAdam, {}),
    'CentredRMSProp':    (fastopt.CentredRMSProp, {}),
    'PerExampleAdam':    (fastopt.PerExampleAdam, {}),     # without `PerExampleSqrGrads` hooks: squared batch gradients
    'PerExampleRMSProp': (fastopt.PerExampleRMSProp, {}),
    'AdamW8bit':         (fastopt.AdamW8bit, dict(min_size=0)),   # min_size=0: the tiny model's moments are quantized too
    'AdamW4bit':         (fastopt.AdamW4bit, dict(min_size=0)),
}

# kwargs that switch every kind of weight decay off
NO_WD = {k: dict(wd=0.) for k in CASES}
NO_WD['Muon'] = dict(wd=0., adam_wd=0.)
# kwargs that switch weight decay on (L2 for the optimizers whose default is `decouple_wd=False`)
WITH_WD = {k: dict(wd=1e-2) for k in CASES}
WITH_WD['Muon'] = dict(wd=1e-2, adam_wd=1e-2)

# torch's `_patch_step_function` wraps `Optimizer.step` at the first plain `Optimizer` built: do it now, so that the
# tests below do not depend on which optimizer a worker happens to build first
fastopt.SGD([torch.zeros(1, requires_grad=True)], lr=LR)



def cases(xfail=None):
    "The case ids as pytest params, with the `xfail` ones (id -> reason) marked strict"
    xfail = xfail or {}
    return [pytest.param(c, id=c, marks=[pytest.mark.xfail(strict=True, reason=xfail[c])] if c in xfail else [])
            for c in CASES]


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def build(case, params, engine, **kw):
    f, kw0 = CASES[case]
    opt = f(params, **{'lr': LR, **kw0, **kw})
    opt.engine = engine
    return opt


def backward(model, gen):
    model(torch.randn(16, 6, generator=gen)).pow(2).mean().backward()


def train(model, opt, steps=3, seed=1, zero=None, after_backward=None, sched=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        backward(model, g)
        if after_backward is not None: after_backward()
        opt.step()
        if sched is not None: sched.step()
        (zero or opt.zero_grad)()


def same(a, b):
    "Equal bit for bit, tensors by dtype/shape/value, dicts with the same keys in the same order"
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict): return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a): return math.isnan(b)
    return type(a) is type(b) and a == b


def assert_close(a, b, engine, path='x'):
    "Bit for bit on the eager engine; on the fused one, tensors and floats within 1e-6"
    if engine == 'eager':
        assert same(a, b), path
        return
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=path)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a: assert_close(a[k], b[k], engine, f'{path}[{k!r}]')
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)): assert_close(x, y, engine, f'{path}[{i}]')
    elif isinstance(a, float):
        assert isinstance(b, float) and abs(a - b) <= 1e-6, path
    else: assert type(a) is type(b) and a == b, path


def params_of(model): return [p.detach().clone() for p in model.parameters()]


def assert_fused(opt, case):
    "On the fused engine, the kernels took steps (Muon's chain is not fusable: its engine steps it eagerly, saying why)"
    if opt.engine.name != 'fused': return
    if case == 'Muon': assert opt.engine.failed
    else: assert opt.engine.stepped['fused'] > 0 and opt.engine.failed is None


# ---- the list of cases is the list of ready-made optimizers

def test_every_ready_made_optimizer_is_covered():
    "Every function in `fastopt` that takes `params` first and returns an optimizer is one of the cases"
    found = set()
    for n, o in vars(fastopt).items():   # not `dir`: fastai's lazily built callbacks would import fastai
        if not callable(o) or isinstance(o, type): continue
        try: sig = inspect.signature(o)
        except (TypeError, ValueError): continue
        ps = list(sig.parameters)
        if ps[:2] == ['params', 'lr']: found.add(o)
    covered = {f for f, _ in CASES.values()}
    assert found - covered == set(), sorted(f.__name__ for f in found - covered)
    for f in covered: assert isinstance(f(make_model().parameters(), lr=LR), torch.optim.Optimizer)


def test_deliberate_differences():
    "The differences from torch listed in `DELIBERATE_DIFFERENCES` are what fastopt does"
    assert inspect.signature(fastopt.Optimizer.zero_grad).parameters['set_to_none'].default is False
    assert inspect.signature(torch.optim.Optimizer.zero_grad).parameters['set_to_none'].default is True
    m = make_model()
    opt = fastopt.Adam(m.parameters(), lr=LR)
    g = opt.param_groups[0]
    assert (g['wd'], g['eps'], g['mom'], g['sqr_mom']) == (0.01, 1e-5, 0.9, 0.99)
    assert g['betas'] == (0.9, 0.99) and g['weight_decay'] == 0.01 and 'betas' not in dict.keys(g)
    assert opt.defaults['betas'] == (0.9, 0.99)
    assert inspect.signature(fastopt.Adam).parameters['decouple_wd'].default is True
    assert inspect.signature(fastopt.zoo.NAdam).parameters['decouple_wd'].default is False
    t = torch.zeros(3, requires_grad=True)
    assert fastopt.SGD(t, lr=LR).param_groups[0]['params'] == [t]
    with pytest.raises(TypeError): torch.optim.SGD(t, lr=LR)
    assert inspect.signature(fastopt.SGD).parameters['lr'].default is inspect.Parameter.empty
    assert inspect.signature(torch.optim.SGD).parameters['lr'].default == 1e-3
    assert 'fastopt' in opt.state_dict()
    # fp32 state loaded for fp64 parameters stays fp32 (torch: cast to fp64)
    train(m, opt, steps=1)
    m64 = make_model().double()
    opt64 = fastopt.Adam(m64.parameters(), lr=LR)
    opt64.load_state_dict(opt.state_dict())
    assert opt64.state[m64[0].weight]['grad_avg'].dtype == torch.float32


# ---- 1. state dicts: deterministic, and a resumed run equals the uninterrupted one

@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('case', cases())
def test_state_dict_deterministic(case, engine):
    sds = []
    for _ in range(2):
        m = make_model()
        o = build(case, m.parameters(), engine)
        train(m, o, steps=3)
        sds.append(o.state_dict())
        assert_fused(o, case)
    assert same(sds[0], sds[1])
    assert list(sds[0]['state']) == sorted(sds[0]['state'])   # state by parameter index, in order


@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('case', cases())
def test_resume_equals_uninterrupted(case, engine):
    m1 = make_model()
    o1 = build(case, m1.parameters(), engine)
    train(m1, o1, steps=3, seed=1)
    saved_opt, saved_model = deepcopy(o1.state_dict()), deepcopy(m1.state_dict())
    train(m1, o1, steps=3, seed=2)

    m2 = make_model(seed=7)   # other weights, replaced by the saved ones
    m2.load_state_dict(saved_model)
    o2 = build(case, m2.parameters(), engine)
    o2.load_state_dict(saved_opt)
    assert same(o2.state_dict(), saved_opt)
    train(m2, o2, steps=3, seed=2)
    assert_close(params_of(m1), params_of(m2), engine, 'params')
    assert_close(o1.state_dict(), o2.state_dict(), engine, 'state_dict')
    assert_fused(o1, case); assert_fused(o2, case)


# ---- 2. named and unnamed parameters load each other's state dicts

@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('direction', ['named-to-unnamed', 'unnamed-to-named'])
@pytest.mark.parametrize('case', cases())
def test_named_and_unnamed_load_each_other(case, direction, engine):
    src_named = direction == 'named-to-unnamed'
    m1 = make_model()
    o1 = build(case, m1.named_parameters() if src_named else m1.parameters(), engine)
    train(m1, o1, steps=3, seed=1)
    sd = deepcopy(o1.state_dict())
    assert all(('param_names' in g) == src_named for g in sd['param_groups'])

    m2 = make_model(seed=7)
    m2.load_state_dict(m1.state_dict())
    o2 = build(case, m2.parameters() if src_named else m2.named_parameters(), engine)
    names2 = [g.get('param_names') for g in o2.param_groups]
    o2.load_state_dict(sd)
    if src_named:   # the saved names replace the optimizer's (it had none)
        assert [g['param_names'] for g in o2.param_groups] == [g['param_names'] for g in sd['param_groups']]
    else:           # a state dict without names keeps the optimizer's
        assert [g.get('param_names') for g in o2.param_groups] == names2
    named = dict(m2.named_parameters())
    for g in o2.param_groups:   # one right name per parameter
        assert len(g['param_names']) == len(g['params'])
        assert all(named[n] is p for n, p in zip(g['param_names'], g['params']))

    train(m1, o1, steps=2, seed=2)
    train(m2, o2, steps=2, seed=2)
    assert_close(params_of(m1), params_of(m2), engine, 'params')
    assert_fused(o2, case)


@pytest.mark.parametrize('case', cases())
def test_named_parameters_give_one_name_per_param(case):
    m = make_model()
    o = build(case, m.named_parameters(), 'eager')
    named = dict(m.named_parameters())
    for g in o.param_groups:
        assert len(g['param_names']) == len(g['params'])
        assert all(named[n] is p for n, p in zip(g['param_names'], g['params']))
    assert sorted(n for g in o.param_groups for n in g['param_names']) == sorted(named)
    o.load_state_dict(o.state_dict())


# ---- 3. weights_only loading

@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('case', cases())
@pytest.mark.parametrize('lr', ['float-lr', 'tensor-lr'])
def test_state_dict_loads_with_weights_only(case, lr, engine):
    "Named parameters (`param_names` saved), and a tensor lr in the groups"
    lr = torch.tensor(LR) if lr == 'tensor-lr' else LR
    params = lambda m: m.named_parameters()
    m = make_model()
    o = build(case, params(m), engine, lr=lr)
    train(m, o, steps=3)
    buf = io.BytesIO()
    torch.save(o.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert same(sd, o.state_dict())
    m2 = make_model()
    m2.load_state_dict(m.state_dict())
    o2 = build(case, params(m2), engine, lr=lr)
    o2.load_state_dict(sd)
    assert same(o2.state_dict(), o.state_dict())
    train(m, o, steps=1); train(m2, o2, steps=1)
    assert_close(params_of(m), params_of(m2), engine)


# ---- 4. hooks

@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('case', cases())
def test_step_hooks(case, engine):
    m = make_model()
    o = build(case, m.parameters(), engine)
    calls = []
    hpre = o.register_step_pre_hook(lambda opt, args, kwargs: calls.append(('pre', opt, args, kwargs)))
    hpost = o.register_step_post_hook(lambda opt, args, kwargs: calls.append(('post', opt, args, kwargs)))
    train(m, o, steps=2)
    assert [c[0] for c in calls] == ['pre', 'post'] * 2
    assert all(c[1] is o for c in calls)
    assert all(c[2][0] is o and c[3] == {} for c in calls)   # `args` holds the optimizer, as torch passes them
    hpre.remove(); hpost.remove()
    calls.clear()
    train(m, o, steps=1)
    assert calls == []


@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('case', cases())
def test_step_pre_hook_replaces_args(case, engine):
    "A pre hook returning `(args, kwargs)`: the step is called with them (here: a closure the caller did not give)"
    m = make_model()
    o = build(case, m.parameters(), engine)
    g = torch.Generator().manual_seed(1)
    ran = []
    def closure():
        ran.append(1)
        o.zero_grad()
        loss = m(torch.randn(16, 6, generator=g)).pow(2).mean()
        loss.backward()
        return loss
    seen = []
    o.register_step_pre_hook(lambda opt, args, kwargs: (args, {**kwargs, 'closure': closure}))
    o.register_step_post_hook(lambda opt, args, kwargs: seen.append(kwargs.get('closure')))
    before = params_of(m)
    loss = o.step()
    assert ran == [1] and isinstance(loss, torch.Tensor) and seen == [closure]
    assert not all(map(torch.equal, before, params_of(m)))


@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('case', cases())
def test_global_step_hooks(case, engine):
    m = make_model()
    o = build(case, m.parameters(), engine)
    calls = []
    hpre = register_optimizer_step_pre_hook(lambda opt, args, kwargs: calls.append(('pre', opt)))
    hpost = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(('post', opt)))
    try:
        train(m, o, steps=2)
    finally:
        hpre.remove(); hpost.remove()
    assert calls == [('pre', o), ('post', o)] * 2
    calls.clear()
    train(m, o, steps=1)
    assert calls == []


@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('case', cases())
def test_state_dict_hooks(case, engine):
    m = make_model()
    o = build(case, m.parameters(), engine)
    train(m, o, steps=2)
    plain = o.state_dict()
    calls = []
    def post(opt, sd):
        calls.append(('post', opt))
        sd['param_groups'][0]['marker'] = 'post'   # modified in place
    hpre = o.register_state_dict_pre_hook(lambda opt: calls.append(('pre', opt)))
    hpost = o.register_state_dict_post_hook(post)
    sd = o.state_dict()
    assert calls == [('pre', o), ('post', o)]
    assert sd['param_groups'][0]['marker'] == 'post' and 'marker' not in o.param_groups[0]
    hpost.remove()
    hnew = o.register_state_dict_post_hook(lambda opt, sd: {**sd, 'state': {}})   # a new dict, returned
    assert o.state_dict()['state'] == {} and o.state
    hpre.remove(); hnew.remove()
    calls.clear()
    assert same(o.state_dict(), plain) and calls == []


@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('case', cases())
def test_load_state_dict_hooks(case, engine):
    m = make_model()
    o = build(case, m.parameters(), engine)
    train(m, o, steps=2)
    sd = deepcopy(o.state_dict())
    o2 = build(case, make_model().parameters(), engine)
    calls = []
    def pre(opt, sd):
        calls.append(('pre', opt))
        sd = deepcopy(sd)
        for g in sd['param_groups']: g['lr'] = 0.5   # a modified state dict, returned: the one loaded
        return sd
    def post(opt):
        calls.append(('post', opt, [g['lr'] for g in opt.param_groups]))
    hpre = o2.register_load_state_dict_pre_hook(pre)
    hpost = o2.register_load_state_dict_post_hook(post)
    o2.load_state_dict(sd)
    n = len(o2.param_groups)
    assert calls == [('pre', o2), ('post', o2, [0.5] * n)]
    assert [g['lr'] for g in sd['param_groups']] == [LR] * n   # the caller's dict is not changed
    assert same(o2.state_dict()['state'], o.state_dict()['state'])
    hpre.remove(); hpost.remove()
    calls.clear()
    o2.load_state_dict(sd)
    assert calls == [] and [g['lr'] for g in o2.param_groups] == [LR] * n


def test_state_dict_post_hook_has_the_last_word():
    "torch: the dict a state_dict post hook returns is the one `state_dict()` returns"
    o = fastopt.Adam(make_model().parameters(), lr=LR)
    o.register_state_dict_post_hook(lambda opt, sd: {'wrapped': sd})
    assert list(o.state_dict()) == ['wrapped']


def test_load_state_dict_pre_hook_gets_a_shallow_copy():
    m = make_model()
    o = fastopt.Adam(m.parameters(), lr=LR)
    train(m, o, steps=1)
    sd = o.state_dict()
    o.register_load_state_dict_pre_hook(lambda opt, d: d.update(extra=1))
    o.load_state_dict(sd)
    assert 'extra' not in sd


# ---- 5. parameters without gradients

def _grad_less(case, engine):
    m = make_model()
    o = build(case, m.parameters(), engine)
    frozen = m[0].bias
    before = frozen.detach().clone()
    def drop(): frozen.grad = None
    train(m, o, steps=4, after_backward=drop)
    return m, o, frozen, before


@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('case', cases())
def test_no_grad_param_untouched(case, engine):
    m, o, frozen, before = _grad_less(case, engine)
    assert same(frozen.detach(), before)
    assert not torch.equal(m[0].weight, make_model()[0].weight)   # the others did move


@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('case', cases())
def test_no_grad_param_gets_no_state(case, engine):
    m, o, frozen, before = _grad_less(case, engine)
    assert frozen not in o.state
    idx = [id(p) for g in o.param_groups for p in g['params']].index(id(frozen))   # torch's index: groups' order
    assert idx not in o.state_dict()['state']


# ---- 6. zero gradients without weight decay

@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('case', cases())
def test_zero_grads_no_wd_leave_params(case, engine):
    m = make_model()
    o = build(case, m.parameters(), engine, **NO_WD[case])
    before = params_of(m)
    def zero():
        for p in m.parameters(): p.grad.zero_()
    train(m, o, steps=4, after_backward=zero)
    assert all(map(same, before, params_of(m)))


# ---- 7. gradients are never written

@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('case', cases())
def test_step_never_writes_grads(case, engine):
    "With the default weight decay, and with `wd=1e-2` (L2 where the optimizer's default is `decouple_wd=False`)"
    for kw in ({}, WITH_WD[case]):
        _check_grads_unwritten(case, engine, kw)


def _check_grads_unwritten(case, engine, kw):
    m = make_model()
    o = build(case, m.parameters(), engine, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        backward(m, g)
        grads = [p.grad for p in m.parameters()]
        vals = [gr.clone() for gr in grads]
        versions = [gr._version for gr in grads]
        o.step()
        assert all(p.grad is gr for p, gr in zip(m.parameters(), grads))
        assert all(map(same, vals, [p.grad for p in m.parameters()]))
        assert [gr._version for gr in grads] == versions
        o.zero_grad()
    assert_fused(o, case)


# ---- 8. tensor learning rates

def _float32(x): return float(torch.tensor(x))


@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('case', cases())
def test_tensor_lr_steps_like_float(case, engine):
    "`lr=torch.tensor(1e-2)` (0-d) and `torch.tensor([1e-2])` step as `lr=1e-2` (its float32 value)"
    m1 = make_model()
    o1 = build(case, m1.parameters(), engine, lr=_float32(LR))
    train(m1, o1, steps=4)
    for lr_t in (torch.tensor(LR), torch.tensor([LR])):
        m2 = make_model()
        o2 = build(case, m2.parameters(), engine, lr=lr_t)
        train(m2, o2, steps=4)
        for a, b in zip(params_of(m1), params_of(m2)): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert all(g['lr'] is lr_t for g in o2.param_groups)


@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('sched', ['StepLR', 'LambdaLR'])
@pytest.mark.parametrize('case', cases())
def test_scheduler_writes_tensor_lr_in_place(case, sched, engine):
    make = {'StepLR': partial(lr_scheduler.StepLR, step_size=1, gamma=0.3),
            'LambdaLR': partial(lr_scheduler.LambdaLR, lr_lambda=lambda e: 1 / (1 + 2 * e))}[sched]
    m1, m2, m3 = make_model(), make_model(), make_model()
    o1 = build(case, m1.parameters(), engine, lr=_float32(LR))
    lr_t = torch.tensor(LR)
    o2 = build(case, m2.parameters(), engine, lr=lr_t)
    o3 = build(case, m3.parameters(), engine, lr=torch.tensor(LR))   # the tensor lr without a scheduler
    s1, s2 = make(o1), make(o2)
    train(m1, o1, steps=4, sched=s1); train(m2, o2, steps=4, sched=s2); train(m3, o3, steps=4)
    groups = o2.param_groups
    assert all(g['lr'] is lr_t for g in groups)   # the same tensor, filled in place
    assert all(math.isclose(float(g['lr']), float(h['lr']), rel_tol=1e-6) for g, h in zip(groups, o1.param_groups))
    assert float(lr_t) < LR / 2   # written in place
    for a, b in zip(params_of(m1), params_of(m2)): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not all(map(torch.equal, params_of(m2), params_of(m3)))


# ---- 9. LR schedulers over groups with different learning rates

SCHEDULERS = {
    'StepLR': lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    'CosineAnnealingLR': lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=5, eta_min=1e-4),
    'OneCycleLR': lambda o: lr_scheduler.OneCycleLR(o, max_lr=[g['lr'] * 10 for g in o.param_groups], total_steps=8,
                                                    cycle_momentum='betas' in o.defaults or 'momentum' in o.defaults),
}


def _two_groups(model): return [{'params': model[0].parameters(), 'lr': 1e-2}, {'params': model[2].parameters(), 'lr': 1e-3}]


def _torch_twin(opt):
    "A torch optimizer with `opt`'s groups' lrs and momentums, over dummy parameters"
    ps = [torch.zeros(1, requires_grad=True) for _ in opt.param_groups]
    if 'betas' in opt.defaults:
        return torch.optim.Adam([{'params': [p], 'lr': g['lr'], 'betas': g['betas']} for p, g in zip(ps, opt.param_groups)])
    return torch.optim.SGD([{'params': [p], 'lr': g['lr'], 'momentum': g['momentum']} for p, g in zip(ps, opt.param_groups)])


def _hypers(opt):
    "Each group's lr and momentum(s), flat"
    if 'betas' in opt.defaults: return [x for g in opt.param_groups for x in (g['lr'], *g['betas'])]
    return [x for g in opt.param_groups for x in (g['lr'], g['momentum'])]


@pytest.mark.parametrize('sched', list(SCHEDULERS))
@pytest.mark.parametrize('case', cases())
def test_schedulers_per_group(case, sched):
    "The lrs and momentums; the fused engine's steps under the same schedules are `test_schedulers_fused_steps_like_eager`'s"
    engine = 'eager'
    m = make_model()
    o = build(case, _two_groups(m), engine)
    assert len({g['lr'] for g in o.param_groups}) == 2
    ref = _torch_twin(o)
    s, sr = SCHEDULERS[sched](o), SCHEDULERS[sched](ref)
    assert _hypers(o) == pytest.approx(_hypers(ref), rel=1e-12)
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        backward(m, g)
        o.step(); o.zero_grad(); ref.step()
        s.step(); sr.step()
        assert _hypers(o) == pytest.approx(_hypers(ref), rel=1e-12), i
        assert s.get_last_lr() == pytest.approx(sr.get_last_lr(), rel=1e-12)
        if i == 2: saved = (deepcopy(s.state_dict()), deepcopy(o.state_dict()), deepcopy(m.state_dict()))
    assert all(math.isfinite(float(p.abs().sum())) for p in m.parameters())

    # the scheduler's state dict round-trips: a new optimizer and scheduler resume from step 3 on the same lrs
    m2 = make_model()
    m2.load_state_dict(saved[2])
    o2 = build(case, _two_groups(m2), engine)
    s2 = SCHEDULERS[sched](o2)
    s2.load_state_dict(saved[0])
    o2.load_state_dict(saved[1])
    assert same(s2.state_dict(), saved[0])
    for _ in range(3):   # steps 4-6 again (no gradients: the lrs and momentums are what is compared)
        o2.step(); s2.step()
    assert s2.get_last_lr() == pytest.approx(s.get_last_lr(), rel=1e-12)
    assert _hypers(o2) == pytest.approx(_hypers(o), rel=1e-12)


@pytest.mark.parametrize('sched', list(SCHEDULERS))
@pytest.mark.parametrize('case', cases())
def test_schedulers_fused_steps_like_eager(case, sched):
    "Hyper-parameters changed by a scheduler at every step reach the fused kernels as they reach the eager callbacks"
    res = []
    for engine in ENGINES:
        m = make_model()
        o = build(case, _two_groups(m), engine)
        train(m, o, steps=6, sched=SCHEDULERS[sched](o))
        res.append(params_of(m))
        assert_fused(o, case)
    assert_close(res[0], res[1], 'fused', 'params')


# ---- 10. zero_grad

@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('case', cases())
def test_zero_grad(case, engine):
    m = make_model()
    o = build(case, m.parameters(), engine)
    g = torch.Generator().manual_seed(1)
    backward(m, g)
    grads = [p.grad for p in m.parameters()]
    o.zero_grad()   # fastai's default: zeroed in place
    assert all(p.grad is gr and not gr.any() for p, gr in zip(m.parameters(), grads))
    backward(m, g)
    o.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in m.parameters())
    before = params_of(m)
    o.step()   # no gradient at all: nothing moves
    assert all(map(same, before, params_of(m)))


@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('case', cases())
def test_model_zero_grad_then_step(case, engine):
    "`model.zero_grad()` (torch's: grads set to None) in the loop steps as `opt.zero_grad()` (fastai's: zeroed)"
    res = []
    for zero in ('model', 'opt', 'opt-none'):
        m = make_model()
        o = build(case, m.parameters(), engine)
        z = {'model': m.zero_grad, 'opt': o.zero_grad, 'opt-none': partial(o.zero_grad, set_to_none=True)}[zero]
        train(m, o, steps=4, zero=z)
        res.append((params_of(m), o.state_dict()))
    assert_close(res[0], res[1], engine)
    assert_close(res[0], res[2], engine)
