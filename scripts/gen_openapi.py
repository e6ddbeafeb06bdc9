"""Generate openapi/sendtime.openapi.json, the OpenAPI 3.1 document of the contracts' HTTP
routes (sendtime_common.openapi), from protos/ and the generated code in gen/python.

Run through `make gen` (after gen_protos.py); the output is committed and `make gen-check`
fails when it is stale. The descriptions are the contracts' comments: protoc compiles protos/
once more with source info, which the generated code leaves out.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc_tools
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from gen_protos import PROTOS, ROOT, THIRD_PARTY
from sendtime_common.openapi import build_document, comments_of

OUT = ROOT / "openapi" / "sendtime.openapi.json"
TITLE = "Sendtime HTTP API"
API_VERSION = "v1"
DESCRIPTION = """\
The HTTP/JSON routes of Sendtime's gRPC services (google.api.http bindings, AIP-127), generated
from the protobuf contracts. Each service serves its own routes on its HTTP port (the tags name
the service); bodies are protobuf's canonical JSON, errors google.rpc.Status."""
SERVERS = ({"url": "/", "description": "The service's own HTTP port (the tag names the service)."},)


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """protos/ compiled with source info (comments).

    Raises:
        RuntimeError: protoc failed (its messages are on stderr).
    """
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.binpb"
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTOS}",
                f"-I{THIRD_PARTY}",
                f"-I{well_known}",
                "--include_source_info",
                "--include_imports",
                f"--descriptor_set_out={out}",
                *sources,
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed with {code}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def document() -> dict[str, Any]:
    """The document, for every service of the contracts (those without routes are left out)."""
    files = descriptor_set()
    services: list[str] = []
    for file in files.file:
        if not file.name.startswith("sendtime/"):
            continue  # an import (googleapis, well-known types): its comments only
        # The generated module registers the file's descriptors in the default pool.
        importlib.import_module(file.name.removesuffix(".proto").replace("/", ".") + "_pb2")
        services += [f"{file.package}.{service.name}" for service in file.service]
    return build_document(
        services,
        title=TITLE,
        version=API_VERSION,
        servers=SERVERS,
        description=DESCRIPTION,
        comments=comments_of(files),
    )


def render() -> str:
    """The document as committed: sorted keys, indent 2, a trailing newline."""
    return json.dumps(document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
