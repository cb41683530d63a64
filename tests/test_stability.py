"ε options, AMSGrad, Adam-atan2 and update clipping against torch and closed forms"
import math
from functools import partial
import pytest, torch
from fastopt.optimizer import Optimizer
from fastopt.sgd import average_grad
from fastopt.adaptive import average_sqr_grad, step_stat, adam_step, debias
from fastopt.stability import adam_eps_step, amsgrad_sqr_avg, adam_atan2_step, stable_adam_step

def chain(step, ams=False):
    return [partial(average_grad, dampening=True), average_sqr_grad, step_stat] + ([amsgrad_sqr_avg] if ams else []) + [step]

@pytest.mark.parametrize('shape', [(7,), (3, 5), (2, 3, 4)])
def test_amsgrad_matches_torch(shape):
    torch.manual_seed(1)
    w = torch.randn(shape)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    ours = Optimizer([a], chain(adam_eps_step, True), lr=3e-3, mom=0.8, sqr_mom=0.95, eps=1e-8)
    ref = torch.optim.Adam([b], lr=3e-3, betas=(0.8, 0.95), eps=1e-8, amsgrad=True)
    for t in range(100):
        g = torch.randn(shape) * (3 if t % 17 == 0 else 0.9**(t % 17))
        a.grad, b.grad = g.clone(), g.clone()
        ours.step(); ref.step()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

def test_adam_eps_outside_matches_torch():
    torch.manual_seed(2)
    a = torch.randn(10, requires_grad=True); b = a.detach().clone().requires_grad_()
    ours = Optimizer([a], chain(adam_eps_step), lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-8)
    ref = torch.optim.Adam([b], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(50):
        g = torch.randn(10); a.grad, b.grad = g.clone(), g.clone(); ours.step(); ref.step()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

def test_eps_inside_closed_form():
    g = torch.tensor([0.3, -0.01, 0.])
    p = torch.zeros(3); p.grad = g.clone()
    Optimizer([p], chain(adam_eps_step), lr=0.5, eps=1e-2, eps_inside=True).step()
    torch.testing.assert_close(p, -0.5*g/(g**2 + 1e-2).sqrt())

def test_atan2_closed_form_and_bound():
    p = torch.zeros(4); opt = Optimizer([p], chain(adam_atan2_step), lr=0.1, mom=0.9, sqr_mom=0.99, atan2_a=1.5, atan2_b=2.)
    gs = [torch.tensor([1., -1e-3, 1e3, 0.]), torch.tensor([-1., 2e-3, 0., 0.])]
    for g in gs: p.grad = g.clone(); opt.step()
    m = (0.1*0.9*gs[0] + 0.1*gs[1]) / debias(0.9, 0.1, 2)
    v = (0.01*0.99*gs[0]**2 + 0.01*gs[1]**2) / debias(0.99, 0.01, 2)
    expected = -0.1*1.5*(torch.atan2(0.1*gs[0]/debias(0.9, 0.1, 1), 2*(gs[0]**2).sqrt()) + torch.atan2(m, 2*v.sqrt()))
    torch.testing.assert_close(p, expected)
    assert p.abs().max() <= 2*0.1*1.5*math.pi/2

def test_stable_clip_per_tensor_no_sync():
    torch.manual_seed(3)
    ps = [torch.zeros(5), torch.zeros(5)]
    opt = Optimizer(ps, chain(stable_adam_step), lr=0.1, eps=1e-8)
    for t in range(6):
        for i in range(2):
            g = torch.randn(5) * (100. if (t == 5 and i == 0) else 1.)  # a sudden large gradient in tensor 0 only
            ps[i].grad = g
        before = [p.clone() for p in ps]
        opt.step()
    st = opt.state[ps[0]]
    v = st['sqr_avg']/debias(0.99, 0.01, 6)
    rms = (ps[0].grad**2/v).mean().sqrt()
    assert rms > 1
    # tensor 1 was not clipped on the last step: its update equals Adam's from the same state
    st1 = opt.state[ps[1]]
    v1 = st1['sqr_avg']/debias(0.99, 0.01, 6)
    assert (ps[1].grad**2/v1).mean().sqrt() <= 1
    upd1 = before[1] - ps[1]
    torch.testing.assert_close(upd1, 0.1*(st1['grad_avg']/debias(0.9, 0.1, 6))/(v1.sqrt() + 1e-8))
    upd0 = before[0] - ps[0]
    torch.testing.assert_close(upd0, 0.1/rms*(st['grad_avg']/debias(0.9, 0.1, 6))/(v.sqrt() + 1e-8))

def test_hyper_checks():
    p = torch.zeros(2)
    with pytest.raises(TypeError, match='eps_inside'): Optimizer([p], chain(adam_eps_step), lr=0.1, eps_inside='yes')
    with pytest.raises(ValueError, match='atan2_b'): Optimizer([p], chain(adam_atan2_step), lr=0.1, atan2_b=0.)
    with pytest.raises(ValueError, match='atan2_a'): Optimizer([p], chain(adam_atan2_step), lr=0.1, atan2_a=-1.)

def test_blow_up_reproduced_and_fixed():
    "noise-free regression: plain Adam's loss grows by orders of magnitude after its minimum, eps=0.1 and AMSGrad do not"
    def run(**kw):
        ams = kw.pop('ams', False)
        g = torch.Generator().manual_seed(0)
        w_star = torch.randn(16, generator=g); w = torch.zeros(16, requires_grad=True)
        opt = Optimizer([w], chain(adam_eps_step, ams), **{'lr': 1e-2, 'mom': 0.9, 'sqr_mom': 0.99, **kw})
        L = []
        for _ in range(2000):
            x = torch.randn(32, 16, generator=g)
            loss = ((x @ (w - w_star))**2).mean(); opt.zero_grad(); loss.backward(); opt.step()
            L.append(((w.detach() - w_star)**2).sum().item())
        L = torch.tensor(L, dtype=torch.float64); i = int(L.argmin())
        return L[i:].max()/L[i]
    assert run(eps=1e-8) > 1e6
    assert run(eps=1e-1) < 10
    assert run(eps=1e-8, ams=True) < 10


# -- the guard: a floor on sqrt(v̂) relative to the tensor's peak RMS ----------------------------------------------------
from fastopt.adaptive import Adam
from fastopt.stability import guarded_adam_step, GuardedAdam, BlowupGuard

@pytest.mark.parametrize('shape', [(7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize('ams', [False, True])
def test_guard_is_adam_while_floor_inactive(shape, ams):
    "gradients of a steady scale: every sqrt(v̂) stays above 1% of the peak, so the step is adam's bit for bit"
    torch.manual_seed(4)
    a, b = torch.zeros(shape), torch.zeros(shape)
    ref_step = adam_eps_step if ams else adam_step
    oa = Optimizer([a], chain(ref_step, ams), lr=3e-2, mom=0.8, sqr_mom=0.95, eps=1e-8)
    ob = Optimizer([b], chain(guarded_adam_step, ams), lr=3e-2, mom=0.8, sqr_mom=0.95, eps=1e-8)
    for t in range(1, 41):
        g = (torch.rand(shape) + 0.5) * torch.randn(shape).sign()
        a.grad, b.grad = g.clone(), g.clone()
        oa.step(); ob.step()
        assert torch.equal(a, b), t
    st = ob.state[b]
    v = (st['max_sqr_avg'] if ams else st['sqr_avg'])/debias(0.95, 0.05, 40)
    assert v.sqrt().min() > 1e-2*st['v_scale'] and st['v_scale'].dim() == 0

@pytest.mark.parametrize('decouple_wd', [True, False])
def test_guarded_adam_without_floor_is_fastai_adam(decouple_wd):
    torch.manual_seed(5)
    w = [torch.randn(4, 3), torch.randn(3)]
    pa, pb = [x.clone().requires_grad_() for x in w], [x.clone().requires_grad_() for x in w]
    oa = Adam(pa, lr=1e-2, wd=0.1, decouple_wd=decouple_wd)
    ob = GuardedAdam(pb, lr=1e-2, wd=0.1, decouple_wd=decouple_wd, v_floor_ratio=0)
    for t in range(30):
        for x, y in zip(pa, pb): g = torch.randn_like(x) * 0.8**t; x.grad, y.grad = g.clone(), g.clone()
        oa.step(); ob.step()
    for x, y in zip(pa, pb): assert torch.equal(x, y)

def test_guard_bounds_the_step_when_v_collapses():
    "after the gradients collapse, |Δp| = η|m̂|/(ρ s) with s the peak released by β_s, where adam still moves by ~η"
    torch.manual_seed(6)
    lr, rho, beta_s = 0.1, 1e-2, 0.995
    a, b = torch.zeros(8), torch.zeros(8)
    oa = Optimizer([a], chain(adam_step), lr=lr, sqr_mom=0.9, eps=1e-8)
    ob = Optimizer([b], chain(guarded_adam_step), lr=lr, sqr_mom=0.9, eps=1e-8, v_floor_ratio=rho, v_floor_mom=beta_s)
    peak = None
    base = torch.randn(8)
    for t in range(1, 301):
        g = base * (1. if t <= 20 else 1e-5) * (1 + 0.1*torch.randn(8))
        a.grad, b.grad = g.clone(), g.clone()
        pa, pb = a.clone(), b.clone()
        oa.step(); ob.step()
        st = ob.state[b]
        v = st['sqr_avg']/debias(0.9, 0.1, t)
        rms = v.mean().sqrt()
        peak = rms if peak is None else torch.maximum(peak*beta_s, rms)
        m = st['grad_avg']/debias(0.9, 0.1, t)
        torch.testing.assert_close(st['v_scale'], peak)
        # the per-weight learning rate never exceeds the cap η/(ρ s)
        assert ((pb - b).abs() <= lr*m.abs()/(rho*peak) * (1 + 1e-5) + 1e-6).all(), t  # 1e-6: rounding of p ≈ 3.7
    torch.testing.assert_close(pb - b, lr*m/(rho*peak + 1e-8))  # floor active everywhere: SGD at lr η/(ρ s)
    assert (pb - b).abs().max() < 1e-2*lr and (pa - a).abs().min() > 0.3*lr

def test_guard_is_scale_invariant():
    "multiplying the loss (the gradients) by 1000 leaves the guarded trajectory unchanged, up to float rounding"
    def run(scale):
        torch.manual_seed(7); p = torch.zeros(6)
        opt = Optimizer([p], chain(guarded_adam_step), lr=0.05, eps=1e-30, v_floor_ratio=0.05)
        for t in range(80): p.grad = scale * torch.randn(6) * 0.93**t; opt.step()
        return p
    torch.testing.assert_close(run(1.), run(1e3), rtol=1e-4, atol=1e-6)

def test_guard_state_dict_roundtrip():
    torch.manual_seed(8)
    w = torch.randn(5)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    oa = GuardedAdam([a], lr=1e-2)
    for _ in range(5): a.grad = torch.randn(5); oa.step()
    ob = GuardedAdam([b], lr=1e-2); b.data.copy_(a.data)
    ob.load_state_dict(oa.state_dict())
    assert torch.equal(ob.state[b]['v_scale'], oa.state[a]['v_scale'])
    for _ in range(5):
        g = torch.randn(5) * 1e-4; a.grad, b.grad = g.clone(), g.clone(); oa.step(); ob.step()
    assert torch.equal(a, b)

@pytest.mark.parametrize('name,bad,err', [('v_floor_ratio', -0.1, ValueError), ('v_floor_ratio', 1.5, ValueError),
    ('v_floor_ratio', 'big', TypeError), ('v_floor_ratio', True, TypeError), ('v_floor_mom', 1.01, ValueError),
    ('v_floor_mom', float('nan'), ValueError)])
def test_guard_hyper_checks(name, bad, err):
    p = torch.zeros(2)
    with pytest.raises(err, match=f'`{name}`'): GuardedAdam([p], lr=1e-2, **{name: bad})
    opt = GuardedAdam([p], lr=1e-2)
    with pytest.raises(err, match=f'`{name}`'): opt.set_hyper(name, bad)
    assert opt.hypers[0][name] == guarded_adam_step.defaults[name]  # nothing mutated


# -- BlowupGuard on a real Learner --------------------------------------------------------------------------------------
import random, warnings
from torch import nn

def regression_learner(opt_func, cbs=(), n=2048, d=8, bs=32, seed=0):
    "Noise-free linear regression: with Adam at lr 0.1 and eps 1e-8 the smoothed loss bottoms out near step 640, then grows"
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g); y = x @ torch.randn(d, 1, generator=g)
    random.seed(seed); torch.manual_seed(seed)
    ds = torch.utils.data.TensorDataset
    dls = DataLoaders.from_dsets(ds(x, y), ds(x[:64], y[:64]), bs=bs, device='cpu', num_workers=0)
    model = nn.Linear(d, 1, bias=False); nn.init.zeros_(model.weight)
    learn = Learner(dls, model, loss_func=nn.MSELoss(), opt_func=opt_func, cbs=list(cbs))
    if hasattr(learn, 'progress'): learn.remove_cb(learn.progress)
    return learn

def fit(guard=None, epochs=12, opt_func=partial(Adam, sqr_mom=0.99, eps=1e-8, wd=0.), extra=()):
    torch.set_num_threads(1)
    learn = regression_learner(opt_func, ([guard] if guard else []) + list(extra))
    with learn.no_logging(), warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        learn.fit(epochs, 0.1)
    return learn, [str(w.message) for w in ws if 'BlowupGuard' in str(w.message)]

def test_blowup_guard_bad_args():
    for kw in [dict(mode='fix'), dict(factor=1.), dict(factor=float('nan')), dict(warmup=-1), dict(snap_every=0),
               dict(eps_mult=0.), dict(max_restores=-1), dict(beta=1.)]:
        with pytest.raises(ValueError, match=list(kw)[0]): BlowupGuard(**kw)
    for kw in [dict(factor='2'), dict(warmup=1.5), dict(snap_every=True), dict(eps_mult=None)]:
        with pytest.raises(TypeError, match=list(kw)[0]): BlowupGuard(**kw)

def test_blowup_guard_warn_once_and_go_on():
    guard = BlowupGuard('warn')
    learn, msgs = fit(guard)
    assert len(msgs) == 1 and 'step' in msgs[0] and 'minimum' in msgs[0]
    ev = guard.events
    assert len(ev) > 1 and all(e['loss'] > 4*e['best'] for e in ev)
    assert ev[0]['iter'] > guard.warmup and len(learn.recorder.losses) == 12*64  # not stopped
    L = torch.tensor([float(l) for l in learn.recorder.losses])
    assert L[ev[0]['iter']-1] > 4*L[:ev[0]['iter']-1].min()  # fastai's smoothed loss (the same average) agrees

def test_blowup_guard_raise_stops_the_fit():
    guard = BlowupGuard('raise', factor=3.)
    learn, msgs = fit(guard)
    assert len(guard.events) == 1 and len(msgs) == 1 and 'stopping' in msgs[0]
    assert len(learn.recorder.losses) == guard.events[0]['iter'] < 12*64  # stopped right at the firing

class SpyGuard(BlowupGuard):
    "Records what each restore restored"
    def _snapshot(self, loss):
        super()._snapshot(loss); self.snaps.append((self.n, loss))
    def _restore(self, msg):
        snap, eps = self.snap, self.opt.hypers[0]['eps']
        super()._restore(msg)
        assert self.model.weight is self.opt.param_groups[0]['params'][0]  # restored in place
        assert torch.equal(self.model.weight, snap['model']['weight'])
        st = self.opt.state[self.model.weight]
        assert torch.equal(st['sqr_avg'], snap['opt']['state'][0]['sqr_avg'])
        assert self.opt.hypers[0]['eps'] == pytest.approx(eps*self.eps_mult)
        self.restored.append(snap['iter'])
    def before_fit(self): super().before_fit(); self.snaps, self.restored = [], []

def test_blowup_guard_restore_and_raise_eps():
    guard = SpyGuard('restore', eps_mult=100., max_restores=5, snap_every=20)
    learn, msgs = fit(guard, epochs=20)
    assert 1 <= len(guard.restored) <= 5 and len(msgs) == len(guard.restored) and 'restored' in msgs[0]
    assert len(learn.recorder.losses) == 20*64  # never had to stop
    n = [s[0] for s in guard.snaps]
    assert all(b - a >= 20 for a, b in zip(n, n[1:]))  # at most one snapshot every `snap_every` batches
    assert len(n) < 20*64/20
    assert learn.opt.hypers[0]['eps'] == pytest.approx(1e-8 * 100**len(guard.restored))
    L = torch.tensor([float(l) for l in learn.recorder.losses])
    plain, _ = fit(epochs=20)
    P = torch.tensor([float(l) for l in plain.recorder.losses])
    assert L[-1] < 1e-3*P[-1]  # the restored run ends far below plain adam's blown-up loss

def test_blowup_guard_restore_without_eps_change_stops():
    "restoring alone brings the blow-up back (the snapshot's v̂ has collapsed already): after max_restores it stops"
    guard = SpyGuard('restore', eps_mult=1., max_restores=1)
    learn, msgs = fit(guard, epochs=20)
    assert len(guard.restored) == 1 and guard.events[-1]['action'] == 'raise' and 'stopping' in msgs[-1]
    assert len(learn.recorder.losses) == guard.events[-1]['iter'] < 20*64

def test_blowup_guard_fires_on_nan_and_needs_eps():
    from fastai.callback.core import Callback
    class Poison(Callback):
        order = 54  # before the guard
        def after_batch(self):
            if self.training and self.train_iter > 150: self.learn.loss = torch.tensor(float('nan'))
    guard = BlowupGuard('raise', warmup=10)
    learn, msgs = fit(guard, epochs=4, extra=[Poison()])
    assert guard.events[0]['iter'] == 151 and len(learn.recorder.losses) == 151
    from fastopt.sgd import SGD
    with pytest.raises(ValueError, match='eps'): fit(BlowupGuard('restore'), epochs=1, opt_func=partial(SGD, mom=0.9))
