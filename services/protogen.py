"""Generate the Python gRPC stubs from proto/ (`make proto`).

The generated files are committed so that an install needs no protoc; a test compares
them with a fresh generation and fails when they are stale.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) over every .proto into out_dir; return written files."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in out_dir.rglob("*_pb2*") if p.suffix in (".py", ".pyi"))


def stale_files() -> list[str]:
    """Relative paths whose committed stub differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        stale = []
        for path in generate(fresh):
            rel = path.relative_to(fresh)
            committed = PROTO_ROOT / rel
            if not committed.exists() or committed.read_bytes() != path.read_bytes():
                stale.append(str(rel))
        return stale


def main() -> int:
    written = generate(PROTO_ROOT)
    for p in written:
        print(f"wrote {p.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
