"The smoothed loss utilities against fastai's own implementation, and the lag-corrected lr_find suggestion"
import math, random
from functools import partial
from types import SimpleNamespace
import numpy as np, pytest, torch
from fastai.learner import AvgSmoothLoss
from fastopt.smooth import SmoothLoss, ema, warm_ema, debiased_ema, ema_lag, unsmooth, centred_smooth, lag_corrected

@pytest.mark.parametrize('beta', [0., 0.5, 0.9, 0.98, 0.999])
def test_matches_fastai_exactly(beta):
    losses = torch.rand(300)*10
    ours, theirs = SmoothLoss(beta), AvgSmoothLoss(beta)
    for l in losses:
        v = ours.update(l)
        theirs.accumulate(SimpleNamespace(loss=l))
        assert torch.equal(v, theirs.value) and ours.count == theirs.count
    ours.reset(); theirs.reset()
    ours.update(torch.tensor([1., 3.])); theirs.accumulate(SimpleNamespace(loss=torch.tensor([1., 3.])))
    assert torch.equal(ours.value, theirs.value)

def test_seed_example():
    sl = SmoothLoss(0.98)
    for t, raw in enumerate([2.00, 3.96, 5.88, 7.76, 9.61], 1):
        assert math.isclose(sl.update(100.).item(), 100., rel_tol=1e-5)
        assert round(sl.raw.item(), 2) == raw
    np.testing.assert_allclose(ema([100.]*5), [2., 3.96, 5.8808, 7.763184, 9.60792032])

def test_recorder_curve_is_debiased_ema():
    x = np.random.default_rng(1).uniform(0, 5, 200)
    asl = AvgSmoothLoss(0.98); rec = []
    for l in x: asl.accumulate(SimpleNamespace(loss=torch.tensor(l, dtype=torch.float32))); rec.append(asl.value.item())
    np.testing.assert_allclose(debiased_ema(x), rec, rtol=1e-5)
    np.testing.assert_allclose(unsmooth(np.array(rec)[20:], 0.98, start=21), x[21:], rtol=1e-3, atol=1e-3)

def test_lag():
    assert ema_lag(0.9) == pytest.approx(9.)
    for b in (0.5, 0.9, 0.98):  # the mean lag of the debiased EMA of a ramp is ramp - debiased ema
        t = 30; ramp = np.arange(t, dtype=float)
        assert ramp[-1] - debiased_ema(ramp, b)[-1] == pytest.approx(ema_lag(b, t))
        assert ramp[-1] - warm_ema(ramp, b)[-1] < ema_lag(b) + 1e-9

def test_centred_smooth_no_lag():
    x = 3 - 0.1*np.arange(60) + 0.02*(np.arange(60) - 20.)**2
    np.testing.assert_allclose(centred_smooth(x, 0.9), x, atol=1e-9)
    noisy = x + np.random.default_rng(0).normal(0, 0.5, 60)
    assert np.abs(centred_smooth(noisy, 0.8) - x).mean() < np.abs(noisy - x).mean()

def _synthetic(x_star, seed, num_it=100, beta=0.98):
    lrs = 1e-7 * (1e8)**(np.arange(num_it)/num_it)
    x = np.log10(lrs) - x_star
    raw = 1 + x**2*(1 + 0.5*np.tanh(x)) + 0.05*np.random.default_rng(seed).standard_normal(num_it)
    sm = torch.tensor(debiased_ema(raw, beta), dtype=torch.float32)
    return torch.tensor(lrs[num_it//10:-5]), sm[num_it//10:-5]

@pytest.mark.parametrize('x_star', [-4., -2.5, -1.])
def test_lag_corrected_finds_known_minimum(x_star):
    from fastai.callback.schedule import minimum
    for seed in range(3):
        lrs, losses = _synthetic(x_star, seed)
        sugg, (lr_min, loss) = lag_corrected(lrs, losses, 100)
        assert sugg == pytest.approx(lr_min/10)
        assert 10**x_star/1.5 < lr_min < 10**x_star*1.5
        assert minimum(lrs, losses, 100)[1][0] > 10**x_star*3  # the EMA's minimum is far off

def test_bad_input():
    with pytest.raises(ValueError, match='beta'): SmoothLoss(1.)
    with pytest.raises(ValueError, match='beta'): ema([1.], -0.1)
    with pytest.raises(ValueError, match='start'): unsmooth([1., 2.], 0.9, start=0)
    with pytest.raises(ValueError, match='lrs'): lag_corrected([1., 2.], [1.], 100)

def test_in_lr_find(tmp_path):
    "fastai's lr_find calls it with its contract and names the suggestion after it"
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastopt import Adam
    torch.manual_seed(0); random.seed(0)
    x = torch.randn(256, 8); y = (x @ torch.randn(8, 1)).squeeze(1)
    ds = list(zip(x, y))
    learn = Learner(DataLoaders(DataLoader(ds, bs=16, shuffle=True), DataLoader(ds[:16], bs=16)),
                    torch.nn.Linear(8, 1), loss_func=lambda o, t: ((o.squeeze(1) - t)**2).mean(),
                    opt_func=partial(Adam, wd=0.), path=tmp_path)
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == 'ProgressCallback'])
    def at_minimum(lrs, losses, num_it): return lag_corrected(lrs, losses, num_it, div=1)
    with learn.no_logging(): res = learn.lr_find(num_it=60, show_plot=False, suggest_funcs=(lag_corrected, at_minimum))
    assert res._fields == ('lag_corrected', 'at_minimum')
    assert res[1] == pytest.approx(res[0]*10)
    lrs = np.array(learn.recorder.lrs)
    assert lrs[0] <= res[1] <= lrs[-1]
