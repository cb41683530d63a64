"Soak: a long run checkpointed every `every` steps, its process SIGKILLed mid-way and resumed, ends bit-identical to an uninterrupted run"
import os, signal, subprocess, sys, time
import pytest, torch
from torchtools_cases import assert_same

HERE = os.path.dirname(os.path.abspath(__file__))

def _worker(d, total, every, announce=-1):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join([HERE, os.environ.get('PYTHONPATH', '')])}
    cmd = [sys.executable, os.path.join(HERE, 'soak_worker.py'), str(d), f'--total={total}', f'--every={every}', f'--announce={announce}']
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def soak(tmp_path, total, every):
    "Uninterrupted run vs a run killed half an interval after its mid-way checkpoint and resumed; returns timings"
    t0 = time.time()
    ref_dir, run_dir = tmp_path/'ref', tmp_path/'run'
    ref_dir.mkdir(); run_dir.mkdir()
    import soak_worker
    soak_worker.run(str(ref_dir), total, every)  # the uninterrupted reference, in this process
    t_ref = time.time() - t0
    kill_at = (total // every // 2) * every + every // 2  # mid-way, between two checkpoints
    p = _worker(run_dir, total, every, announce=kill_at)
    lines = []
    for line in p.stdout:
        lines.append(line.strip())
        if line.strip() == f'at {kill_at}': break
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60); p.stdout.close(); p.stderr.close()
    assert p.returncode == -signal.SIGKILL and f'at {kill_at}' in lines, (p.returncode, lines[-3:])
    assert not (run_dir/'final.pth').exists()
    p = _worker(run_dir, total, every)
    out, err = p.communicate(timeout=3600)
    assert p.returncode == 0, err[-3000:]
    resumed = int(out.split('\n')[0].split()[1])
    assert resumed == kill_at - every // 2 and 0 < resumed < total, out[:200]  # the last checkpoint before the kill
    ref = torch.load(ref_dir/'final.pth', weights_only=True)
    got = torch.load(run_dir/'final.pth', weights_only=True)
    assert ref['extra']['skipped'] == total // 1231 and ref['extra']['count'] > 0
    assert_same(got, ref, 'soak')
    return {'total_s': time.time() - t0, 'uninterrupted_s': t_ref, 'resumed_from': resumed}

def test_soak_short(tmp_path):
    "2k steps, a checkpoint every 200, killed at 1100, resumed from 1000"
    soak(tmp_path, 2000, 200)

@pytest.mark.soak
def test_soak_100k(tmp_path):
    "100k steps, a checkpoint every 10k, killed at 55k, resumed from 50k (`make soak`)"
    r = soak(tmp_path, 100_000, 10_000)
    print(f"\nsoak 100k: {r}")
