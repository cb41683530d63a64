# ms/step of fastopt's precision modes vs torch-optimi on ~4.2M bf16 params (8 tensors), 1 thread, median of 7 after 2 warm-ups
import torch, time, statistics, optimi
from fastopt import Adam
import fastopt
from fastopt.precision import fp32_math


def adamw_kahan(ps, **kw):
    "AdamW with fp32 math and Kahan-compensated rounding into bf16 params"
    return fp32_math(Adam(ps, **kw), 'kahan')
torch.set_num_threads(1)
shapes = [(1024,1024)]*4 + [(1024,)]*4
def params(dtype):
    torch.manual_seed(0)
    ps = [torch.randn(s, dtype=dtype) for s in shapes]
    for p in ps: p.grad = torch.randn_like(p)
    return ps
cases = {
 'fastopt Adam fp32 params': (torch.float32, lambda ps: fastopt.Adam(ps, lr=1e-3)),
 'fastopt Adam bf16 (bf16 state)': (torch.bfloat16, lambda ps: fastopt.Adam(ps, lr=1e-3)),
 "fp32_math 'round'": (torch.bfloat16, lambda ps: fp32_math(fastopt.Adam(ps, lr=1e-3), 'round')),
 "fp32_math 'kahan' (AdamWKahan)": (torch.bfloat16, lambda ps: adamw_kahan(ps, lr=1e-3)),
 "fp32_math 'master'": (torch.bfloat16, lambda ps: fp32_math(fastopt.Adam(ps, lr=1e-3), 'master')),
 'optimi AdamW kahan, for-loop': (torch.bfloat16, lambda ps: optimi.AdamW(ps, lr=1e-3, kahan_sum=True, foreach=False)),
 'optimi AdamW kahan, foreach': (torch.bfloat16, lambda ps: optimi.AdamW(ps, lr=1e-3, kahan_sum=True, foreach=True)),
}
res = {}
for name,(dt,mk) in cases.items():
    ps = params(dt); opt = mk(ps); ts = []
    for i in range(9):
        t = time.perf_counter(); opt.step(); ts.append(time.perf_counter()-t)
    res[name] = statistics.median(ts[2:])*1e3
base = res['fastopt Adam bf16 (bf16 state)']
for k,v in res.items(): print(f"| {k} | {v:.1f} | {v/base:.2f} |")
