"The zoo's callbacks never bring a tensor value to the host (no `.item()`, `float(t)`, `if t:`), so a GPU step never stalls per tensor"
import pytest, torch
from torch import nn
from fastopt.zoo import zoo_optimizers

@pytest.fixture
def no_host_sync(monkeypatch):
    def boom(*args, **kwargs): raise AssertionError("host synchronisation: a tensor value was read on the host")
    for name in ('item', 'tolist', '__bool__', '__float__', '__int__', '__index__'):
        monkeypatch.setattr(torch.Tensor, name, boom)

@pytest.mark.parametrize('name', sorted(zoo_optimizers))
def test_step_reads_no_tensor_on_host(name, no_host_sync):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    e = zoo_optimizers[name]
    opt = e['opt_func'](model.parameters(), lr=e['lr'])
    for _ in range(3):
        for p in model.parameters(): p.grad = torch.randn_like(p)
        opt.step()
    if hasattr(opt, 'eval'): opt.eval(); opt.train()

def test_the_guard_catches_a_sync(no_host_sync):
    with pytest.raises(AssertionError, match='host'): (torch.ones(2) > 0).all().item()
    with pytest.raises(AssertionError, match='host'):
        if torch.ones(1): pass
