"""The docs site in a real browser (issue 7): headless Chromium loads the built site from a local HTTP server.

Set-up: `make browser-setup` installs Debian's chromium and chromium-driver (`make test` runs it first); if they are
still missing, this module tries the same install once, and skips with the reason only if that fails.
The site: `_docs/` as built by `make docs` earlier in the same `make test` run, if it is newer than every notebook and
library file; otherwise it is built here (`python -m fastopt.docs`).
"""
import functools, http.server, json, os, re, shutil, subprocess, sys, tempfile, threading, time, urllib.request
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT/'_docs'
SHOTS = ROOT/'out'
CHROMIUM, DRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage', '--window-size=1280,900']

def _install_chromium():
    "Install Debian's chromium and chromium-driver if missing; return why not, or None when they are there"
    if Path(CHROMIUM).exists() and Path(DRIVER).exists(): return None
    if not shutil.which('apt-get'): return "no apt-get on this machine"
    cmd = 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver'
    if os.geteuid() != 0: cmd = f'sudo -n sh -c "{cmd}"'
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=900)
    if Path(CHROMIUM).exists() and Path(DRIVER).exists(): return None
    return f"`{cmd}` failed (exit {r.returncode}): {(r.stderr or r.stdout)[-500:]}"

def _docs_fresh():
    "True if `_docs/build.json` exists, records no errors, and is newer than every source of the site"
    info = DOCS/'build.json'
    if not info.exists(): return False
    d = json.loads(info.read_text())
    srcs = [*(ROOT/'nbs').rglob('*.ipynb'), *(ROOT/'nbs').glob('images/*'), *(ROOT/'fastopt').glob('*.py')]
    return not d.get('errors') and all(f.stat().st_mtime <= d['built'] for f in srcs)

@pytest.fixture(scope='module')
def site():
    "Base URL of `_docs/` served on 127.0.0.1 (a free port)"
    import fcntl
    SHOTS.mkdir(exist_ok=True)
    with open(SHOTS/'.docs-build.lock', 'w') as lock:  # pytest-xdist workers: one builds, the others wait and reuse
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _docs_fresh(): _build_docs()
    handler = functools.partial(type('Quiet', (http.server.SimpleHTTPRequestHandler,), {'log_message': lambda *a: None}),
                                directory=str(DOCS))
    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # the browser dropping a connection early is not an error
            if not isinstance(sys.exc_info()[1], ConnectionError): super().handle_error(request, client_address)
    srv = Server(('127.0.0.1', 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_address[1]}'
    srv.shutdown(); srv.server_close()

def _build_docs():
    r = subprocess.run([sys.executable, '-m', 'fastopt.docs'], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])})
    assert r.returncode == 0, f"docs build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"

@pytest.fixture(scope='module')
def browser():
    why = _install_chromium()
    if why: pytest.skip(f"Chromium could not be installed, so the browser test cannot run: {why}")
    webdriver = pytest.importorskip('selenium.webdriver', reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix='fastopt-chromium-')
    for f in FLAGS + [f'--user-data-dir={profile}']: opts.add_argument(f)
    drv = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)

def _load(drv, url):
    drv.get(url)
    # wait for images (the page's own and data: URIs) to finish loading or failing
    for _ in range(100):
        if drv.execute_script("return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"): break
        time.sleep(0.1)
    return drv.execute_script("return document.body.innerText")

def _images(drv):
    return drv.execute_script("return Array.from(document.images).map(i => [i.getAttribute('src').slice(0, 80), i.naturalWidth])")

def _status(url):
    with urllib.request.urlopen(url, timeout=10) as r: return r.status

def test_index_page(site, browser):
    text = _load(browser, f'{site}/index.html')
    assert 'fastopt' in browser.title
    for words in ('make demo', 'make test', 'partial(Optimizer', 'Learner('): assert words in text, f"{words!r} not on the index page"
    SHOTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(SHOTS/'docs_index.png'))
    assert (SHOTS/'docs_index.png').stat().st_size > 10_000
    imgs = _images(browser)
    assert all(w > 0 for _, w in imgs), f"images that did not load on the index page: {[s for s, w in imgs if not w]}"

def test_navigation_links_resolve(site, browser):
    pages = json.loads((DOCS/'build.json').read_text())['pages']
    for page in pages:
        _load(browser, f'{site}/{page}')
        links = browser.execute_script("return Array.from(document.querySelectorAll('nav.fo-sidebar a')).map(a => a.href)")
        hrefs = {l.split('#')[0] for l in links}
        assert {f'{site}/{p}' for p in pages} <= hrefs, f"{page}: the sidebar does not link every page: {sorted(hrefs)}"
        for h in sorted(hrefs): assert _status(h) == 200, f"{page}: navigation link {h} does not resolve"

def test_api_entries_render(site, browser):
    text = _load(browser, f'{site}/optimizer.html')
    SHOTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(SHOTS/'docs_optimizer.png'))
    assert browser.find_elements('css selector', 'h3[id="Optimizer"]'), "no `Optimizer` API entry (show_doc heading)"
    sig = re.search(r"(def|class) Optimizer\(\s*params:.{0,200}?\n\s*cbs:", text, re.S)
    assert sig, "the `Optimizer` signature (params, cbs) is not rendered on optimizer.html"
    text = _load(browser, f'{site}/adaptive.html')
    assert browser.find_elements('css selector', 'h3[id="Adam"]'), "no `Adam` API entry (show_doc heading)"
    assert re.search(r'def Adam\(\s*params:.*?sqr_mom:float=0\.99', text, re.S), "the `Adam` signature is not rendered"
    assert 'A Adam/AdamW `Optimizer`' in text or 'Adam/AdamW' in text  # its docstring

def test_plots_load(site, browser):
    "Notebook plots (embedded PNGs) and the index's image files load in the browser"
    _load(browser, f'{site}/demo.html')
    imgs = _images(browser)
    assert imgs, "demo.html has no images: the notebook's plots were not rendered"
    assert all(w > 0 for _, w in imgs), f"images that did not load on demo.html: {[s for s, w in imgs if not w]}"
