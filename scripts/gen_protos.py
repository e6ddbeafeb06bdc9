"""Generate Python code (messages, gRPC stubs, mypy stubs) from protos/ into gen/python/.

Run through `make gen`. The output is committed so that readers and grpcurl users never need
the generator; `make gen-check` fails when it is stale.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
THIRD_PARTY = ROOT / "third_party" / "googleapis"
OUT = ROOT / "gen" / "python"


def generate(out: Path) -> int:
    """Generate into ``out`` (emptied first); returns protoc's exit code."""
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    bin_dir = Path(sys.executable).parent  # mypy-protobuf's plugins sit beside this interpreter
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{THIRD_PARTY}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    code = protoc.main(args)
    if code != 0:
        return int(code)
    # Regular packages (not namespace packages) so that tools and imports see one tree.
    for directory in [out / "sendtime", *(p for p in (out / "sendtime").rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    (out / "sendtime" / "py.typed").touch()
    return 0


if __name__ == "__main__":
    sys.exit(generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
