"""Fuzz `byollm serve` from its own OpenAPI schema with schemathesis: no request may get a 5xx.

Starts `byollm serve` on a random llama-tiny model with chat tokens and an API key (so the fuzzer gets past
authentication and reaches generation), then runs

    schemathesis run URL/openapi.json --checks not_a_server_error -H 'Authorization: Bearer KEY' ...

over every operation, with positive and negative (schema-violating) inputs. Any 5xx, or a connection dropped
without an answer, fails the run (exit code != 0). Extra arguments go to schemathesis, e.g. `--checks all` to
also see conformance findings, or `--url http://HOST:PORT` (ours) to fuzz a running server.

    .venv/bin/python benchmarks/fuzz_server.py                         # ~1-3 minutes on 2 cores
    .venv/bin/python benchmarks/fuzz_server.py --max-examples 500      # longer
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import make_checkpoint, running_server  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="fuzz this running server instead of starting one")
    ap.add_argument("--api-key", default=None, help="with --url: its key (default: env BYOLLM_API_KEY)")
    ap.add_argument("--max-examples", type=int, default=200, help="test cases per operation and phase")
    ap.add_argument("--seed", type=int, default=0)
    args, extra = ap.parse_known_args()

    key = args.api_key or os.environ.get("BYOLLM_API_KEY") if args.url else "sk-fuzz-" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory() as tmp:
        # small replies (default_max_tokens) keep each case fast; rate limits off so the fuzzer is not throttled
        server = nullcontext(args.url) if args.url else running_server(
            make_checkpoint("llama-tiny", Path(tmp), block_size=128), ["--default_max_tokens", "8"],
            Path(tmp) / "server.log", env={"BYOLLM_API_KEYS": key})
        with server as url:
            cmd = ["schemathesis", "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
                   "--max-examples", str(args.max_examples), "--seed", str(args.seed), "--workers", "1",
                   "--request-timeout", "60", "--no-color", "--suppress-health-check", "all",
                   *(["-H", f"Authorization: Bearer {key}"] if key else []), *extra]
            printable = [c.replace(key, "***") if key else c for c in cmd]
            print("$ " + " ".join(printable), flush=True)
            rc = subprocess.call([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]])
            if not args.url:
                log = (Path(tmp) / "server.log").read_text()
                print(f"server log: {log.count('Traceback')} tracebacks, "
                      f"{'the API key appears' if key in log else 'no API key'} in it")
    print(f"schemathesis exit code {rc} ({'no 5xx' if rc == 0 else 'FAILURES: see above'})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
