"""Train a fastai `Learner` with a fastopt optimizer across processes (or machines).

One machine, 2 processes on CPU:
    torchrun --standalone --nproc_per_node 2 examples/distrib_learner.py
Two machines (run on each, NODE_RANK 0 and 1, MASTER the address of node 0):
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 1 --master_addr $MASTER --master_port 29500 examples/distrib_learner.py
`--out FILE` makes each rank save its final parameters to FILE.RANK. `python examples/distrib_learner.py --reference 2
--out FILE` trains the same Learner in one process on the concatenated batches of the 2 ranks (what DDP's gradient
averaging computes) and saves FILE.ref (it must be a separate, non-distributed process: fastai gathers across ranks).
"""
import argparse, os
import torch
from torch import nn
from fastai.basics import Learner, DataLoaders, MSELossFlat, rank_distrib, num_distrib
from fastai.distributed import *  # patches `Learner.distrib_ctx`
import fastopt

# fastai 2.8.12's `DistributedDL._broadcast` moves the batch order to CUDA unconditionally (`LongTensor(t).cuda()`,
# written for nccl), so a CPU-only run with gloo fails there. Broadcast on the backend's own device instead.
def _broadcast(self, t, rank):
    "Broadcast the list `t` from `rank`, on CUDA for nccl and on the CPU for gloo"
    dev = 'cuda' if torch.distributed.get_backend() == 'nccl' else 'cpu'
    t = torch.tensor(t, dtype=torch.long, device=dev)
    torch.distributed.broadcast(t, rank)
    return t.cpu().tolist()
DistributedDL._broadcast = _broadcast

def get_learner(opt_func, n=256, bs=32, world=1):
    "A small regression `Learner`; `world>1` orders the data as the concatenated per-rank batches of a `world`-process run"
    torch.manual_seed(0)
    X = torch.randn(n, 8); Y = X @ torch.randn(8, 1) + 0.1
    if world > 1:  # `DistributedDL` gives rank r the r-th contiguous slice of each epoch; one step of a
        # `world`-process run sees batch i of every rank, so reorder the data so that batch i here is all of those
        idx = torch.arange(n).view(world, -1, bs).transpose(0, 1).flatten()
        X,Y,bs = X[idx],Y[idx],bs*world
    dls = DataLoaders.from_dsets(list(zip(X, Y)), list(zip(X[:64], Y[:64])), bs=bs, device='cpu', shuffle=False)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    return Learner(dls, model, loss_func=MSELossFlat(), opt_func=opt_func)

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--epochs', type=int, default=2)
    ap.add_argument('--out', default=None)
    ap.add_argument('--reference', type=int, default=0, help='train in 1 process on the batches of a REFERENCE-process run')
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.reference:
        ref = get_learner(fastopt.Adam, world=args.reference)
        ref.fit(args.epochs, 1e-2)
        torch.save({'params': torch.cat([p.detach().flatten() for p in ref.model.parameters()])}, f"{args.out}.ref")
        raise SystemExit
    learn = get_learner(fastopt.Adam)
    # Accelerate picks the backend: gloo on CPU (it needs `cpu=True` to go multi-process there), nccl on GPUs
    with learn.distrib_ctx(cpu=not torch.cuda.is_available()):
        learn.fit(args.epochs, 1e-2)
    assert isinstance(learn.opt, torch.optim.Optimizer)
    params = torch.cat([p.detach().flatten() for p in learn.model.parameters()])
    if args.out:
        torch.save({'rank': rank_distrib(), 'world': num_distrib(), 'params': params, 'opt_type': type(learn.opt).__name__,
                    'losses': [v[:2] for v in learn.recorder.values]}, f"{args.out}.{rank_distrib()}")
