"""Fail the install when pip quietly resolved something we do not want (it has happened:
kubernetes>=37 next to botocore makes pip pick boto3 0.0.3; an unpinned torch is CUDA)."""

import sys
from importlib.metadata import version

from packaging.version import Version

checks = {
    "torch": lambda v: v.startswith("2.13.0"),
    "boto3": lambda v: Version(v) >= Version("1.35"),
    "kubernetes": lambda v: Version(v) < Version("37"),
    "transformers": lambda v: Version(v).major == 5,
    "deepspeed": lambda v: v == "0.19.8",
    "bitsandbytes": lambda v: v == "0.50.2",
    "llmcompressor": lambda v: v == "0.14.0.1",
}
bad = [f"{name} {version(name)}" for name, ok in checks.items() if not ok(version(name))]
if bad:
    sys.exit(f"unexpected package versions installed: {', '.join(bad)}")
print("install check: " + ", ".join(f"{n} {version(n)}" for n in checks))
