"Checkpoints: torch's format, fastai's format, bit-exact resume in a fresh process for every optimizer and engine, bad files"
import copy, io, os, subprocess, sys
import pytest, torch
from torch import nn
import fastopt
from fastopt import Adam, RAdam, Lookahead, ranger, engines, save_checkpoint, load_checkpoint
from torchtools_cases import OPTS, make, make_model, train, snapshot, assert_same, batch

HERE = os.path.dirname(os.path.abspath(__file__))
N, M = 7, 6  # steps before and after the checkpoint (ranger's k=3 and lookahead_sgd's k=2 sync inside both spans)

def _roundtrip(obj):
    b = io.BytesIO(); torch.save(obj, b); b.seek(0)
    return torch.load(b, weights_only=True)

@pytest.mark.parametrize('name', OPTS)
def test_torch_format(name):
    "`state_dict` is torch's layout, loads with weights_only=True, records the type and callbacks, and a torch optimizer reads it"
    model, opt, _ = make(name)
    train(model, opt, None, 0, 3)
    sd = _roundtrip(opt.state_dict())
    assert sorted(sd['state']) == list(range(4)) and [g['params'] for g in sd['param_groups']] == [[0, 1], [2, 3]]
    meta = sd['fastopt']
    assert meta['type'] == type(opt).__name__ and meta['skipped_steps'] == 0
    assert meta['cbs'] == [fastopt.optimizer._cb_name(cb) for cb in opt.cbs] and len(meta['cbs']) == len(opt.cbs)
    for st in sd['state'].values():
        for k,v in st.items(): assert isinstance(v, (torch.Tensor, int, float, bool)), (k, type(v))
    if isinstance(opt, Lookahead): assert sd['count'] == 3
    # torch's own loader accepts the layout (it keeps the state under fastopt's names)
    tmodel = make_model()
    topt = torch.optim.SGD([list(tmodel[0].parameters()), list(tmodel[2].parameters())][0], lr=0.1)
    topt.add_param_group({'params': list(tmodel[2].parameters())})
    topt.load_state_dict(sd)
    assert set(topt.state[tmodel[0].weight]) == set(sd['state'][0])

def _resume_jobs(tmp_path, cases):
    "Train each case N steps and save; resume all in ONE fresh process for M steps; compare with N+M uninterrupted steps"
    jobs, refs = [], {}
    for i,(name, engine, sched, bad_every) in enumerate(cases):
        model, opt, s = make(name, engine=engine, sched=sched)
        if bad_every: opt.nonfinite = 'skip'
        train(model, opt, s, 0, N, bad_every)
        ck = str(tmp_path/f'ck{i}.pth')
        save_checkpoint(ck, opt, model, **({'scheduler': s} if s else {}), step=N)
        train(model, opt, s, N, M, bad_every)
        refs[i] = snapshot(model, opt)
        jobs.append(dict(name=name, engine=engine, sched=sched, bad_every=bad_every, ckpt=ck, m=M, out=str(tmp_path/f'out{i}.pth')))
    torch.save(jobs, tmp_path/'jobs.pth')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join([HERE, os.environ.get('PYTHONPATH', '')])}
    r = subprocess.run([sys.executable, os.path.join(HERE, 'torchtools_cases.py'), str(tmp_path/'jobs.pth')],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for i,job in enumerate(jobs):
        got = torch.load(job['out'], weights_only=True)
        assert_same(got, refs[i], f"{job['name']}/{job['engine']}")
    return refs

def test_resume_bit_exact_fresh_process(tmp_path):
    "Every built-in optimizer on every registered engine, plus OneCycleLR and skipped non-finite steps, in one subprocess"
    torch.set_num_threads(1)
    cases = [(name, engine, False, 0) for name in OPTS for engine in engines]
    cases += [(name, engine, True, 0) for name in ('adam', 'sgd_mom', 'ranger') for engine in engines]
    cases += [(name, engine, False, 4) for name in ('adam', 'ranger') for engine in engines]
    refs = _resume_jobs(tmp_path, cases)
    skipped = [refs[i]['extra']['skipped'] for i,c in enumerate(cases) if c[3]]
    assert all(s == (N+M)//4 for s in skipped), skipped  # the skipped-step count survives the checkpoint too

def test_resume_is_not_trivially_equal(tmp_path):
    "The comparison can fail: resuming with a different lr gives different params"
    model, opt, _ = make('adam')
    train(model, opt, None, 0, N)
    sd = copy.deepcopy(opt.state_dict()); msd = copy.deepcopy(model.state_dict())
    train(model, opt, None, N, M); ref = snapshot(model, opt)
    model2, opt2, _ = make('adam', seed=5)
    model2.load_state_dict(msd); opt2.load_state_dict(sd); opt2.set_hyper('lr', 2e-2)
    train(model2, opt2, None, N, M)
    with pytest.raises(AssertionError): assert_same(snapshot(model2, opt2)['params'], ref['params'])

def test_fastai_format_loads():
    "State dicts saved by fastai 2.8's Optimizer and Lookahead load, and training continues identically"
    fo = pytest.importorskip('fastai.optimizer')
    for name, fa_fn, our_fn in [('adam', lambda ps: fo.Adam(ps, lr=1e-2), lambda ps: Adam(ps, lr=1e-2)),
                                ('ranger', lambda ps: fo.ranger(ps, lr=1e-2, k=3), lambda ps: ranger(ps, lr=1e-2, k=3))]:
        m1, m2 = make_model(), make_model()
        fa = fa_fn([list(m1[0].parameters()), list(m1[2].parameters())])
        for i in range(5):
            x,y = batch(i); fa.zero_grad(); nn.functional.mse_loss(m1(x), y).backward(); fa.step()
        b = io.BytesIO(); torch.save(fa.state_dict(), b); b.seek(0)
        sd = torch.load(b, weights_only=False)  # fastai's dict holds fastcore `L`s: not loadable with weights_only
        assert 'hypers' in sd and 'param_groups' not in sd
        m2.load_state_dict(m1.state_dict())
        ours = our_fn([list(m2[0].parameters()), list(m2[2].parameters())])
        ours.load_state_dict(sd)
        for i in range(5, 9):
            x,y = batch(i)
            fa.zero_grad(); nn.functional.mse_loss(m1(x), y).backward(); fa.step()
            ours.zero_grad(); nn.functional.mse_loss(m2(x), y).backward(); ours.step()
        for a,b in zip(m1.parameters(), m2.parameters()): torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)

# ---- bad state files: a clear error naming what differs, and nothing changed ----

def _deep(model, opt):
    groups = [{**copy.deepcopy({k:v for k,v in g.items() if k != 'params'}), 'params': list(g['params'])} for g in opt.param_groups]
    return {'snap': snapshot(model, opt), 'groups': groups, 'count': getattr(opt, 'count', None)}

def _unchanged(model, opt, before):
    after = _deep(model, opt)
    assert_same(after['snap'], before['snap'], 'after failed load')
    assert len(after['groups']) == len(before['groups'])
    for a,b in zip(after['groups'], before['groups']):
        assert set(a) == set(b) and all(a[k] == b[k] for k in a if k != 'params')
        assert len(a['params']) == len(b['params']) and all(x is y for x,y in zip(a['params'], b['params']))
    assert after['count'] == before['count']

@pytest.fixture
def trained():
    model, opt, _ = make('ranger')
    train(model, opt, None, 0, 4)
    return model, opt

@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty', 'not_dict', 'pickle'])
def test_corrupt_file(tmp_path, trained, damage):
    model, opt = trained
    f = tmp_path/'ck.pth'
    save_checkpoint(f, opt, model, step=4)
    data = f.read_bytes()
    if damage == 'truncated': f.write_bytes(data[:len(data)*2//3])
    elif damage == 'garbage': f.write_bytes(bytes((b*7+3) % 256 for b in data))
    elif damage == 'empty': f.write_bytes(b'')
    elif damage == 'not_dict': torch.save([1, 2], f)
    elif damage == 'pickle':  # an arbitrary object: refused by weights_only
        import pickle; f.write_bytes(pickle.dumps(object(), protocol=2))
    before = _deep(model, opt)
    with pytest.raises(ValueError, match='ck.pth') as e: load_checkpoint(f, opt, model)
    assert ('truncated' in str(e.value)) or ('not a dict' in str(e.value))
    _unchanged(model, opt, before)
    with pytest.raises(FileNotFoundError): load_checkpoint(tmp_path/'missing.pth', opt, model)

@pytest.mark.parametrize('other,msg', [
    (lambda ps: Adam(ps, lr=1e-2), "saved by a 'Optimizer' optimizer, this one is a 'Lookahead'"),
    (lambda ps: Lookahead(Adam(ps, lr=1e-2)), "callbacks ['weight_decay', 'average_grad', 'average_sqr_grad', 'step_stat', 'adam_step']"),
])
def test_other_optimizer_type(tmp_path, trained, other, msg):
    model, opt = trained
    m2 = make_model()
    o2 = other([list(m2[0].parameters()), list(m2[2].parameters())])
    train(m2, o2, None, 0, 2)
    save_checkpoint(tmp_path/'ck.pth', o2, m2)
    before = _deep(model, opt)
    with pytest.raises(ValueError) as e: load_checkpoint(tmp_path/'ck.pth', opt, model)
    assert msg in str(e.value), str(e.value)
    _unchanged(model, opt, before)

def test_adam_into_radam(trained):
    "Same layout, same state names, other step: refused by the callback names"
    m = make_model()
    a = Adam([list(m[0].parameters()), list(m[2].parameters())], lr=1e-2); train(m, a, None, 0, 2)
    r = RAdam([list(m[0].parameters()), list(m[2].parameters())], lr=1e-2); train(m, r, None, 0, 1)
    before = _deep(m, r)
    with pytest.raises(ValueError, match=r"'adam_step'\].*'radam_step'\]"): r.load_state_dict(a.state_dict())
    _unchanged(m, r, before)
    sd = {k:v for k,v in a.state_dict().items() if k != 'fastopt'}  # without the record it is the user's call...
    with pytest.raises(ValueError, match=r"lacks hyper-parameter\(s\) \['beta'\]"): r.load_state_dict(sd)   # ...but RAdam reads `beta`
    _unchanged(m, r, before)
    sd['param_groups'] = [{**g, 'beta': 0.} for g in sd['param_groups']]
    r.load_state_dict(sd)

def _mismatch(kind):
    "An optimizer like `trained`'s whose layout differs by `kind`"
    if kind == 'groups':  # one group instead of two
        m = make_model(); return m, ranger(list(m.parameters()), lr=1e-2, k=3)
    if kind == 'params_per_group':
        m = make_model(); return m, ranger([list(m[0].parameters()) + [m[2].weight], [m[2].bias]], lr=1e-2, k=3)
    if kind == 'shape':
        m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
        return m, ranger([list(m[0].parameters()), list(m[2].parameters())], lr=1e-2, k=3)

@pytest.mark.parametrize('kind,msg', [('groups', '2 parameter groups, the optimizer has 1'),
                                      ('params_per_group', 'group 0 has 2 parameters, the optimizer\'s has 3'),
                                      ('shape', 'of parameter 2 has shape (3, 5), the parameter has (4, 5)')])
def test_mismatched_layout(trained, kind, msg):
    model, opt = trained
    sd = _roundtrip(opt.state_dict())
    m2, o2 = _mismatch(kind)
    train(m2, o2, None, 0, 2) if kind != 'shape' else None
    before = _deep(m2, o2)
    with pytest.raises(ValueError) as e: o2.load_state_dict(sd)
    assert msg in str(e.value), str(e.value)
    _unchanged(m2, o2, before)

def test_model_mismatch_leaves_optimizer(tmp_path, trained):
    "load_checkpoint checks the model before loading the optimizer: a misfit model changes neither"
    model, opt = trained
    save_checkpoint(tmp_path/'ck.pth', opt, model)
    m2, _ = _mismatch('shape')
    m3 = make_model(seed=3); o3 = ranger([list(m3[0].parameters()), list(m3[2].parameters())], lr=1e-2, k=3)
    train(m3, o3, None, 0, 2)
    before = _deep(m3, o3)
    with pytest.raises(ValueError, match=r"'2.weight' has shape \(3, 5\), the model's has \(4, 5\)"): load_checkpoint(tmp_path/'ck.pth', o3, m2)
    _unchanged(m3, o3, before)

def test_bad_values(trained):
    "Bad hypers, counts and metadata in a state dict raise naming them"
    model, opt = trained
    before = _deep(model, opt)
    for mutate, msg in [(lambda sd: sd['param_groups'][0].update(lr=-1.), '`lr`'),
                        (lambda sd: sd.update(count=-1), "`state_dict['count']`"),
                        (lambda sd: sd['fastopt'].update(skipped_steps='x'), 'skipped_steps'),
                        (lambda sd: sd.update(fastopt=3), "`state_dict['fastopt']`"),
                        (lambda sd: sd['state'].update({9: {}}), 'parameter index 9')]:
        sd = copy.deepcopy(opt.state_dict()); mutate(sd)
        with pytest.raises((ValueError, TypeError), match=msg.replace('[', r'\[').replace(']', r'\]')): opt.load_state_dict(sd)
        _unchanged(model, opt, before)

@pytest.mark.parametrize('how', ['deepcopy', 'pickle'])
@pytest.mark.parametrize('name', OPTS)
def test_copy_and_pickle(name, how):
    "A deep copy or a pickle of (model, optimizer) keeps callbacks, engine, settings and state, and trains identically"
    import pickle
    model, opt, _ = make(name)
    opt.nonfinite = 'skip'
    opt.register_step_post_hook(lambda *a: None)  # torch drops hooks from copies, and a lambda would not pickle
    train(model, opt, None, 0, 3, bad_every=3)
    m2, o2 = copy.deepcopy((model, opt)) if how == 'deepcopy' else pickle.loads(pickle.dumps((model, opt)))
    assert o2.param_groups[0]['params'][0] is m2[0].weight and m2[0].weight is not model[0].weight
    assert (o2.nonfinite, o2.skipped_steps, type(o2.engine)) == ('skip', 1, type(opt.engine))
    train(model, opt, None, 3, 4, bad_every=3); train(m2, o2, None, 3, 4, bad_every=3)
    assert_same(snapshot(m2, o2), snapshot(model, opt))
