"""fastopt on torch.distributed's engines: DDP, ZeroRedundancyOptimizer and FSDP2 (`fully_shard`), checked against
one process on the whole batch. Runs on CPU with gloo (or on GPUs with nccl):

    torchrun --standalone --nproc_per_node 2 examples/distributed_checks.py --out /tmp/checks

Each rank writes `{out}.{rank}`: a dict of measured differences and facts, which tests/test_distributed.py checks.
"""
import argparse, traceback
from datetime import timedelta
import torch, torch.distributed as dist
from torch import nn
import fastopt
from fastopt.precision import fp32_math
from fastopt import Adam


def adamw_kahan(ps, **kw):
    "AdamW with fp32 math and Kahan-compensated rounding into bf16 params"
    return fp32_math(Adam(ps, **kw), 'kahan')

STEPS, BS = 5, 16

def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)

def batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BS, 6, generator=g), torch.randn(BS, 3, generator=g)) for _ in range(STEPS)]

def local(t, rank, world):
    "This rank's slice of a global batch"
    n = len(t) // world
    return t[rank*n:(rank+1)*n]

def train(model, opt, data, rank=0, world=1):
    "`STEPS` steps of MSE on this rank's part of each batch (the whole batch with `world=1`)"
    for x,y in data:
        loss = nn.functional.mse_loss(model(local(x, rank, world).to(next(model.parameters()).dtype)).float(), local(y, rank, world))
        loss.backward(); opt.step(); opt.zero_grad()
    return model

def flat(model):
    ps = [p.full_tensor() if hasattr(p, 'full_tensor') else p for p in model.parameters()]
    return torch.cat([p.detach().float().flatten() for p in ps])

def reference(make_opt, dtype=torch.float32):
    m = make_model(dtype=dtype)
    return flat(train(m, make_opt(m.parameters()), batches()))

OPTS = {
    'Adam': lambda ps: fastopt.Adam(ps, lr=1e-2),
    'SGD': lambda ps: fastopt.SGD(ps, lr=0.1, mom=0.9, wd=0.01),
    'Lamb': lambda ps: fastopt.Lamb(ps, lr=1e-2),
}

def check_ddp(rank, world, res):
    from torch.nn.parallel import DistributedDataParallel as DDP
    for name, mk in OPTS.items():
        m = DDP(make_model())
        train(m, mk(m.parameters()), batches(), rank, world)
        res[f'ddp_{name}_maxdiff'] = (flat(m.module) - reference(mk)).abs().max().item()
    # bf16 params: the gradient all-reduce runs in bf16, so compare with the 1-process bf16 run loosely
    m = DDP(make_model(dtype=torch.bfloat16))
    train(m, adamw_kahan(m.parameters(), lr=1e-2), batches(), rank, world)
    res['ddp_AdamWKahan_bf16_maxdiff'] = (flat(m.module) - reference(lambda ps: adamw_kahan(ps, lr=1e-2), torch.bfloat16)).abs().max().item()

def check_zero(rank, world, res, out):
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.distributed.optim import ZeroRedundancyOptimizer
    kw = dict(lr=1e-2, mom=0.9, sqr_mom=0.99, wd=0.01)  # fastai names: ZeRO calls `optimizer_class(params, **kw)`
    m = DDP(make_model())
    z = ZeroRedundancyOptimizer(m.parameters(), optimizer_class=fastopt.Adam, **kw)
    train(m, z, batches(), rank, world)
    mk = lambda ps: fastopt.Adam(ps, **kw)
    res['zero_maxdiff'] = (flat(m.module) - reference(mk)).abs().max().item()
    res['zero_local_is_fastopt'] = isinstance(z.optim, fastopt.Optimizer)
    res['zero_hypers'] = {k: z.optim.param_groups[0][k] for k in ('lr', 'mom', 'sqr_mom', 'wd', 'betas')}
    # each rank holds state only for its own shard, and the shards cover the model once
    idx = {p: i for i,p in enumerate(m.module.parameters())}
    mine = sorted(idx[p] for g in z.optim.param_groups for p in g['params'])
    res['zero_shard'] = mine
    res['zero_state_for'] = sorted(idx[p] for p in z.optim.state)
    res['zero_state_numel'] = sum(t.numel() for s in z.optim.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    res['model_numel'] = sum(p.numel() for p in m.parameters())
    # consolidated state dict on rank 0 == the unsharded optimizer's state
    z.consolidate_state_dict(to=0)
    if rank == 0:
        sd = z.state_dict()
        m1 = make_model(); o1 = mk(m1.parameters()); train(m1, o1, batches())
        ref_sd = o1.state_dict()
        res['zero_sd_keys'] = sorted(sd['state'])
        res['zero_sd_maxdiff'] = max((sd['state'][i][k] - ref_sd['state'][i][k]).abs().max().item()
                                     for i in ref_sd['state'] for k in ('grad_avg', 'sqr_avg'))
        res['zero_sd_steps'] = sorted({sd['state'][i]['step'] for i in sd['state']})
        torch.save(sd, f'{out}.zero_sd')
    dist.barrier()
    # every rank loads the consolidated dict into a fresh ZeRO and continues == continuing the original
    sd = torch.load(f'{out}.zero_sd', weights_only=True)
    m2 = DDP(make_model()); m2.module.load_state_dict(m.module.state_dict())
    z2 = ZeroRedundancyOptimizer(m2.parameters(), optimizer_class=fastopt.Adam, **kw)
    z2.load_state_dict(sd)
    train(m, z, batches(seed=2), rank, world); train(m2, z2, batches(seed=2), rank, world)
    res['zero_resume_maxdiff'] = (flat(m.module) - flat(m2.module)).abs().max().item()

def check_fsdp2(rank, world, res):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    for name, mk in {**OPTS, 'AdamWKahan': lambda ps: adamw_kahan(ps, lr=1e-2)}.items():
        try:
            m = make_model(dtype=torch.bfloat16 if name == 'AdamWKahan' else torch.float32)
            for layer in (m[0], m[2]): fully_shard(layer)
            fully_shard(m)
            opt = mk(m.parameters())
            train(m, opt, batches(), rank, world)
            ref = reference(mk, torch.bfloat16 if name == 'AdamWKahan' else torch.float32)
            res[f'fsdp_{name}_maxdiff'] = (flat(m) - ref).abs().max().item()
            w = m[0].weight
            st = opt.state[w]
            res[f'fsdp_{name}_state'] = {k: [type(v).__name__, tuple(v.to_local().shape) if isinstance(v, DTensor) else None, str(v.dtype)]
                                         for k,v in st.items() if torch.is_tensor(v)}
            res[f'fsdp_{name}_local_shape'] = tuple(w.to_local().shape)
        except Exception as e:
            res[f'fsdp_{name}_error'] = ''.join(traceback.format_exception(e))[-2000:]
    # FSDP2's own mixed precision: fp32 sharded params (the master), bf16 compute; fastopt sees fp32 DTensors
    from torch.distributed.fsdp import MixedPrecisionPolicy
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    m = make_model()
    for layer in (m[0], m[2]): fully_shard(layer, mp_policy=mp)
    fully_shard(m, mp_policy=mp)
    train(m, fastopt.Adam(m.parameters(), lr=1e-2), batches(), rank, world)
    ref, p0 = reference(OPTS['Adam']), flat(make_model())
    res['fsdp_mp_param_dtype'] = str(m[0].weight.dtype)
    res['fsdp_mp_rel_err'] = ((flat(m) - ref).norm() / (ref - p0).norm()).item()

def fused_opt(mk):
    "`mk`'s optimizer on the fused engine"
    def f(ps):
        o = mk(ps); o.engine = 'fused'
        return o
    return f

def engine_facts(opt):
    "What the fused engine did: its fallback reason, and how many parameters it stepped with kernels (sharded or not)"
    lay = opt.engine._layouts.get(opt)
    buckets = [b for bs in lay.buckets for b in bs] if lay else []
    return dict(failed=opt.engine.failed, bucketed=sum(len(b.params) for b in buckets), sharded=all(b.sharded for b in buckets),
                loose=sum(len(l) for l in lay.loose) if lay else None, **opt.engine.stepped)

def check_fused(rank, world, res):
    "The fused engine under DDP (gradients as views of DDP's buckets) and FSDP2 (DTensor shards), against one eager process"
    import warnings
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.distributed.fsdp import fully_shard
    for name, mk in OPTS.items():
        try:
            m = DDP(make_model(), gradient_as_bucket_view=True)
            opt = fused_opt(mk)(m.parameters())
            train(m, opt, batches(), rank, world)
            m(torch.randn(2, 6)).sum().backward()   # one more backward: the gradients are views of DDP's bucket
            g = [p.grad for p in m.parameters()]
            res[f'fused_ddp_{name}_bucket_views'] = all(x._base is not None for x in g) and len({x.untyped_storage().data_ptr() for x in g}) == 1
            res[f'fused_ddp_{name}_maxdiff'] = (flat(m.module) - reference(mk)).abs().max().item()
            res[f'fused_ddp_{name}_engine'] = engine_facts(opt)
        except Exception as e: res[f'fused_ddp_{name}_error'] = ''.join(traceback.format_exception(e))[-2000:]
        try:
            m = make_model()
            for layer in (m[0], m[2]): fully_shard(layer)
            fully_shard(m)
            opt = fused_opt(mk)(m.parameters())
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter('always')
                train(m, opt, batches(), rank, world)
            res[f'fused_fsdp_{name}_warnings'] = [str(x.message) for x in w if 'fused engine' in str(x.message)]
            res[f'fused_fsdp_{name}_maxdiff'] = (flat(m) - reference(mk)).abs().max().item()
            res[f'fused_fsdp_{name}_engine'] = engine_facts(opt)
        except Exception as e: res[f'fused_fsdp_{name}_error'] = ''.join(traceback.format_exception(e))[-2000:]

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', required=True)
    ap.add_argument('--only', default='ddp,zero,fsdp2,fused')
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group('gloo', timeout=timedelta(seconds=120))  # torchrun's env://
    rank, world = dist.get_rank(), dist.get_world_size()
    res = {'rank': rank, 'world': world}
    todo = args.only.split(',')
    for name, f in [('ddp', lambda: check_ddp(rank, world, res)), ('zero', lambda: check_zero(rank, world, res, args.out)),
                    ('fsdp2', lambda: check_fsdp2(rank, world, res)), ('fused', lambda: check_fused(rank, world, res))]:
        if name in todo:
            try: f()
            except Exception as e: res[f'{name}_error'] = ''.join(traceback.format_exception(e))[-3000:]
    torch.save(res, f'{args.out}.{rank}')
    dist.destroy_process_group()
