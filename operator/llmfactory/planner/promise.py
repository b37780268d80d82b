"""What a referenced resource that has not succeeded yet will report, as far as its spec decides.

A resource is checked against what it references before it waits for them: a FineTune with objective
dpo on a DatasetBuild that writes conversations is refused when both are applied, not once the build
has run for hours. Only what a spec decides is promised (the format of the rows, the objective, whether
the merged model is kept, the GGUF file's name); a check that reads anything else (what the data
holds) raises Unknown, which ends the checks without a verdict: they are made again with the result.
"""

from __future__ import annotations

from typing import Any, Callable

from .manifests import Key, Resource

PENDING = "pending://"  # a URI or digest only the run decides; a file name after it is promised too


class Unknown(Exception):
    """A check read what only the referenced resource's result will say."""


class Promise(dict):
    """A result's fields that its spec decides: those it will hold, and `absent`, those it will not.
    Reading any other field raises Unknown, as does asking whether the result will hold it."""

    def __init__(self, fields: dict[str, Any] | None = None, absent: set[str] | frozenset = frozenset()):
        super().__init__(fields or {})
        self.absent = frozenset(absent)
        assert not self.absent & self.keys(), "a field both promised and promised absent"

    def __missing__(self, key: str) -> Any:
        raise Unknown(key)

    def __contains__(self, key: object) -> bool:
        if dict.__contains__(self, key):
            return True
        if key in self.absent:
            return False
        raise Unknown(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default


# (kind, namespace, name) -> what its spec promises; Promise() (nothing) for one not known
PromiseLookup = Callable[[str, str, str], Promise]


def trained_format(objective: str, built: bool, read: str | None) -> str | None:
    """The format a FineTune reports its dataset in (datasetFormat, what a Benchmark or Quantization of
    it reads), from its objective and the format it read (None: not known yet)."""
    if objective in ("dpo", "reward") or objective == "kto" and built:
        return "preference"  # a Benchmark or Quantization of it reads the prompts and chosen answers
    if objective == "kto":  # its rows may be unpaired: a Benchmark of it scores labelled answers, not pairs
        return "unpaired"
    if objective == "grpo":  # prompts and references: no answers for a Benchmark or Quantization to read
        return "graded"
    return read


def promised(res: Resource, promise_of: PromiseLookup) -> Promise:
    """What `res` will report once it succeeds, as far as its spec (and what it references) decides."""
    return _PROMISES[res.kind](res, lambda kind, name: promise_of(kind, res.namespace, name))


def promises_among(resources: list[Resource]) -> PromiseLookup:
    """The lookup of what each of `resources` (the manifests of one apply) promises."""
    by_key: dict[Key, Resource] = {res.key: res for res in resources}

    def promise_of(kind: str, namespace: str, name: str) -> Promise:
        res = by_key.get((kind, namespace, name))
        return promised(res, promise_of) if res else Promise()
    return promise_of


def _dataset_build(res: Resource, _promise_of) -> Promise:
    spec = res.spec
    fmt = spec.written_format()
    # Only a graded build with difficulty samples pass rates, and reports what its sampling asked.
    measured = fmt == "graded" and spec.difficulty is not None
    return Promise({"uri": PENDING, "digest": PENDING, "format": fmt, **({"difficultyUsage": {}} if measured else {})},
                   set() if measured else {"difficultyUsage"})


def _fine_tune(res: Resource, promise_of) -> Promise:
    spec, absent = res.spec, set()
    built = spec.dataset.dataset_build_ref
    fields: dict[str, Any] = {
        "objective": spec.objective, "digest": PENDING, "datasetUri": PENDING, "datasetDigest": PENDING,
        # A source is passed on as it is; a FineTune's model by the URI only its result knows.
        "baseModel": {"uri": PENDING} if spec.base_model.fine_tune_ref else spec.base_model.as_source()}
    if spec.base_model.fine_tune_ref:  # the FineTune whose model it trains from: a chain's shape is its first base's
        fields["baseFineTune"] = spec.base_model.fine_tune_ref.name
    else:
        absent.add("baseFineTune")
    for key, kept in (("modelUri", spec.method == "full" or spec.merge_adapter), ("adapterUri", spec.method != "full")):
        if kept:
            fields[key] = PENDING
        else:
            absent.add(key)
    try:
        read = promise_of("DatasetBuild", built.name)["format"] if built else "chatml"
    except Unknown:
        read = None
    fmt = trained_format(spec.objective, built is not None, read)
    if fmt is not None:
        fields["datasetFormat"] = fmt
    # Which fields of its prompts hold references a GRPO run finds in them. Promised absent, as in an
    # earlier release's result: what is checked against them is checked once the result is there.
    absent.add("datasetReferenceFields")
    return Promise(fields, absent)


def _quantization(res: Resource, promise_of) -> Promise:
    spec = res.spec
    # The first type's file (run.py names it so), or a compressed-tensors folder.
    first = f"{PENDING}{res.name}-{spec.types[0]}.gguf" if spec.format == "gguf" else PENDING
    fields: dict[str, Any] = {"artifacts": [{"uri": first, "sha256": PENDING}]}
    dataset = ("datasetUri", "datasetFormat", "datasetDigest", "datasetReferenceFields")
    if not spec.model.fine_tune_ref:  # it passes on the dataset of the FineTune it quantized, if any
        return Promise(fields, set(dataset))
    trained = promise_of("FineTune", spec.model.fine_tune_ref.name)
    passed_on = {key: trained[key] for key in trained.keys() & set(dataset)}  # keys(): only those it holds
    return Promise({**fields, **passed_on}, set(dataset) & trained.absent)


_PROMISES = {
    "DatasetBuild": _dataset_build,
    "FineTune": _fine_tune,
    "Quantization": _quantization,
    "Benchmark": lambda res, promise_of: Promise(),  # what reads it (benchmarkRef) waits for its gates alone
}
