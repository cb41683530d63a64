"Bias-correction callbacks, the ε-scaled step and centred RMSProp: exact math against direct formulas and torch"
from functools import partial
import pytest
import torch
from fastopt import Optimizer, Adam, step_stat, rms_prop_step
from fastopt.bias_correction import *


def _avgs(cb, xs, **hyper):
    p, state, out = torch.zeros(len(xs[0]), dtype=torch.float64), {}, []
    for x in xs:
        p.grad = x.clone()
        state.update(step_stat(p, **state))
        state.update(cb(p, **{**hyper, **state}))
        out.append((state.get('grad_avg') if 'grad_avg' in state else state['sqr_avg']).clone())
    return out


@pytest.mark.parametrize('beta', [0.5, 0.9, 0.99, 0.999])
@pytest.mark.parametrize('correction', ['adam', 'min_n'])
def test_debiased_average_of_constant_is_constant(beta, correction):
    c = torch.tensor([3., -2., 1e-3], dtype=torch.float64)
    for a in _avgs(partial(average_grad_debiased, correction=correction), [c] * 50, mom=beta):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=0)
    for s in _avgs(partial(average_sqr_grad_debiased, correction=correction), [c] * 50, sqr_mom=beta):
        torch.testing.assert_close(s, c**2, rtol=1e-12, atol=0)


def test_plain_ema_is_biased():
    a = _avgs(partial(average_grad_debiased, correction='none'), [torch.ones(1, dtype=torch.float64)] * 3, mom=0.9)
    torch.testing.assert_close(torch.cat(a), torch.tensor([0.1, 0.19, 0.271], dtype=torch.float64))


@pytest.mark.parametrize('n', [1, 4, 10, 100])
def test_min_n_is_exact_mean_then_ema(n):
    torch.manual_seed(n)
    xs = list(torch.randn(n + 20, 3, dtype=torch.float64))
    beta = 1 - 1 / n
    a = _avgs(average_grad_min_n, xs, mom=beta)
    s = _avgs(average_sqr_grad_min_n, xs, sqr_mom=beta)
    for t in range(1, n + 1):
        torch.testing.assert_close(a[t - 1], torch.stack(xs[:t]).mean(0), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(s[t - 1], torch.stack(xs[:t]).pow(2).mean(0), rtol=1e-12, atol=1e-14)
    ema = a[n - 1]
    for t in range(n + 1, n + 21):
        ema = beta * ema + (1 - beta) * xs[t - 1]
        torch.testing.assert_close(a[t - 1], ema, rtol=1e-12, atol=1e-14)


def test_adam_weight_equals_adam_debias():
    # the running-average form of Adam's correction equals m_t / (1 - β^t) on random inputs
    torch.manual_seed(0)
    xs = list(torch.randn(30, 4, dtype=torch.float64))
    beta, m = 0.9, torch.zeros(4, dtype=torch.float64)
    for t, (x, a) in enumerate(zip(xs, _avgs(average_grad_adam, xs, mom=beta)), 1):
        m = beta * m + (1 - beta) * x
        torch.testing.assert_close(a, m / (1 - beta**t), rtol=1e-12, atol=1e-14)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


def _run(model, opt, steps=100, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(200, 6, generator=g, dtype=torch.float64), torch.randn(200, 3, generator=g, dtype=torch.float64)
    for i in range(steps):
        idx = slice(i % 10 * 20, i % 10 * 20 + 20)
        torch.nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step(); opt.zero_grad()


@pytest.mark.parametrize('decouple_wd', [True, False])
def test_debiased_adam_equals_adam_and_torch(decouple_wd):
    ms = [_model() for _ in range(3)]
    opts = [DebiasedAdam(ms[0].parameters(), lr=1e-2, wd=1e-2, decouple_wd=decouple_wd),
            Adam(ms[1].parameters(), lr=1e-2, wd=1e-2, decouple_wd=decouple_wd),
            (torch.optim.AdamW if decouple_wd else torch.optim.Adam)(ms[2].parameters(), lr=1e-2, betas=(0.9, 0.99),
                                                                     eps=1e-5, weight_decay=1e-2)]
    for m, o in zip(ms, opts): _run(m, o)
    for other in ms[1:]:
        for a, b in zip(ms[0].parameters(), other.parameters()): torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_min_n_adam_differs_from_adam_but_trains():
    m1, m2 = _model(), _model()
    o1, o2 = DebiasedAdam(m1.parameters(), lr=1e-2, correction='min_n'), DebiasedAdam(m2.parameters(), lr=1e-2)
    _run(m1, o1, 5); _run(m2, o2, 5)
    # step 1 is identical (both averages are g), later steps differ (1/t vs (1-β)/(1-β^t))
    assert not torch.allclose(m1[0].weight, m2[0].weight)
    assert o1.state[m1[0].weight]['step'] == 5


def test_bad_correction():
    with pytest.raises(ValueError, match="'adamw'"): DebiasedAdam(_model().parameters(), lr=1e-2, correction='adamw')
    p = torch.zeros(2); p.grad = torch.ones(2)
    with pytest.raises(TypeError, match='step_stat'): average_sqr_grad_min_n(p, sqr_mom=0.9)
    with pytest.raises(ValueError, match='`eps`'): eps_scaled_lr(1e-3, 0.)


def test_eps_lr_step_is_rms_prop_with_eta_eps():
    torch.manual_seed(0)
    for eps in (1e-8, 1e-3, 1.):
        p1 = torch.randn(10, dtype=torch.float64); p2 = p1.clone()
        g, s, m = torch.randn(10, dtype=torch.float64), torch.rand(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
        p1.grad = g; p2.grad = g
        rms_prop_step(p1, lr=0.3 * eps, sqr_avg=s, eps=eps, grad_avg=m)
        eps_lr_step(p2, lr=0.3, sqr_avg=s, eps=eps, grad_avg=m)
        torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-14)
    assert eps_scaled_lr(eps_scaled_lr(1e-3, 1e-4), 1e-4, to_eta0=False) == pytest.approx(1e-3)


def test_eps_lr_chain_in_sgd_regime():
    # where sqrt(s) << eps the step is SGD with lr eta0, whatever eps
    for eps in (1e-1, 1.):
        p = torch.ones(3, dtype=torch.float64); p.grad = torch.full((3,), 1e-6, dtype=torch.float64)
        opt = Optimizer([p], [step_stat, average_grad_adam, average_sqr_grad_adam, eps_lr_step], lr=0.5, eps=eps)
        opt.step()
        torch.testing.assert_close(p, torch.full((3,), 1 - 0.5e-6, dtype=torch.float64), rtol=1e-4, atol=0)


@pytest.mark.parametrize('wd', [0., 1e-2])
@pytest.mark.parametrize('alpha,eps', [(0.99, 1e-8), (0.9, 1e-6)])
def test_centred_rmsprop_matches_torch(wd, alpha, eps):
    m1, m2 = _model(), _model()
    o1 = CentredRMSProp(m1.parameters(), lr=1e-3, sqr_mom=alpha, eps=eps, wd=wd, decouple_wd=False)
    o2 = torch.optim.RMSprop(m2.parameters(), lr=1e-3, alpha=alpha, eps=eps, weight_decay=wd, centered=True)
    _run(m1, o1); _run(m2, o2)
    for a, b in zip(m1.parameters(), m2.parameters()): torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_centred_uses_variance():
    # a constant gradient has zero variance: the centred denominator is eps, the plain one |g|
    p = torch.zeros(1, dtype=torch.float64)
    opt = CentredRMSProp([p], lr=1e-3, sqr_mom=0.5, eps=1e-3)
    for _ in range(3):
        p.grad = torch.full((1,), 2., dtype=torch.float64); opt.step()
    st = opt.state[p]
    torch.testing.assert_close(st['sqr_avg'] - st['grad_mean']**2, (1 - 0.5**3) * 4 - ((1 - 0.5**3) * 2)**2 + 0 * p)
