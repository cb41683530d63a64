import pytest, torch
from lion_pytorch import Lion as RefLion
from pytorch_optimizer import Adan as RefAdan
from fastopt.zoo import Lion, Adan
from zoo_helpers import run_pair, groups, max_diff

def test_lion_matches_lion_pytorch():
    ours = lambda m: Lion(groups(m, [{'lr': 3e-3}, {'wd': 0.}]), lr=1e-3, mom=0.9, sqr_mom=0.99, wd=0.1)
    ref = lambda m: RefLion(groups(m, [{'lr': 3e-3}, {'weight_decay': 0.}]), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    m1,m2,o1,o2 = run_pair(ours, ref)
    assert max_diff(m1, m2) < 1e-5
    assert isinstance(o1, torch.optim.Optimizer)

def test_lion_defaults():
    h = Lion([torch.zeros(2, requires_grad=True)]).hypers[0]
    assert (h['lr'], h['mom'], h['sqr_mom'], h['wd']) == (1e-4, 0.9, 0.99, 0.)

@pytest.mark.parametrize('decouple', [False, True])
def test_adan_matches_pytorch_optimizer(decouple):
    ours = lambda m: Adan(groups(m, [{'lr': 2e-3}, {'wd': 0.}]), lr=1e-3, wd=0.05, decouple_wd=decouple)
    ref = lambda m: RefAdan(groups(m, [{'lr': 2e-3}, {'weight_decay': 0.}]), lr=1e-3, weight_decay=0.05, weight_decouple=decouple)
    m1,m2,o1,o2 = run_pair(ours, ref)
    assert max_diff(m1, m2) < 1e-5

def test_adan_max_grad_norm_is_clipping_before_step():
    "pytorch-optimizer's `max_grad_norm` is global gradient clipping, done before `step` in fastopt"
    clip = lambda i,m1,m2,o1,o2: torch.nn.utils.clip_grad_norm_(m1.parameters(), 1.0, foreach=False)
    ours = lambda m: Adan(m.parameters(), lr=1e-3)
    ref = lambda m: RefAdan(m.parameters(), lr=1e-3, max_grad_norm=1.0)
    m1,m2,o1,o2 = run_pair(ours, ref, before_step=clip)
    assert max_diff(m1, m2) < 1e-5

def test_adan_defaults_and_checks():
    h = Adan([torch.zeros(2, requires_grad=True)]).hypers[0]
    assert (h['lr'], h['mom'], h['diff_mom'], h['sqr_mom'], h['eps'], h['wd']) == (1e-3, 0.98, 0.92, 0.99, 1e-8, 0.)
    with pytest.raises(ValueError, match='diff_mom'): Adan([torch.zeros(2, requires_grad=True)], diff_mom=1.)
    with pytest.raises(TypeError, match='diff_mom'): Adan([torch.zeros(2, requires_grad=True)], diff_mom='a')
