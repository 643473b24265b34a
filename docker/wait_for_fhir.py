"""Wait until a FHIR server answers GET [base]/metadata (the HAPI image has no shell for a health check).

Usage: python wait_for_fhir.py BASE_URL [TIMEOUT_SECONDS]; exits 1 with the last error on timeout.
"""
import sys
import time
import urllib.request


def main() -> int:
    base, timeout = sys.argv[1].rstrip("/"), float(sys.argv[2]) if len(sys.argv) > 2 else 300.0
    deadline, last = time.monotonic() + timeout, "no answer yet"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/metadata", timeout=10) as answer:
                if answer.status == 200:
                    print(f"{base} is up", flush=True)
                    return 0
        except OSError as exc:
            last = str(exc)
        time.sleep(2)
    print(f"{base}/metadata did not answer within {timeout:.0f} s: {last}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
