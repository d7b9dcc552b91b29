"""How long from saving a prelude to the first streamed token on `watch`'s live page.

A copy of examples/ in a temporary folder, `cached-prompts watch` on it (the default model, the
examples' cached-prompts.toml), the live page in headless Chromium. After the first round,
each repeat edits preludes/dictionary.txt and measures, on the page, when the first text of
one of its prompts' outputs shows (a MutationObserver notes Date.now(); the save is noted with
time.time() just after the write: one clock). With --screenshot, the page is captured while
the outputs stream.

    python bench/watch_latency.py [-n 2] [--repeats 3] [--screenshot docs/watch.png]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
URL_LINE = re.compile(r"live report: (http://\S+)")
FIRST_TEXT = """() => {
    window.firstText = undefined;
    const observer = new MutationObserver(() => {
        const live = [...document.querySelectorAll(".card.live pre.live-out")].find(p => p.textContent);
        if (live && window.firstText === undefined) { window.firstText = Date.now(); observer.disconnect(); }
    });
    observer.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""
UP_TO_DATE = "() => document.getElementById('live-status').textContent.startsWith('up to date')"


def start_watch(root: Path, log: Path, n: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "cached_prompts", "--root", str(root), "watch", "-n", str(n), "--port", "0"]
    with log.open("wb") as handle:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=handle)
    while True:
        match = URL_LINE.search(log.read_text(encoding="utf-8", errors="replace"))
        if match:
            return process, match.group(1)
        if process.poll() is not None:
            raise SystemExit("watch stopped:\n" + log.read_text(encoding="utf-8", errors="replace"))
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2, help="outputs per input (watch -n)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--screenshot", type=Path, default=None, help="save a picture of the live page here")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "examples"
        shutil.copytree(REPO / "examples", root)
        process, url = start_watch(root, Path(folder) / "watch.log", args.n)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(url)
                page.wait_for_function(UP_TO_DATE, timeout=3_600_000)
                prelude = root / "preludes" / "dictionary.txt"
                original = prelude.read_text(encoding="utf-8")
                latencies = []
                for repeat in range(args.repeats):
                    page.evaluate(FIRST_TEXT)
                    prelude.write_text(original.replace("apple", f"apple{' ' * (repeat + 1)}", 1), encoding="utf-8")
                    saved = time.time() * 1000
                    page.wait_for_function("() => window.firstText !== undefined", timeout=600_000)
                    latencies.append((page.evaluate("window.firstText") - saved) / 1000)
                    print(f"edit {repeat + 1}: first streamed token on the page {latencies[-1]:.2f} s after the save",
                          flush=True)
                    if args.screenshot is not None and repeat == args.repeats - 1:
                        time.sleep(2.0)  # some text streamed
                        page.evaluate("document.querySelector('.card.live').closest('section').scrollIntoView()")
                        page.screenshot(path=str(args.screenshot), full_page=False)
                        print(f"screenshot: {args.screenshot}")
                    page.wait_for_function(UP_TO_DATE, timeout=3_600_000)
                print(f"median {statistics.median(latencies):.2f} s over {len(latencies)} edits "
                      f"(min {min(latencies):.2f}, max {max(latencies):.2f}); {os.cpu_count()} CPUs")
                browser.close()
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
