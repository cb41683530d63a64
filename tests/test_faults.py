"Faults: the non-finite-gradient guard, sparse gradients, complex parameters, mixed dtypes/devices in one group"
import pytest, torch
from torch import nn
from fastopt import Optimizer, sgd_step, engines, all_finite
from torchtools_cases import OPTS, make, train, snapshot, assert_same

torch.set_num_threads(1)
ENGINES = list(engines)

def test_default_keeps_fastai_behaviour():
    "nonfinite=None (the default) steps anyway, as fastai does: the nan reaches the weights"
    model, opt, _ = make('sgd')
    assert opt.nonfinite is None
    train(model, opt, None, 0, 4, bad_every=4)
    assert model[0].weight.isnan().any() and opt.skipped_steps == 0

@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('name', OPTS)
@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_skip(name, engine, bad):
    "A bad gradient skips the step (params, state and Lookahead's count untouched), counts it, and training goes on as if it never came"
    model, opt, _ = make(name, engine=engine)
    opt.nonfinite = 'skip'  # the optimizer functions (Adam, ranger...) take fastai's arguments: the guard is set on the result
    ref_model, ref_opt, _ = make(name, engine=engine)
    train(model, opt, None, 0, 3); train(ref_model, ref_opt, None, 0, 3)
    before = snapshot(model, opt)
    opt.zero_grad(); nn.functional.mse_loss(model(torch.ones(2, 6)), torch.zeros(2, 3)).backward()
    model[2].bias.grad[1] = bad
    opt.step()
    assert opt.skipped_steps == 1
    before['extra']['skipped'] = 1
    assert_same(snapshot(model, opt), before)
    train(model, opt, None, 3, 3); train(ref_model, ref_opt, None, 3, 3)
    got, ref = snapshot(model, opt), snapshot(ref_model, ref_opt)
    ref['extra']['skipped'] = 1
    assert_same(got, ref)

@pytest.mark.parametrize('name', OPTS)
def test_raise(name):
    model, opt, _ = make(name)
    opt.nonfinite = 'raise'
    train(model, opt, None, 0, 2)
    before = snapshot(model, opt)
    opt.zero_grad(); nn.functional.mse_loss(model(torch.ones(2, 6)), torch.zeros(2, 3)).backward()
    model[2].weight.grad[0, 1] = float('nan')
    with pytest.raises(FloatingPointError, match=r'parameter 0 of group 1 \(shape \(3, 5\)'): opt.step()
    assert_same(snapshot(model, opt), before)

def test_nonfinite_setting():
    model, opt, _ = make('ranger')
    with pytest.raises(ValueError, match="`nonfinite` must be None, 'skip' or 'raise', got 'warn'"): opt.nonfinite = 'warn'
    with pytest.raises(ValueError, match='`nonfinite`'): Optimizer(list(model.parameters()), sgd_step, lr=0.1, nonfinite=True)
    opt.nonfinite = 'skip'
    assert opt.opt.nonfinite == 'skip'  # Lookahead's setting is its inner optimizer's

class _SyncCounter:
    "Count the python-level host synchronisations: tensor -> python conversions"
    names = ['__bool__', 'item', '__float__', '__int__', '__index__', 'tolist']
    def __init__(self, mp):
        self.n = 0
        for name in self.names:
            orig = getattr(torch.Tensor, name)
            def wrapped(t, *a, _orig=orig, **k):
                self.n += 1
                return _orig(t, *a, **k)
            mp.setattr(torch.Tensor, name, wrapped)

@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('nparams', [3, 60])
def test_one_sync_per_step(monkeypatch, engine, nparams):
    "The guard costs one host synchronisation per step, however many parameters (and dtypes) there are"
    dts = [torch.float32, torch.float64, torch.bfloat16]
    ps = [nn.Parameter(torch.randn(4, 3).to(dts[i % 3])) for i in range(nparams)]
    for p in ps: p.grad = torch.randn_like(p)
    counts = {}
    for mode in (None, 'skip', 'raise'):
        opt = Optimizer([ps[:nparams//2], ps[nparams//2:]], sgd_step, lr=0.1, nonfinite=mode, engine=engine)
        opt.step()  # warm-up (an engine may compile on its first step)
        c = _SyncCounter(monkeypatch)
        opt.step()
        counts[mode] = c.n
        monkeypatch.undo()
    assert counts['skip'] == counts['raise'] == counts[None] + 1, counts

def test_all_finite():
    assert all_finite([]) and all_finite([torch.ones(3), torch.zeros(2, dtype=torch.float64)])
    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for bad in (float('nan'), float('inf'), -float('inf')):
            t = torch.ones(5, dtype=dt); t[3] = bad
            assert not all_finite([torch.ones(2), t])
    assert all_finite([torch.full((3,), 6e4, dtype=torch.float16)]*50)  # fp16's 2-norm is summed in fp32: no overflow at 65504
    assert all_finite([torch.full((3,), 1e30, dtype=torch.float64)])     # fp64 in fp64
    assert not all_finite([torch.full((4,), 1e20)])  # documented: an fp32 gradient whose 2-norm overflows counts as non-finite

@pytest.mark.parametrize('name', OPTS)
def test_sparse_gradient(name):
    emb = nn.Embedding(10, 3, sparse=True)
    lin = nn.Linear(3, 2)
    opt = OPTS[name]([list(lin.parameters()), list(emb.parameters())])
    lin(emb(torch.tensor([1, 4]))).sum().backward()
    w = lin.weight.detach().clone()
    with pytest.raises(TypeError, match=r'parameter 0 of group 1 \(shape \(10, 3\).*sparse gradient'): opt.step()
    assert torch.equal(w, lin.weight)  # nothing stepped

@pytest.mark.parametrize('name', OPTS)
def test_complex_parameter(name):
    c = nn.Parameter(torch.zeros(2, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r'group 1 holds a complex parameter of shape \(2, 3\).*view_as_complex'):
        OPTS[name]([[nn.Parameter(torch.ones(2))], [c]])
    opt = OPTS[name]([nn.Parameter(torch.ones(2))])
    with pytest.raises(TypeError, match='complex'): opt.add_param_group({'params': [c]})
    assert len(opt.param_groups) == 1

def _grads(ps, step):
    g = torch.Generator().manual_seed(step)
    for p in ps: p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)

@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('name', OPTS)
def test_mixed_dtypes_in_one_group(name, engine):
    "fp32, fp64 and bf16 parameters in one group step exactly as each would alone, and keep their dtypes"
    def params(): return [nn.Parameter(torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3).to(dt)) for dt in (torch.float32, torch.float64, torch.bfloat16)]
    mixed = params()
    opt = OPTS[name](mixed); opt.engine = engine
    alone = params()
    opts = [OPTS[name]([p]) for p in alone]
    for o in opts: o.engine = engine
    for step in range(4):
        _grads(mixed, step); opt.step()
        _grads(alone, step)
        for o in opts: o.step()
    for p,q,o in zip(mixed, alone, opts):
        assert p.dtype == q.dtype and torch.equal(p, q), (p, q)
        assert_same(opt.state[p], o.state[q], name)
    assert not torch.equal(mixed[2], params()[2])  # bf16 moved
    opt.nonfinite = 'skip'
    _grads(mixed, 9); mixed[2].grad[0, 0] = float('nan')
    opt.step()
    assert opt.skipped_steps == 1

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU for a second device')
@pytest.mark.parametrize('name', OPTS)
def test_mixed_devices_in_one_group(name):
    "A CPU and a CUDA parameter in one group step as each would alone; the guard still makes one host sync"
    def params(): return [nn.Parameter(torch.linspace(-1, 1, 6).reshape(2, 3).to(d)) for d in ('cpu', 'cuda')]
    mixed, alone = params(), params()
    opt = OPTS[name](mixed)
    opt.nonfinite = 'skip'
    opts = [OPTS[name]([p]) for p in alone]
    for step in range(3):
        _grads(mixed, step); opt.step()
        _grads(alone, step)
        for o in opts: o.step()
    for p,q in zip(mixed, alone): torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert mixed[1].device.type == 'cuda' and all(v.device == mixed[1].device for v in opt.state[mixed[1]].values() if isinstance(v, torch.Tensor) and v.dim())
    _grads(mixed, 5); mixed[1].grad[0, 0] = float('inf')
    opt.step()
    assert opt.skipped_steps == 1
