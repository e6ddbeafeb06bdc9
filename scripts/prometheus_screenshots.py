"""Take the screenshots of docs/operations.md: Debian's Prometheus scraping the suite under a
demo load, its graph page and its alerts page, in headless Chromium.

For the docs only (not `make test`): it installs Debian's chromium and prometheus packages when
they are missing (as root with apt-get), starts the suite on free ports with a database of its
own, sends the demo's events and reads for ``--seconds``, then writes
docs/images/prometheus-graphs.png and docs/images/prometheus-alerts.png.

    .venv/bin/python scripts/prometheus_screenshots.py [--seconds 70]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from contextlib import redirect_stdout
from pathlib import Path

import yaml

import devstack
import suite
from sendtime_common.tls import ClientTls

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
RULES = ROOT / "deploy" / "components" / "prometheus" / "prometheusrule.yaml"
PORT_VARIABLES = [
    f"{service}_{kind}ADDRESS"
    for service in ("INGEST", "PROFILE", "RENDER", "TRIGGERS")
    for kind in ("", "HEALTH_", "HTTP_", "METRICS_")
]
JOBS = {"ingest": "INGEST", "profile": "PROFILE", "render": "RENDER", "triggers": "TRIGGERS"}
GRAPHS = (
    'sum by (grpc_method) (rate(grpc_server_handled_total{grpc_service=~"sendtime\\\\..*"}[30s]))',
    "histogram_quantile(0.99, sum by (le) ("
    "rate(sendtime_profile_freshness_from_stored_seconds_bucket[30s])))",
    "sum by (source) (rate(sendtime_profile_reads_total[30s]))",
)


def chromium() -> str:
    if shutil.which("chromium") is None:
        devstack._apt_install("chromium", "chromium")
    found = shutil.which("chromium")
    if found is None:
        raise SystemExit("chromium not found after installing it")
    return found


def screenshot(browser: str, url: str, path: Path, height: int) -> None:
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",  # root in a container
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size=1400,{height}",
            "--virtual-time-budget=8000",  # the page's own queries and drawing
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    print(f"wrote {path.relative_to(ROOT)}")


async def load(env: dict[str, str], key: str, tls: ClientTls, seconds: float) -> int:
    """The demo, again and again, for ``seconds``: events, profile reads, renders. Runs."""
    deadline = time.monotonic() + seconds
    runs = 0
    with open(os.devnull, "w") as quiet, redirect_stdout(quiet):
        while time.monotonic() < deadline:
            await suite.run_demo(env, key, tls)
            runs += 1
            await asyncio.sleep(0.2)  # each run stores the demo template: under the key's write rate
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=70, help="how long the load runs (default 70)")
    args = parser.parse_args(argv)
    browser = chromium()
    devstack.require_promtool()  # and prometheus with it
    prometheus = shutil.which("prometheus")
    assert prometheus is not None
    with tempfile.TemporaryDirectory(prefix="sendtime-screenshots-") as temporary:
        work = Path(temporary)
        env = {
            **{k: v for k, v in os.environ.items() if k != "NATS_URL"},
            "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/sendtime_screenshots",
            "SENDTIME_RUN_DIR": str(work / "run"),
            **{variable: f"127.0.0.1:{devstack.free_port()}" for variable in PORT_VARIABLES},
        }
        with suite.suite(env) as running:
            env = {**env, **devstack.nats_connection_env(env)}
            config = {
                "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
                "rule_files": ["rules.yaml"],
                "scrape_configs": [
                    {
                        "job_name": job,
                        # The metrics ports answer only a metrics.read key: the one `make run` makes.
                        "authorization": {
                            "type": "Bearer",
                            "credentials_file": str(running.credentials.prometheus_key_file),
                        },
                        "static_configs": [{"targets": [env[f"{prefix}_METRICS_ADDRESS"]]}],
                    }
                    for job, prefix in JOBS.items()
                ],
            }
            (work / "rules.yaml").write_text(
                yaml.safe_dump({"groups": yaml.safe_load(RULES.read_text())["spec"]["groups"]})
            )
            (work / "prometheus.yml").write_text(yaml.safe_dump(config))
            address = f"127.0.0.1:{devstack.free_port()}"
            flags = [f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}"]
            server = subprocess.Popen(
                [prometheus, *flags, f"--web.listen-address={address}", "--log.level=warn"]
            )
            try:
                tls = ClientTls(ca_file=str(running.credentials.tls.ca_file))
                runs = asyncio.run(load(env, running.credentials.admin_key, tls, args.seconds))
                print(f"the demo ran {runs} times in {args.seconds:.0f} s")
                time.sleep(4)  # the last scrapes and rule evaluations
                graphs: dict[str, str] = {}
                for i, expr in enumerate(GRAPHS):
                    graphs |= {f"g{i}.expr": expr, f"g{i}.tab": "0", f"g{i}.range_input": "1m"}
                IMAGES.mkdir(parents=True, exist_ok=True)
                url = f"http://{address}"
                screenshot(
                    browser,
                    f"{url}/graph?{urllib.parse.urlencode(graphs)}",
                    IMAGES / "prometheus-graphs.png",
                    2250,
                )
                # Debian builds the classic web UI only (no React UI), under /classic/.
                screenshot(browser, f"{url}/classic/alerts", IMAGES / "prometheus-alerts.png", 1000)
                with urllib.request.urlopen(f"{url}/api/v1/alerts", timeout=5) as answer:
                    print("alerts firing or pending:", answer.read().decode())
            finally:
                server.terminate()
                server.wait(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
