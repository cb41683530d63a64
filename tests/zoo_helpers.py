"Shared harness for the zoo tests: two copies of a random model, identical gradients, compare after `steps` steps."
from copy import deepcopy
import torch
from torch import nn

def make_model(seed=0):
    "A small random model with 2-D weights, 1-D biases and a LayerNorm"
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.LayerNorm(24), nn.ReLU(), nn.Linear(24, 6))

def split(model):
    "Two groups: the 2-D weights, and everything else"
    ps = list(model.parameters())
    return [p for p in ps if p.ndim == 2], [p for p in ps if p.ndim != 2]

def groups(model, extra):
    "Param groups of `model` (`split`), each dict updated with the matching dict of `extra`"
    return [{'params': ps, **e} for ps,e in zip(split(model), extra)]

def max_diff(m1, m2):
    return max((a.detach().float() - b.detach().float()).abs().max().item() for a,b in zip(m1.parameters(), m2.parameters()))

def run_pair(make_ours, make_ref, steps=100, seed=0, scale=1., dtype=torch.float32, before_step=None, model=None):
    "Step `make_ours(model)` and `make_ref(model_copy)` with identical random gradients; return both models and optimizers"
    m1 = (model or make_model)(seed).to(dtype)
    m2 = deepcopy(m1)
    o1,o2 = make_ours(m1),make_ref(m2)
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(steps):
        for p1,p2 in zip(m1.parameters(), m2.parameters()):
            gr = (torch.randn(p1.shape, generator=g) * scale).to(dtype)
            p1.grad,p2.grad = gr.clone(),gr.clone()
        if before_step is not None: before_step(i, m1, m2, o1, o2)
        o1.step(); o2.step()
    return m1,m2,o1,o2
