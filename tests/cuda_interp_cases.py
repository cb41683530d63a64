"Run by tests/test_fused_cuda.py in a process with TRITON_INTERPRET=1: the Triton kernels on CPU tensors vs the C++ kernels"
import sys, torch, fastopt
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
    o = getattr(fastopt, name)(ps, lr=1e-2); o.engine = 'eager'
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
        a, sa, npass = run('triton', name, dt, shapes)
        b, sb, _ = run('cpp', name, dt, shapes)
        p0,_ = setup(name, dt, shapes)
        worst = max(ulps(x.detach(), y.detach(), scale=z.detach()).max().item() for x,y,z in zip(a, b, p0))
        for x,y in zip(sa, sb):
            for k,v in y.items():
                if torch.is_tensor(v): worst = max(worst, ulps(x[k], v, scale=v.abs().float().mean().expand_as(v) if v.dim() else v.abs()).max().item())
        print(f"RESULT {name} {str(dt)[6:]} passes={npass} ulps={worst}", flush=True)
