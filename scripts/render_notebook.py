"""Render the committed notebook as a user sees it: HTML (nbconvert), then a full-page PNG (headless Chromium).

    python scripts/render_notebook.py [notebooks/jupyter_attach.ipynb] [--out build/notebook]

Needs ``pip install nbconvert`` and Chromium (``apt-get install chromium``; or set ``CHROMIUM``). Not part
of the test suite: the suite re-executes the notebook; this is for looking at it (CONTRIBUTING.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebook", nargs="?", default="notebooks/jupyter_attach.ipynb")
    ap.add_argument("--out", default="build/notebook", help="output folder (default: %(default)s)")
    ap.add_argument("--width", type=int, default=1100, help="page width in pixels (default: %(default)s)")
    ap.add_argument("--height", type=int, default=4400, help="page height in pixels (default: %(default)s)")
    args = ap.parse_args()
    try:
        import nbconvert
        import nbformat
    except ImportError:
        print("render_notebook: error: needs nbconvert; pip install nbconvert", file=sys.stderr)
        return 2
    browser = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("render_notebook: error: no Chromium; apt-get install chromium, or set CHROMIUM", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    html, _ = nbconvert.HTMLExporter().from_notebook_node(nbformat.read(args.notebook, as_version=4))
    page = out / (Path(args.notebook).stem + ".html")
    page.write_text(html, encoding="utf-8")
    png = page.with_suffix(".png")
    # Flags: no network of its own (this machine has none; Chromium would retry lookups), a fresh profile.
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                    f"--user-data-dir={out / 'profile'}", f"--window-size={args.width},{args.height}",
                    f"--screenshot={png.resolve()}", page.resolve().as_uri()], check=True, timeout=120,
                   capture_output=True)
    print(f"{page}\n{png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
