"""Run in Triton's interpreter (TRITON_INTERPRET=1) by tests/test_fused_low_bit.py: the Triton kernels of low-bit chains,
on CPU tensors, against the eager wrapper; prints one RESULT line per case"""
import sys, warnings
import torch
from fastopt import Adam, Lamb, low_bit
from fastopt.fused import cpu, cuda

cpu.CpuKernel = lambda plan, what='': cuda.CudaKernel(plan, what)   # the engine's CPU kernels are the Triton ones, interpreted

CASES = {'adam8': lambda ps: low_bit(Adam(ps, lr=1e-2, wd=0.01), 8), 'adam4': lambda ps: low_bit(Adam(ps, lr=1e-2, wd=0.01), 4),
         'lamb8': lambda ps: low_bit(Lamb(ps, lr=1e-2, wd=0.01), 8, block_size=128)}

def run(engine, make, steps=3):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in [(4097,), (70, 71), (100,)]]
    opt = make(ps); opt.engine = engine
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps: p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return ps, opt

for name in sys.argv[1].split(','):
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        pf,of = run('fused', CASES[name])
    pe,oe = run('eager', CASES[name])
    assert of.engine.failed is None and of.engine.stepped['fused'] == 2 * len(pf), of.engine.stepped
    worst_code,frac,worst_scale = 0,0.,0.
    for a,b in zip(pf, pe):
        for k,v in oe.state[b].items():
            w = of.state[a][k]
            if k.endswith('_codes'):
                lo = lambda c: torch.stack([c & 15, c >> 4], 1).flatten() if ('4' in name) else c
                d = (lo(w).int() - lo(v).int()).abs()
                worst_code,frac = max(worst_code, int(d.max())),max(frac, float((d > 0).float().mean()))
            elif k.endswith('_absmax'): worst_scale = max(worst_scale, float(((w - v).abs() / v.abs().clamp_min(1e-30)).max()))
    print(f"RESULT {name} code_diff={worst_code} frac={frac:.5f} scale_rel={worst_scale:.2e}", flush=True)
from fastopt.fused import engine as fengine
assert any(isinstance(k, cuda.CudaKernel) and any(b.role == 'qstate' for b in k.plan.buffers) for k in fengine._kernels.values())
