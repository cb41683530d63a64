"""Optimizer statistics: what `StatsChain` records equals what the step did; the fused engine records the same without
an extra pass over memory; `OptimStats` records any loop's steps"""
import pytest, torch
from torch import nn
from functools import partial
from fastopt import Adam, SGD, Lamb, Larc, RMSProp
from fastopt.optim_stats import StatsChain, with_stats, without_stats, OptimStats
from fastopt.fused.trace import trace_chain
from fastopt.fused.lower import lower
from fastopt.fused.passes import plan

def run(opt_func, engine, steps=3, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    ps = [nn.Parameter(torch.randn(40, 30).to(dtype)), nn.Parameter(torch.randn(30).to(dtype))]
    opt = with_stats(opt_func(ps)); opt.engine = engine
    before = None
    for _ in range(steps):
        for p in ps: p.grad = torch.randn_like(p)
        before, grads = [p.detach().clone() for p in ps], [p.grad.clone() for p in ps]
        opt.step()
    return ps, opt, before, grads

OPTS = {'sgd': partial(SGD, lr=0.1), 'sgd_mom_l2': partial(SGD, lr=0.1, mom=0.9, wd=0.1, decouple_wd=False),
        'adam': partial(Adam, lr=1e-2), 'lamb': partial(Lamb, lr=1e-2, wd=0.01), 'larc': partial(Larc, lr=1e-2, mom=0.9),
        'rmsprop': partial(RMSProp, lr=1e-2)}

@pytest.mark.parametrize('name', list(OPTS))
def test_stats_are_the_step(name):
    "The recorded norms are those of the weight before the step, the raw gradient (before L2 decay) and the update"
    ps, opt, before, grads = run(OPTS[name], 'eager')
    for p,w0,g in zip(ps, before, grads):
        st = opt.state[p]
        torch.testing.assert_close(st['stat_w'], w0.norm()); torch.testing.assert_close(st['stat_g'], g.norm())
        torch.testing.assert_close(st['stat_dw'], (p.detach() - w0).norm())
        torch.testing.assert_close(st['stat_dw_g'], st['stat_dw'] / st['stat_g'])
        assert ('stat_trust' in st) == (name in ('lamb', 'larc'))
        assert ('stat_lr_mean' in st) == (name in ('adam', 'lamb', 'rmsprop'))
    if name == 'sgd':   # plain SGD moves by exactly lr times the gradient
        for p in ps: torch.testing.assert_close(opt.state[p]['stat_dw_g'], torch.tensor(0.1))

def test_adam_effective_lr():
    "Adam's effective learning rate lr/(√v̂+ε), v̂ debiased, its mean and max over the tensor"
    ps, opt, _, _ = run(OPTS['adam'], 'eager')
    for p in ps:
        st = opt.state[p]
        v = st['sqr_avg'] / (1 - 0.99**st['step'])
        elr = 1e-2 / (v.sqrt() + 1e-5)
        torch.testing.assert_close(st['stat_lr_mean'], elr.mean()); torch.testing.assert_close(st['stat_lr_max'], elr.max())

@pytest.mark.parametrize('name', list(OPTS))
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_fused_records_what_eager_records(name, dtype):
    "The fused engine's statistics (reductions in the step's last pass) equal the eager callbacks'"
    pe, oe, _, _ = run(OPTS[name], 'eager', dtype=dtype)
    pf, of, _, _ = run(OPTS[name], 'fused', dtype=dtype)
    assert of.engine.failed is None and of.engine.stepped['fused'] == 2 * 2
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    for a,b in zip(pe, pf):
        sa, sb = oe.state[a], of.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            if k.startswith('stat_'): torch.testing.assert_close(sa[k].float(), sb[k].float(), **tol)

@pytest.mark.parametrize('name,passes', [('adam', 1), ('sgd_mom_l2', 1), ('lamb', 2)])
def test_no_extra_pass(name, passes):
    "The statistics are reductions only per-tensor outputs need: accumulated in the step's last pass, not a pass of their own"
    ps, opt, _, _ = run(OPTS[name], 'eager', steps=1)
    st = dict(opt.state[ps[0]])
    t = trace_chain(opt.cbs, torch.float32, torch.float32, st, dict(opt.hypers[0]))
    pl = plan(lower(t.graph))
    assert len(pl.passes) == passes and pl.passes[-1].reduce

def test_optim_stats_records_a_loop():
    "`OptimStats` in a plain loop: every `every`-th step, named after the model, unwrapped by `remove`"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = Adam(model.parameters(), lr=1e-2); opt.engine = 'fused'
    stats = OptimStats(opt, model, every=2)
    for _ in range(6):
        model(torch.randn(5, 4)).pow(2).mean().backward(); opt.step(); opt.zero_grad()
    assert stats.steps == [2, 4, 6] and stats.names == ['0.weight', '0.bias', '2.weight', '2.bias']
    assert stats['update_ratio'].shape == (3, 4) and stats['lr_max'].shape == (3, 4)
    with pytest.raises(KeyError, match='trust'): stats['trust']
    stats.remove()
    assert not any(isinstance(cb, StatsChain) for cb in opt.cbs)
    assert not any(k.startswith('stat_') for st in opt.state.values() for k in st)
    model(torch.randn(5, 4)).pow(2).mean().backward(); opt.step()
    assert stats.steps == [2, 4, 6]

def test_wrap_once_and_bad_input():
    opt = with_stats(Adam([nn.Parameter(torch.zeros(3))], lr=1e-3))
    assert with_stats(opt).cbs == opt.cbs and len(opt.cbs) == 1
    with pytest.raises(ValueError, match='once'): StatsChain(opt.cbs)
    with pytest.raises(TypeError, match='fastopt'): with_stats(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    with pytest.raises(ValueError, match='every'): OptimStats(opt, every=0)
    without_stats(opt)
    assert not any(isinstance(cb, StatsChain) for cb in opt.cbs)
