"""Influence Explorer benchmark (issue 7): time from a click to the attribution shown, on the demo model
and its 5000-digit index, and the time of `hf-influence demo` to a served app.

    hf-influence demo --no-launch                # builds the demo artifacts once (or: --cold below)
    python benchmarks/space_latency.py           # click latency (API and browser), warm start to a served app
    python benchmarks/space_latency.py --cold    # also the first run, in a fresh cache folder (minutes)

Click latency is measured twice: through the HTTP API (`gradio_client`: request sent → outputs
received) and in headless Chromium (click on Generate → the proponents' captions change on the page).
Each request generates a new image (DDIM, 50 steps) and attributes it against all 5000 digits. Under load,
--users clients send 4 requests each at once (every third invalid): p50 / p95 of the answered ones, queueing
included.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gradio_client import Client

from hf_influence.demo import DEFAULT_CACHE_DIR, DemoConfig, prepare_demo

CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def summary(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {
        "runs": len(seconds),
        "median_s": statistics.median(seconds),
        "p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max_s": ordered[-1],
        "all_s": seconds,
    }


def demo_to_served(cache_dir: Path, extra: list[str]) -> tuple[float, subprocess.Popen, int]:
    """Start `hf-influence demo` and return the seconds until its app answers HTTP, the process and its port."""
    port = free_port()
    command = ["hf-influence", "demo", "--cache-dir", str(cache_dir), "--port", str(port), *extra]
    environment = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            Client(f"http://127.0.0.1:{port}/", verbose=False)  # the app answers, not just the socket
            return time.perf_counter() - start, process, port
        except Exception:
            if process.poll() is not None:
                raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}") from None
            time.sleep(0.25)


def api_latency(port: int, seeds: range, steps: int, top_k: int) -> dict:
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    seconds = []
    for seed in seeds:
        start = time.perf_counter()
        client.predict(seed, steps, None, "", "loss", 1e-8, top_k, api_name="/generate")
        seconds.append(time.perf_counter() - start)
    return {"first_s": seconds[0], **summary(seconds[1:])}


def load_latency(port: int, users: int, requests_per_user: int, steps: int, top_k: int) -> dict:
    """`users` clients at once, each sending `requests_per_user` generate requests back to back (every third
    one invalid, damping −1): the seconds from sending to the answer of each valid request, queueing included,
    and whether every invalid one got its error without breaking the next."""

    def user(number: int) -> tuple[list[float], int]:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        seconds, refused = [], 0
        for request in range(requests_per_user):
            damping = -1.0 if request % 3 == 1 else 1e-8
            start = time.perf_counter()
            try:
                client.predict(
                    10_000 + number * 100 + request, steps, None, "", "loss", damping, top_k, api_name="/generate"
                )
            except Exception:
                refused += damping < 0
                continue
            seconds.append(time.perf_counter() - start)
        return seconds, refused

    with ThreadPoolExecutor(max_workers=users) as pool:
        answers = list(pool.map(user, range(users)))
    seconds = sorted(value for values, _ in answers for value in values)
    invalid = users * sum(request % 3 == 1 for request in range(requests_per_user))
    return {
        "users": users,
        "valid_requests_answered": len(seconds),
        "invalid_requests_refused": f"{sum(refused for _, refused in answers)} of {invalid}",
        "p50_s": statistics.median(seconds),
        "p95_s": seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))],
        "max_s": seconds[-1],
    }


def browser_latency(port: int, seeds: range, screenshot: Path | None) -> dict:
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
    seconds = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
        for seed in seeds:
            page.locator("#seed input").fill(str(seed))
            start = time.perf_counter()
            page.click("#generate")
            # The summary, galleries and histogram arrive in one response; the summary names the seed.
            page.wait_for_function(
                "seed => (document.querySelector('#summary')?.innerText || '').includes('seed ' + seed + ',')",
                arg=seed,
                timeout=120_000,
            )
            seconds.append(time.perf_counter() - start)
        if screenshot is not None:
            from PIL import Image

            page.wait_for_timeout(500)
            page.screenshot(path=str(screenshot), full_page=True)
            with Image.open(screenshot) as image:  # 128 colours: small enough for the README
                image.convert("RGB").quantize(colors=128).save(screenshot, optimize=True)
        browser.close()
    return summary(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="the demo's cache (built if missing)")
    parser.add_argument("--cold", action="store_true", help="also time a first run in a fresh cache folder")
    parser.add_argument("--requests", type=int, default=11, help="clicks per measurement (the first is warm-up)")
    parser.add_argument("--users", type=int, default=8, help="concurrent users of the load measurement")
    parser.add_argument(
        "--train-steps",
        type=int,
        default=DemoConfig().train_steps,
        help="the demo's training steps (latency depends on the model's size and the index, not on these)",
    )
    parser.add_argument("--screenshot", default=None, help="save a PNG of the page after the browser clicks")
    parser.add_argument("--out", default="benchmarks/results/space_latency.json")
    args = parser.parse_args()
    config = DemoConfig(train_steps=args.train_steps)
    cache = Path(args.cache_dir).expanduser()
    results: dict = {
        "demo_config": vars(config),
        "machine": {"cpus": os.cpu_count(), "torch_threads": os.environ.get("OMP_NUM_THREADS", "default")},
    }
    if args.cold:
        with tempfile.TemporaryDirectory() as fresh:
            start = time.perf_counter()
            command = [
                "hf-influence",
                "demo",
                "--no-launch",
                "--cache-dir",
                fresh,
                "--train-steps",
                str(args.train_steps),
            ]
            subprocess.run(command, check=True)
            results["first_run_no_launch_s"] = time.perf_counter() - start
    prepare_demo(config, cache)  # makes sure the warm start below is a cached one
    warm, process, port = demo_to_served(cache, ["--train-steps", str(args.train_steps)])
    results["second_run_to_served_app_s"] = warm
    try:
        seeds = range(args.requests)
        results["api_click_to_attribution"] = api_latency(port, seeds, 50, config.top_k)
        results["api_under_load"] = load_latency(port, args.users, 4, 50, config.top_k)
        browser_seeds = range(1000, 1000 + args.requests)
        screenshot = Path(args.screenshot) if args.screenshot else None
        results["browser_click_to_gallery"] = browser_latency(port, browser_seeds, screenshot)
    finally:
        process.terminate()
        process.wait(timeout=60)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
