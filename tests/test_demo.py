"The demo (`make demo` = `python -m fastopt.demo`): runs end to end, trains well above chance, is reproducible."
import re, runpy, sys
import pytest, torch

pytest.importorskip('fastai'); pytest.importorskip('sklearn'); pytest.importorskip('matplotlib')
from fastopt.demo import run_demo, resolve_opt, main

def test_demo_command(tmp_path, monkeypatch, capsys):
    "`python -m fastopt.demo` with two optimizers (one found in the fastopt namespace) prints the table, writes PNG and markdown"
    out = tmp_path/'plots'/'losses.png'
    # run the module as `python -m` does, in this process (its imports are already loaded)
    monkeypatch.setattr(sys, 'argv', ['fastopt.demo', '--opts', 'SGD-mom,QHAdam@3e-3', '--epochs', '1', '--out', str(out)])
    runpy.run_module('fastopt.demo', run_name='__main__', alter_sys=False)
    stdout = capsys.readouterr().out
    assert re.search(r'SGD-mom\s+epoch 1/1', stdout) and re.search(r'QHAdam\s+epoch 1/1', stdout), stdout  # progress lines
    header = next(l for l in stdout.splitlines() if 'accuracy' in l and 'seconds' in l)
    assert 'valid_loss' in header, stdout
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and out.stat().st_size > 10_000
    rows = [l for l in out.with_suffix('.md').read_text().splitlines() if l.startswith('| ') and '---' not in l][1:]
    assert [row.split('|')[1].strip() for row in rows] == ['SGD-mom', 'QHAdam']
    accs = [float(row.split('|')[5]) for row in rows]
    assert all(a > 0.5 for a in accs), accs  # chance is 0.1

def test_same_start_same_result():
    "Every run starts from the same weights and batch order: the same optimizer twice gives the same losses"
    torch.set_num_threads(1)
    a, b = run_demo(['Signum', 'Signum'], epochs=1, verbose=False)
    assert a['losses'] == b['losses'] and a['accuracy'] == b['accuracy']
    assert a['accuracy'] > 0.5

def test_bad_input():
    with pytest.raises(ValueError, match='Nope'): main(['--opts', 'SGD,Nope'])
    with pytest.raises(ValueError, match='epochs'): run_demo(['SGD'], epochs=0)
    with pytest.raises(ValueError, match='opts'): run_demo([], epochs=1)
    with pytest.raises(ValueError, match='Optimizer'): resolve_opt('Optimizer@x')
    assert resolve_opt('ranger@0.05')[2] == 0.05
