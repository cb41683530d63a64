"Run by tests/test_fused_cuda.py in a process with TRITON_INTERPRET=1: the Triton kernels on CPU tensors vs the C++ kernels"
import sys, torch, fastopt, fastopt.optim_stats
from array import array
from fastopt.fused.trace import trace_chain
from fastopt.fused.lower import lower
from fastopt.fused.passes import plan
from fastopt.fused.cuda import CudaKernel
from fastopt.fused.cpu import CpuKernel, ulps

def setup(name, dt, shapes, seed=0):
    "Params of `shapes` after one eager step of fastopt's `name` (which creates the state), with new gradients"
    torch.manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s).to(dt)) for s in shapes]
    stats = name.endswith('+stats')   # the chain wrapped by `with_stats`: reductions in the last pass
    o = getattr(fastopt, name.removesuffix('+stats'))(ps, lr=1e-2); o.engine = 'eager'
    if stats: fastopt.optim_stats.with_stats(o)
    for p in ps: p.grad = torch.randn_like(p)
    o.step()
    for p in ps: p.grad = torch.randn_like(p)
    return ps, o

def run(kind, name, dt, shapes):
    ps, o = setup(name, dt, shapes)
    st0 = o.state[ps[0]]
    ekeys = {k for k,v in st0.items() if torch.is_tensor(v) and v.shape == ps[0].shape}
    t = trace_chain(o.cbs, dt, dt, st0, dict(fastopt.Hypers(o.param_groups[0])), ekeys)
    pl = plan(lower(t.graph))
    k = (CudaKernel if kind == 'triton' else CpuKernel)(pl)
    tables = [array('q', [(p if b.role == 'param' else p.grad if b.role == 'grad' else o.state[p][b.key]).data_ptr() for p in ps])
              for b in pl.buffers]
    k(tables, array('q', [p.numel() for p in ps]), t.scalars, device='cpu')
    return ps, [o.state[p] for p in ps], len(pl.passes)

shapes = [(300, 7), (70,), (5000,), ()]
for name in sys.argv[1].split(','):
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        sh = shapes[:-1] if name.endswith('+stats') else shapes   # a 0-d parameter's statistics step eagerly (its state's shape is its own)
        a, sa, npass = run('triton', name, dt, sh)
        b, sb, _ = run('cpp', name, dt, sh)
        p0,_ = setup(name, dt, sh)
        worst = max(ulps(x.detach(), y.detach(), scale=z.detach()).max().item() for x,y,z in zip(a, b, p0))
        for x,y in zip(sa, sb):
            for k,v in y.items():
                if not torch.is_tensor(v): continue
                if k.startswith('stat_'):   # statistics: sums added in another order, rounded to the parameter's dtype
                    torch.testing.assert_close(x[k].float(), v.float(), rtol=2e-2 if dt in (torch.bfloat16, torch.float16) else 1e-5, atol=1e-6)
                else: worst = max(worst, ulps(x[k], v, scale=v.abs().float().mean().expand_as(v) if v.dim() else v.abs()).max().item())
        print(f"RESULT {name} {str(dt)[6:]} passes={npass} ulps={worst}", flush=True)
