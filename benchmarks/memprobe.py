"""Child process for CPU memory probes (see `benchmarks.memory.ProbeWorker`).

Reads one request per line on stdin, ``{"cap_bytes": int | null, "case": CaseSpec}``,
probes the case and answers with one JSON `ProbeResult` line, until stdin closes.
"""
from __future__ import annotations

import json
import sys


def main() -> None:
    from .cases import CaseSpec
    from .memory import probe

    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        result = probe(CaseSpec(**request["case"]), cap_bytes=request["cap_bytes"])
        print(json.dumps(result.to_dict()), flush=True)


if __name__ == "__main__":
    main()
