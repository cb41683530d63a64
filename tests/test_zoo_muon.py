import pytest, torch
from torch import nn
from fastopt.zoo import Muon, zeropower_via_newtonschulz
from torch.optim._muon import _zeropower_via_newtonschulz
from zoo_helpers import run_pair, split, max_diff

def _ref(m, muon_kw, adam_kw, groups=None):
    "torch's Muon on the 2-D weights and torch's AdamW on the rest, stepped together"
    mats,rest = split(m)
    mo = torch.optim.Muon(mats, **muon_kw)
    ao = torch.optim.AdamW(rest, foreach=False, **adam_kw)
    class Both:
        def step(self): mo.step(); ao.step()
    return Both()

def test_newton_schulz_matches_torch():
    for shape in [(24, 12), (6, 24), (16, 16)]:
        G = torch.randn(shape)
        assert torch.equal(zeropower_via_newtonschulz(G), _zeropower_via_newtonschulz(G, (3.4445, -4.7750, 2.0315), 5, 1e-7))

@pytest.mark.parametrize('kw,tkw', [
    (dict(), dict()),
    (dict(nesterov=False, adjust_lr_fn='match_rms_adamw', mom=0.9, wd=0.05), dict(nesterov=False, adjust_lr_fn='match_rms_adamw', momentum=0.9, weight_decay=0.05)),
])
def test_muon_matches_torch(kw, tkw):
    ours = lambda m: Muon(m.parameters(), lr=2e-2, adam_lr=3e-3, **kw)
    ref = lambda m: _ref(m, dict(lr=2e-2, **tkw), dict(lr=3e-3))
    m1,m2,o1,o2 = run_pair(ours, ref)
    assert max_diff(m1, m2) < 1e-5
    assert max_diff(m1, run_pair(ours, ref, steps=0)[0]) > 1e-2  # it did move

def test_muon_with_user_groups():
    "Each user group is split in two; a group's own hypers apply to both halves"
    def ours(m):
        return Muon([{'params': list(m[0].parameters()), 'lr': 5e-3}, {'params': list(m[1].parameters()) + list(m[3].parameters())}],
                    lr=2e-2, adam_lr=1e-3)
    def ref(m):
        mo = torch.optim.Muon([{'params': [m[0].weight], 'lr': 5e-3}, {'params': [m[3].weight]}], lr=2e-2)
        ao = torch.optim.AdamW([{'params': [m[0].bias], 'lr': 5e-3}, {'params': list(m[1].parameters()) + [m[3].bias]}], lr=1e-3, foreach=False)
        class Both:
            def step(self): mo.step(); ao.step()
        return Both()
    m1,m2,o1,o2 = run_pair(ours, ref)
    assert [len(g['params']) for g in o1.param_groups] == [1, 1, 1, 3]
    assert max_diff(m1, m2) < 1e-5

def test_muon_defaults_and_checks():
    m = nn.Linear(3, 2)
    opt = Muon(m.parameters())
    assert isinstance(opt, torch.optim.Optimizer)
    mh,ah = opt.hypers
    assert {k: mh[k] for k in ('lr','mom','wd','nesterov','eps','ns_steps','adjust_lr_fn')} == \
        dict(lr=1e-3, mom=0.95, wd=0.1, nesterov=True, eps=1e-7, ns_steps=5, adjust_lr_fn=None)
    assert {k: ah[k] for k in ('lr','mom','sqr_mom','eps','wd')} == dict(lr=1e-3, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.01)
    with pytest.raises(ValueError, match='ns_steps'): Muon(m.parameters(), ns_steps=100)
    with pytest.raises(TypeError, match='ns_coefficients'): Muon(m.parameters(), ns_coefficients=(1., 2.))
    with pytest.raises(TypeError, match='nesterov'): Muon(m.parameters(), nesterov=1)
    with pytest.raises(ValueError, match='adjust_lr_fn'): Muon(m.parameters(), adjust_lr_fn='x')
    with pytest.raises(ValueError, match='mom'): Muon(m.parameters(), adam_mom=1.5)
