"""schemathesis against the running services (issue 16): it reads the committed OpenAPI document,
generates requests for every operation of each service (valid ones, and ones that break the
schema), sends them to that service's HTTP port with a key, and checks each answer. Any 5xx, an
answer that breaks the document's schema, status codes or content types, or a route that answers
without a key, fails the test, with schemathesis' report (and a curl line to reproduce) in the
failure message.

The four services are fuzzed at the same time, each for at most RUN_SECONDS: the whole test
stays under the issue's two minutes. When it ends, the session's services are the ones the rest
of the suite uses: schemathesis leaves their clients and requests behind it (a request it gave up
on goes on in its handler), and their stop at the end of the session cancels what is left after
the grace (tests/test_shutdown.py).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from ingest.server import IngestApp
from profile_service.server import ProfileApp
from render.server import RenderApp
from sendtime_common.grpc_server import OPENAPI_DOCUMENT
from triggers.server import TriggersApp

RUN_SECONDS = 30  # per service, side by side: make test stays near 6 min on 2 cores (40 s found nothing more)
CHECKS = (
    "not_a_server_error",
    "response_schema_conformance",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "ignored_auth",
)
# Not the coverage phase: under it, hypothesis describes a strategy by compiling schemathesis'
# source, deep in a recursion, and CPython 3.11.7's compiler stops with "SystemError: AST
# constructor recursion depth mismatch" (a runtime error of the tool, not a finding). Its
# boundary values are in the fuzzing phase's reach too.
PHASES = "examples,fuzzing,stateful"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


async def fuzz(base_url: str, tags: tuple[str, ...], key: str, report_dir: Path) -> tuple[int, str]:
    """One schemathesis run over the operations tagged ``tags``: its exit code and output."""
    report_dir.mkdir(parents=True, exist_ok=True)
    process = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "run",
        str(OPENAPI_DOCUMENT),
        "--url",
        base_url,
        "--header",
        f"Authorization: Bearer {key}",
        *(arg for tag in tags for arg in ("--include-tag", tag)),
        "--checks",
        ",".join(CHECKS),
        "--phases",
        PHASES,
        "--max-time",
        str(RUN_SECONDS),
        "--max-examples",
        "40",
        "--seed",
        "16",
        "--request-timeout",
        "10",
        "--workers",
        "2",
        # A pattern-bound parameter (an int64's digits) makes hypothesis discard many drafts;
        # that is about generating, not about the API, and must not fail a run.
        "--suppress-health-check",
        "filter_too_much",
        "--generation-database",
        "none",  # the same cases every run (with the seed); nothing written to the checkout
        "--no-color",
        "--report-dir",
        str(report_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=report_dir,  # where it keeps its crash cache (.schemathesis/), not the checkout
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout=RUN_SECONDS + 60)
    finally:
        if process.returncode is None:  # timed out or cancelled: never left running against the services
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


async def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_document(
    ingest_app: IngestApp,
    profile_app: ProfileApp,
    render_app: RenderApp,
    triggers_app: TriggersApp,
    admin_key: str,
    tmp_path: Path,
) -> None:
    runs: dict[str, tuple[IngestApp | ProfileApp | RenderApp | TriggersApp, tuple[str, ...]]] = {
        "ingest": (ingest_app, ("IngestService",)),
        "profile": (profile_app, ("ProfileService",)),
        "render": (render_app, ("RenderService", "TemplateService")),
        "triggers": (triggers_app, ("TriggerService", "DestinationService", "DeliveryService")),
    }
    results = await asyncio.gather(
        *(
            fuzz(f"http://127.0.0.1:{app.grpc.http.port}", tags, admin_key, tmp_path / name)
            for name, (app, tags) in runs.items()
            if app.grpc.http is not None
        )
    )
    assert len(results) == len(runs)
    for name, (_, out) in zip(runs, results, strict=True):
        (tmp_path / f"{name}.txt").write_text(out)
    failed = {name: out for name, (code, out) in zip(runs, results, strict=True) if code != 0}
    assert not failed, "\n\n".join(f"=== schemathesis: {name}\n{out[-6000:]}" for name, out in failed.items())
    for out in (out for _, out in results):
        assert "No issues found" in out or "passed" in out, out[-2000:]
