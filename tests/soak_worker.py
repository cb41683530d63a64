"Soak worker: train ranger + a cosine schedule on a tiny problem to `total` steps, checkpointing every `every` steps, resuming from the last checkpoint"
import argparse, os
import torch
from torchtools_cases import make, train, snapshot
from fastopt import save_checkpoint, load_checkpoint

BAD_EVERY = 1231  # every 1231st step gets a nan gradient, which `nonfinite='skip'` skips

def run(dir, total, every, announce=-1):
    "Train to `total` steps from the last checkpoint in `dir` (if any), saving one every `every` steps; the snapshot goes to `dir/final.pth`"
    torch.set_num_threads(1)
    model, opt, _ = make('ranger')
    opt.nonfinite = 'skip'
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=1e-4)
    ck, step = os.path.join(dir, 'ckpt.pth'), 0
    if os.path.exists(ck):
        c = load_checkpoint(ck, opt, model)
        sched.load_state_dict(c['scheduler'])
        step = c['step']
    print(f'resumed {step}', flush=True)
    while step < total:
        n = min(every - step % every, total - step)
        if step < announce < step + n: n = announce - step
        train(model, opt, sched, step, n, bad_every=BAD_EVERY)
        step += n
        if step % every == 0:
            save_checkpoint(ck, opt, model, scheduler=sched, step=step)
            print(f'ckpt {step}', flush=True)
        if step == announce: print(f'at {step}', flush=True)
    torch.save(snapshot(model, opt), os.path.join(dir, 'final.pth'))
    print('done', flush=True)

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('dir'); ap.add_argument('--total', type=int); ap.add_argument('--every', type=int)
    ap.add_argument('--announce', type=int, default=-1, help='print `at N` when step N is done (the parent kills us then)')
    a = ap.parse_args()
    run(a.dir, a.total, a.every, a.announce)
