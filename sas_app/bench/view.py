"""`sas bench view [--json]`: the viewer's load time and frame rate in headless Chromium.

For each map size (default 100k and 1M points; a synthetic room-sized cloud: floor, walls and
boxes, RGB and labels) a fresh viewer is served and a headless Chromium (the system browser,
:func:`sas_app.viewer.find_browser`) opens it:

* ``load_s``: from opening the page (the browser already running) to the first frame with the
  cloud drawn (the page loads its client, the viewer's state goes over the websocket, the client
  decodes it, uploads it and draws; measured by asking the client for renders until one shows
  the cloud);
* ``fps``: frames the page actually drew per second (WebGL draw calls counted per animation frame
  by a script injected before the page loads) while the camera orbits the scene for
  ``--seconds`` (Python moves the client's camera 30 times a second, as a person dragging would);
* ``fps_subsampled``: the same with ``Points shown`` at ``--shown`` (the viewer's subsampling).

Chromium renders WebGL on the CPU here (SwiftShader: these machines have no GPU), so the frame
rates are a lower bound for a browser on a desktop GPU; they are still the figure to compare
between versions. Needs Chromium and playwright; says why when either is missing.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

#: Counts animation frames in which WebGL drew something (window.__sasFrames).
FRAME_COUNTER = """
(() => {
  window.__sasFrames = 0; window.__sasDrew = false;
  for (const C of [window.WebGLRenderingContext, window.WebGL2RenderingContext]) {
    if (!C) continue;
    for (const name of ['drawArrays', 'drawElements', 'drawArraysInstanced', 'drawElementsInstanced']) {
      const orig = C.prototype[name];
      if (!orig) continue;
      C.prototype[name] = function (...a) { window.__sasDrew = true; return orig.apply(this, a); };
    }
  }
  const tick = () => { if (window.__sasDrew) { window.__sasFrames++; window.__sasDrew = false; }
                       requestAnimationFrame(tick); };
  requestAnimationFrame(tick);
})();
"""


def synthetic_cloud(n: int, seed: int = 0):
    """A :class:`sas_app.viewer.ViewScene` of ``n`` points: a 12 x 10 m floor, four walls and 40
    boxes, coloured and labelled per surface (no features: load and frame rate only)."""
    from sas_app.viewer import ViewScene
    from sas_core.viz import label_colors

    rng = np.random.default_rng(seed)
    kinds = rng.choice(3, size=n, p=[0.45, 0.25, 0.30])
    pos = np.empty((n, 3), np.float32)
    lab = np.empty(n, np.int64)
    f = kinds == 0
    pos[f] = np.c_[rng.random((f.sum(), 2)) * [12, 10], np.zeros(f.sum())]
    lab[f] = 1
    w = kinds == 1
    t = rng.random(w.sum()) * 44
    side = np.minimum((t // 11).astype(int), 3)
    s = t - side * 11
    xy = np.select([side[:, None] == 0, side[:, None] == 1, side[:, None] == 2],
                   [np.c_[np.minimum(s, 12), np.zeros_like(s)], np.c_[np.full_like(s, 12), np.minimum(s, 10)],
                    np.c_[np.minimum(s, 12), np.full_like(s, 10)]], np.c_[np.zeros_like(s), np.minimum(s, 10)])
    pos[w] = np.c_[xy, rng.random(w.sum()) * 2.8]
    lab[w] = 0
    b = kinds == 2
    box = rng.integers(0, 40, b.sum())
    centres = np.c_[rng.random((40, 2)) * [11, 9] + 0.5, np.zeros(40)]
    sizes = rng.random((40, 3)) * [1.2, 1.0, 1.5] + 0.3
    u = rng.random((b.sum(), 3)) - 0.5
    axis = rng.integers(0, 3, b.sum())
    u[np.arange(len(u)), axis] = np.sign(u[np.arange(len(u)), axis]) * 0.5  # on a face
    pos[b] = centres[box] + u * sizes[box] + [0, 0, 0] + np.c_[np.zeros((b.sum(), 2)), sizes[box, 2] / 2]
    lab[b] = 2 + box % 18
    rgb = label_colors(lab)
    rgb = np.clip(rgb.astype(np.int16) + rng.integers(-20, 20, (n, 3)), 0, 255).astype(np.uint8)
    return ViewScene(positions=pos, rgb=rgb, labels=lab, scores=np.ones(n, np.float32),
                     class_names=[f"class {k}" for k in range(20)], source=f"synthetic benchmark cloud ({n} points)")


def _orbit(client, centre, radius, stop: threading.Event) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        a = 0.8 * (time.monotonic() - t0)
        client.camera.position = tuple(centre + np.array([np.cos(a) * radius, np.sin(a) * radius, radius * 0.7]))
        client.camera.look_at = tuple(centre)
        stop.wait(1 / 30)


def _fps(page, client, centre, radius, seconds: float) -> float:
    stop = threading.Event()
    mover = threading.Thread(target=_orbit, args=(client, centre, radius, stop), daemon=True)
    page.wait_for_timeout(300)
    f0, t0 = page.evaluate("window.__sasFrames"), time.perf_counter()
    mover.start()
    page.wait_for_timeout(int(seconds * 1000))
    f1, t1 = page.evaluate("window.__sasFrames"), time.perf_counter()
    stop.set()
    mover.join()
    return round((f1 - f0) / (t1 - t0), 2)


def measure(n: int, shown: int, seconds: float, width: int, height: int, port: int) -> dict:
    from playwright.sync_api import sync_playwright

    from sas_app.viewer import OfflineBackend, Viewer, open_page, start_server, stop_server, wait_for_client

    scene = synthetic_cloud(n)
    server = start_server("127.0.0.1", port)
    viewer = Viewer(server, OfflineBackend(scene), max_points=n, point_size=0.02)
    centre = scene.positions.mean(0).astype(np.float64)
    try:
        with sync_playwright() as p:
            browser, page = open_page(p, "about:blank", width, height, init_script=FRAME_COUNTER)
            try:
                t0 = time.perf_counter()  # the browser is running: from here the page's own load
                page.goto(f"http://127.0.0.1:{server.get_port()}/")
                client = wait_for_client(server, 60)
                while True:
                    img = client.get_render(height=height // 4, width=width // 4, transport_format="png", timeout=120)
                    if (img[..., 3] > 0).mean() > 0.01:
                        break
                    if time.perf_counter() - t0 > 180:
                        raise TimeoutError(f"{n} points: the cloud was not drawn within 180 s")
                load_s = time.perf_counter() - t0
                fps = _fps(page, client, centre, 9.0, seconds)
                viewer.max_points.value = min(shown, n)  # its on_update redraws
                time.sleep(0.5)
                client.get_render(height=64, width=64, timeout=120)
                fps_sub = _fps(page, client, centre, 9.0, seconds)
                renderer = page.evaluate("""(() => { const c = document.createElement('canvas').getContext('webgl');
                    const e = c && c.getExtension('WEBGL_debug_renderer_info');
                    return e ? c.getParameter(e.UNMASKED_RENDERER_WEBGL) : 'unknown'; })()""")
            finally:
                browser.close()
    finally:
        viewer.close()
        stop_server(server)
    return dict(points=n, load_s=round(load_s, 2), fps=fps, shown=min(shown, n), fps_subsampled=fps_sub,
                renderer=renderer, bytes_sent=int(n * (3 * 2 + 3)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="sas bench view", description=__doc__.splitlines()[0])
    parser.add_argument("--points", default="1000,100000,1000000",
                        help="comma-separated map sizes (1000: the page's own frame rate, nearly empty)")
    parser.add_argument("--shown", type=int, default=300_000, help="'Points shown' of the subsampled run")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of orbiting per frame-rate figure")
    parser.add_argument("--size", default="1280x800", help="page size WxH")
    parser.add_argument("--port", type=int, default=8600)
    args = parser.parse_args(argv)
    from sas_app.viewer import find_browser

    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return dict(skipped="playwright is not installed (requirements.txt)")
    if find_browser() is None:
        return dict(skipped="no Chromium (apt-get install chromium, or set SAS_CHROMIUM)")
    w, h = (int(v) for v in args.size.split("x"))
    out = dict(browser=find_browser(), page=f"{w}x{h}", seconds=args.seconds, runs=[])
    for n in (int(v) for v in args.points.split(",")):
        out["runs"].append(measure(n, args.shown, args.seconds, w, h, args.port))
    out["note"] = ("WebGL on the CPU (SwiftShader)" if "swiftshader" in str(out["runs"][0]["renderer"]).lower()
                   else "WebGL on " + str(out["runs"][0]["renderer"]))
    return out
