"""What every benchmark does with its result: the command that produced it, the table, the JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable


def command_line(target: str, module: str) -> str:
    """How this run was started: `iat bench TARGET ...` or `python -m MODULE ...`."""
    if sys.argv[1:3] == ["bench", target]:
        return f"iat bench {target} " + " ".join(sys.argv[3:])
    return f"python -m {module} " + " ".join(sys.argv[1:])


def emit(result: dict, json_path: Path | str | None, render: Callable[[dict], str]) -> int:
    print(render(result))
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
    return 0
