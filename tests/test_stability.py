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
