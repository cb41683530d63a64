import pytest, torch
import optimi
from fastopt.zoo import NAdam, AMSGrad, Adamax, StableAdamW, KahanAdamW
from zoo_helpers import run_pair, groups, max_diff

G2 = [{'lr': 3e-3}, {'wd': 0.}]           # ours: two groups, different lr and wd
T2 = [{'lr': 3e-3}, {'weight_decay': 0.}]  # the same in torch's names

@pytest.mark.parametrize('decouple', [False, True])
def test_nadam_matches_torch(decouple):
    ours = lambda m: NAdam(groups(m, G2), lr=1e-3, wd=0.05, decouple_wd=decouple)
    ref = lambda m: torch.optim.NAdam(groups(m, T2), lr=1e-3, weight_decay=0.05, decoupled_weight_decay=decouple, foreach=False)
    m1,m2,o1,o2 = run_pair(ours, ref)
    assert max_diff(m1, m2) < 1e-5

@pytest.mark.parametrize('decouple', [False, True])
def test_amsgrad_matches_torch(decouple):
    ours = lambda m: AMSGrad(groups(m, G2), lr=1e-3, wd=0.05, decouple_wd=decouple)
    Ref = torch.optim.AdamW if decouple else torch.optim.Adam
    ref = lambda m: Ref(groups(m, T2), lr=1e-3, weight_decay=0.05, amsgrad=True, foreach=False)
    # gradients of decreasing scale, so the running max differs from the average
    scale = lambda i,m1,m2,o1,o2: [p.grad.mul_(3. if i < 10 else 0.5) for m in (m1, m2) for p in m.parameters()]
    m1,m2,o1,o2 = run_pair(ours, ref, before_step=scale)
    assert max_diff(m1, m2) < 1e-5
    p = next(m1.parameters())
    assert (o1.state[p]['max_sqr_avg'] > o1.state[p]['sqr_avg']).any()

def test_adamax_matches_torch():
    ours = lambda m: Adamax(groups(m, G2), lr=1e-3, wd=0.05)
    ref = lambda m: torch.optim.Adamax(groups(m, T2), lr=1e-3, weight_decay=0.05, foreach=False)
    m1,m2,o1,o2 = run_pair(ours, ref)
    assert max_diff(m1, m2) < 1e-5

def test_stable_adamw_matches_optimi():
    ours = lambda m: StableAdamW(groups(m, G2), lr=1e-3, wd=0.1)
    ref = lambda m: optimi.StableAdamW(groups(m, T2), lr=1e-3, weight_decay=0.1, foreach=False, triton=False)
    # occasional gradient spikes, so the update clipping is exercised
    spike = lambda i,m1,m2,o1,o2: [p.grad.mul_(20.) for m in (m1, m2) for p in m.parameters()] if i % 17 == 16 else None
    m1,m2,o1,o2 = run_pair(ours, ref, before_step=spike)
    assert max_diff(m1, m2) < 1e-5

def test_kahan_adamw_fp32_matches_optimi():
    ours = lambda m: KahanAdamW(groups(m, G2), lr=1e-3, wd=0.1)
    ref = lambda m: optimi.AdamW(groups(m, T2), lr=1e-3, weight_decay=0.1, kahan_sum=True, foreach=False, triton=False)
    m1,m2,o1,o2 = run_pair(ours, ref)
    assert max_diff(m1, m2) < 1e-5

def test_kahan_adamw_bf16_matches_optimi_and_beats_plain_bf16():
    ours = lambda m: KahanAdamW(groups(m, G2), lr=1e-3, wd=0.1)
    ref = lambda m: optimi.AdamW(groups(m, T2), lr=1e-3, weight_decay=0.1, kahan_sum=True, foreach=False, triton=False)
    m1,m2,o1,o2 = run_pair(ours, ref, dtype=torch.bfloat16)
    assert max_diff(m1, m2) < 1e-5  # the same bf16 operations in the same order
    assert all(o1.state[p]['kahan_comp'].dtype == torch.bfloat16 for p in m1.parameters())
    # and it matters: plain bf16 AdamW drifts much further from the fp32 run than the Kahan-summed one
    fp32,_,_,_ = run_pair(ours, ref)
    plain,_,_,_ = run_pair(lambda m: optimi.AdamW(groups(m, T2), lr=1e-3, weight_decay=0.1, kahan_sum=False, foreach=False, triton=False),
                           ref, dtype=torch.bfloat16)
    assert max_diff(m1, fp32) < max_diff(plain, fp32) / 2

@pytest.mark.parametrize('f,defaults', [
    (NAdam, dict(lr=2e-3, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0., mom_decay=4e-3)),
    (AMSGrad, dict(lr=1e-3, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.)),
    (Adamax, dict(lr=2e-3, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.)),
    (lambda ps: StableAdamW(ps, lr=1e-3), dict(mom=0.9, sqr_mom=0.99, eps=1e-6, wd=1e-2)),
    (lambda ps: KahanAdamW(ps, lr=1e-3), dict(mom=0.9, sqr_mom=0.99, eps=1e-6, wd=1e-2)),
])
def test_defaults(f, defaults):
    h = f([torch.zeros(2, requires_grad=True)]).hypers[0]
    assert {k: h[k] for k in defaults} == defaults

def test_hyper_checks():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match='mom_decay'): NAdam(p, mom_decay=-1.)
    with pytest.raises(ValueError, match='sqr_mom'): Adamax(p, sqr_mom=1.)
    with pytest.raises(ValueError, match='eps'): StableAdamW(p, lr=1e-3, eps=0.)
    with pytest.raises(TypeError, match='wd'): KahanAdamW(p, lr=1e-3, wd='x')
