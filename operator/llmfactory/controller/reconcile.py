"""One reconciliation of one resource: plan, wait, reuse, or ensure its Job and report on it.
Called by the kopf handlers on create, update, resume and on a timer; idempotent."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from llmfactory_runtime import EXIT_INVALID_TASK
from llmfactory_runtime.finetune.estimate import Estimate
from llmfactory_runtime.store import finished_result, open_store, read_progress

from ..api import KINDS
from ..planner import PlanError, Promise, Waiting, parse, plan, promised, references
from . import job_builder
from .kube import Kube, NotFound, custom_path
from .settings import OperatorSettings
from .status import situation, succeeded

log = logging.getLogger(__name__)

# Kueue's Workload API, newest first: v1beta2 from Kueue 0.15 on (v1beta1 is no longer served
# from 0.17), v1beta1 before. Both have spec.active.
KUEUE_APIS = ("/apis/kueue.x-k8s.io/v1beta2", "/apis/kueue.x-k8s.io/v1beta1")
# `kubectl annotate finetune NAME llmfactory.dev/retry=$(date +%s) --overwrite`: run a failed run
# again (any new value; status.lastHandledRetry is the last one acted on).
RETRY_ANNOTATION = "llmfactory.dev/retry"

# Container states that mean the pod will not start by itself: shown on the resource.
STUCK_WAITING = {"ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError", "InvalidImageName",
                 "CreateContainerError", "CrashLoopBackOff"}


@dataclass
class Outcome:
    status: dict[str, Any]  # the status patch
    event: tuple[str, str, str] | None = None  # (type, reason, message) when something happened
    job_created: bool = False  # this reconciliation created a Job (a run's first, or a later attempt)


def manifest_of(body: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": body["apiVersion"], "kind": body["kind"],
            "metadata": {"name": body["metadata"]["name"], "namespace": body["metadata"]["namespace"]},
            "spec": body.get("spec") or {}}


def upstream_results(kube: Kube, seen: dict[tuple[str, str], dict] | None = None) -> Callable[[str, str, str], dict | None]:
    """The planner's lookup of a referenced resource's result; `seen` keeps each object it read, by
    (kind, name), for what the reconciliation says of one it waits for."""
    def result_of(kind: str, namespace: str, name: str) -> dict | None:
        obj = kube.get_or_none(custom_path(KINDS[kind].plural, namespace, name))
        if seen is not None:
            seen[(kind, name)] = obj or {}
        status = (obj or {}).get("status") or {}
        if status.get("phase") != "Succeeded" or status.get("observedGeneration") != obj["metadata"].get("generation"):
            return None
        return status.get("result")
    return result_of


def upstream_promises(kube: Kube, seen: dict[tuple[str, str], dict]) -> Callable[[str, str, str], Promise]:
    """The planner's lookup of what a referenced resource that has not succeeded promises, from its
    spec (as result_of read it, in `seen`); nothing for one that does not exist or does not parse (its
    own reconciliation says why)."""
    def promise_of(kind: str, namespace: str, name: str) -> Promise:
        obj = seen.get((kind, name)) or kube.get_or_none(custom_path(KINDS[kind].plural, namespace, name))
        try:
            return promised(parse(manifest_of(obj)), promise_of) if obj else Promise()
        except PlanError:
            return Promise()
    return promise_of


def _waiting(task: Waiting, upstream: dict[str, Any], old: dict[str, Any], generation: int | None,
             extra: dict[str, Any]) -> Outcome:
    """Waiting on a referenced resource (`upstream`, as the planner read it); one that has failed is
    named with its own reason, since nothing moves until someone mends it (a Benchmark whose gates
    failed, a build that crashed)."""
    reason, message, event = "WaitingForDependency", task.reason, ("Normal", "Waiting")
    if upstream:
        status = upstream.get("status") or {}
        stalled = _condition(status, "Stalled")
        current = status.get("observedGeneration") == (upstream.get("metadata") or {}).get("generation")
        if status.get("phase") == "Failed" and stalled.get("status") == "True" and current:  # not one being changed
            reason, event = "DependencyFailed", ("Warning", "DependencyFailed")
            message = f"{message}; it failed ({stalled.get('reason')}): {stalled.get('message')}"
    unchanged = old.get("phase") == "Waiting" and _condition(old, "Reconciling").get("reason") == reason
    return Outcome(situation("Waiting", reason, message, old, generation, **extra),
                   None if unchanged else (*event, message))


def refused(obj: dict[str, Any]) -> bool:
    """Whether the planner refused the object's current spec (InvalidSpec)."""
    status = obj.get("status") or {}
    stalled = _condition(status, "Stalled")
    return (stalled.get("status"), stalled.get("reason")) == ("True", "InvalidSpec") and \
        status.get("observedGeneration") == obj["metadata"].get("generation")


def _condition(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), {})


def reconcile(body: dict[str, Any], kube: Kube, settings: OperatorSettings) -> Outcome:
    outcome = _reconcile(body, kube, settings)
    retry = (body["metadata"].get("annotations") or {}).get(RETRY_ANNOTATION)
    if retry is not None:  # seen, whatever it did: a request made while nothing had failed is not
        outcome.status["lastHandledRetry"] = retry  # carried over to a later failure
    return outcome


def _reconcile(body: dict[str, Any], kube: Kube, settings: OperatorSettings) -> Outcome:
    meta = body["metadata"]
    old = body.get("status") or {}
    generation = meta.get("generation")
    seen: dict[tuple[str, str], dict] = {}  # the referenced resources the planner read
    try:
        res = parse(manifest_of(body))
        task = plan(res, upstream_results(kube, seen), settings.store_uri,
                    lambda namespace, name: kube.get_or_none(f"/api/v1/namespaces/{namespace}/configmaps/{name}"),
                    upstream_promises(kube, seen))
    except PlanError as exc:
        message = f"{exc.field}: {exc.message}"
        return Outcome(situation("Failed", "InvalidSpec", message, old, generation),
                       ("Warning", "InvalidSpec", message))
    estimate = task.estimate if isinstance(task, Waiting) else task.get("estimate")
    extra = {"estimate": Estimate(**estimate).summary()} if estimate else {}
    if isinstance(task, Waiting):
        return _waiting(task, seen.get((task.kind, task.name), {}), old, generation, extra)

    run = open_store(task["artifactUri"])
    ident = {"taskDigest": task["digest"], "artifactUri": task["artifactUri"]}
    result = finished_result(run)
    job_name = job_builder.child_name(meta["name"], task["digest"])
    if result is not None:
        return _finished(body, task, result, run, kube, {**ident, **extra})
    stalled = _condition(old, "Stalled")
    if old.get("phase") == "Failed" and old.get("taskDigest") == task["digest"] and stalled.get("reason") != "InvalidSpec":
        return _failed_run(body, task, kube, stalled, {**ident, **extra})

    progress = read_progress(run) or {}
    restarts_as_a_whole = job_builder.restarts_as_a_whole(body)
    try:
        if restarts_as_a_whole:
            jobs = _jobs_of_run(body, task, kube)
        else:
            created, turn = _ensure(body, job_builder.build(body, task, settings), kube), None
            job = kube.get_or_none(job_builder.jobs_path(meta["namespace"], job_name))
            jobs = [job] if job else []
        in_the_way = _in_the_way(body, jobs)
        if not jobs and not restarts_as_a_whole:  # created, then deleted before it could be read
            in_the_way = _being_deleted("Job", job_name)
        if restarts_as_a_whole and not in_the_way:
            job, created, turn = _attempt(body, task, kube, settings, progress, jobs)
    except ChildInTheWay as exc:
        in_the_way = str(exc)
    if in_the_way:
        event = None if (old.get("conditions") or [{}])[0].get("reason") == "OldJobPresent" else \
            ("Normal", "OldJobPresent", in_the_way)
        return Outcome(situation("Pending", "OldJobPresent", in_the_way, old, generation, **ident, **extra), event)
    if restarts_as_a_whole:
        job_name, attempts = job["metadata"]["name"], job_builder.attempt_of(job)
    else:
        job = jobs[0]
        jstatus = job.get("status") or {}
        # Failed pods, plus the run in progress or done (one, however many pods an Indexed Job has).
        attempts = int(jstatus.get("failed") or 0) + int(bool(jstatus.get("active") or jstatus.get("succeeded")))
    jstatus = job.get("status") or {}
    fields = {**ident, **extra, "jobName": job_name, "attempts": attempts, "progress": _progress(run, progress=progress)}

    failed = _failed(job)
    if turn:  # a multi-node attempt ended; the next one has started, starts once its pods are gone, or cannot
        phase, reason, message = turn
        ended = phase == "Failed" and (old.get("phase") != "Failed" or old.get("taskDigest") != task["digest"])
        return Outcome(situation(phase, reason, message, old, generation, **fields),
                       ("Warning", reason, message) if created or ended else None, job_created=created)
    if failed:
        progress = read_progress(run) or {}  # the pod's last word, written before the Job failed: read after it
        why = progress.get("message") if progress.get("state") == "Failed" else ""
        message = f"Job {job_name} failed ({failed.get('reason', 'Failed')}): {why or failed.get('message', '')}".strip()
        event = None if old.get("phase") == "Failed" and old.get("taskDigest") == task["digest"] else ("Warning", "JobFailed", message)
        return Outcome(situation("Failed", failed.get("reason") or "JobFailed", message, old, generation, **fields), event)
    complete = any(c.get("type") == "Complete" and c.get("status") == "True" for c in jstatus.get("conditions") or [])
    if complete and (result := finished_result(run)) is not None:  # committed since it was read above
        return _finished(body, task, result, run, kube, {**ident, **extra})
    if complete:  # the Job says done but no committed result: never report a partial output as finished
        message = f"Job {job_name} completed without committing a result at {task['artifactUri']}"
        return Outcome(situation("Failed", "NoResult", message, old, generation, **fields), ("Warning", "NoResult", message))

    was_held = (old.get("conditions") or [{}])[0].get("reason") == "Suspended"
    held = _hold(body, job, kube, was_held)
    if held:
        return Outcome(situation("Waiting", "Suspended", held, old, generation, **fields),
                       None if was_held else ("Normal", "Suspended", held), job_created=created)
    reason, message = "Running", progress.get("stage") or f"Job {job_name} started"
    if progress.get("state") == "Interrupted":  # SIGTERM, work saved: the Job's next pod resumes (not counted)
        reason, message = "Interrupted", f"{progress.get('message')}; a new pod resumes from it"
    if job.get("spec", {}).get("suspend"):  # Kueue took the quota back (or has not given it yet)
        reason, message = "Queued", f"Job {job_name} is suspended, waiting for admission (Kueue)"
    problem = _pod_problem(kube, meta["namespace"], job_name)
    if problem:
        reason, message = problem
    event = ("Normal", "JobCreated", f"created Job {job_name} for task {task['digest'][:16]}") if created else None
    if reason == "Interrupted" and (old.get("conditions") or [{}])[0].get("reason") != reason:
        event = ("Warning", reason, message)
    if progress.get("state") == "Failed" and int(jstatus.get("failed") or 0):
        reason, message = "Retrying", f"attempt {jstatus.get('failed')} failed: {progress.get('message')}; the Job retries"
        if old.get("attempts") != attempts:
            event = ("Warning", "Retrying", message)
    if was_held:  # the first look since spec.suspend went false: that, not what the pause did to the pod
        event = ("Normal", "Resumed", f"spec.suspend is false: Job {job_name} runs again")
    if problem and old.get("conditions") and old["conditions"][0].get("reason") != reason:
        event = ("Warning", reason, message)
    return Outcome(situation("Running", reason, message, old, generation, **fields), event, job_created=created)


def _finished(body: dict[str, Any], task: dict[str, Any], result: dict[str, Any], run, kube: Kube,
              fields: dict[str, Any]) -> Outcome:
    """Succeeded (or failed: a Benchmark's gates, a Quantization's validation) on the run's committed result."""
    kind, meta, old = body["kind"], body["metadata"], body.get("status") or {}
    fresh = old.get("taskDigest") != task["digest"] or old.get("phase") != "Succeeded"
    patch = succeeded(kind, result, old, meta.get("generation"), **fields, progress=_progress(run, done=True))
    # Finished by a Job of this very object, or found done in the store (same task digest).
    job_name = job_builder.child_name(meta["name"], task["digest"])
    job = kube.get_or_none(job_builder.jobs_path(meta["namespace"], job_name))
    verb = "finished" if job and _owned(body, job) else "reused a finished result with the same task digest"
    failed = patch["phase"] == "Failed"  # a finished run that counts as failed: why, not the headline
    return Outcome(patch, ("Warning" if failed else "Normal", patch["conditions"][0]["reason"],
                           f"{verb}: {patch['conditions'][0]['message'] if failed else patch.get('headline', '')}")
                   if fresh else None)


def _failed_run(body: dict[str, Any], task: dict[str, Any], kube: Kube, stalled: dict[str, Any],
                fields: dict[str, Any]) -> Outcome:
    """A run that failed stays failed, whatever becomes of its Jobs (the TTL controller deletes them
    after ttlSecondsAfterFinished; a restarted operator must not start the run again). It runs
    again when asked to (a new llmfactory.dev/retry value) or when the spec changed without
    changing the task (resources, scheduling): its Jobs are deleted, and the next reconciliation
    starts a fresh one, which resumes from what the failed one saved (checkpoints, cached answers)."""
    meta, old = body["metadata"], body.get("status") or {}
    retry = (meta.get("annotations") or {}).get(RETRY_ANNOTATION)
    if retry is not None and retry != old.get("lastHandledRetry"):
        why = f"{RETRY_ANNOTATION}={retry}"
    elif old.get("observedGeneration") != meta.get("generation"):
        why = f"the spec changed (generation {meta.get('generation')}) and the task did not"
    else:
        return Outcome(situation("Failed", stalled.get("reason", "Failed"), stalled.get("message", ""), old,
                                 meta.get("generation")))
    deleted = sorted(j["metadata"]["name"] for j in _jobs_of_run(body, task, kube) if _owned(body, j))
    for name in deleted:
        kube.delete(job_builder.jobs_path(meta["namespace"], name), propagation="Background")
    message = (f"{why}: the failed run starts again and resumes from what it saved"
               + (f" (deleted its Job {', '.join(deleted)})" if deleted else ""))
    return Outcome(situation("Pending", "RetryRequested", message, old, meta.get("generation"), **fields),
                   ("Normal", "RetryRequested", message))


def _jobs_of_run(body: dict[str, Any], task: dict[str, Any], kube: Kube) -> list[dict[str, Any]]:
    """The Jobs made for this resource's task: one, or a multi-node FineTune's one per attempt."""
    meta = body["metadata"]
    return kube.list(job_builder.jobs_path(meta["namespace"]), job_builder.labels(body["kind"], meta["name"], task["digest"]))


def _owned(owner: dict[str, Any], child: dict[str, Any]) -> bool:
    return any(o.get("uid") == owner["metadata"].get("uid") for o in child["metadata"].get("ownerReferences") or [])


class ChildInTheWay(Exception):
    """A ConfigMap or Service under the run's name that is not this resource's (see _ensure)."""


def _in_the_way(body: dict[str, Any], children: list[dict[str, Any]], kind: str = "Job") -> str | None:
    """Why the run cannot go on with the children found under its names: one left by a deleted
    resource of the same name (the garbage collector has not removed it yet: adopting a Job would
    report that resource's outcome), or one being deleted (a retry). None when they are this run's own."""
    owner, name = body["kind"], body["metadata"]["name"]
    for child in children:
        if not _owned(body, child):
            return (f"{kind} {child['metadata']['name']} belongs to an earlier {owner} named {name}, since deleted; "
                    "the run starts once Kubernetes has garbage-collected it")
        if child["metadata"].get("deletionTimestamp"):
            return _being_deleted(kind, child["metadata"]["name"])
    return None


def _being_deleted(kind: str, name: str) -> str:
    return f"{kind} {name} is being deleted; the run starts once it is gone"


def _hold(body: dict[str, Any], job: dict[str, Any], kube: Kube, was_held: bool) -> str | None:
    """Apply spec.suspend to the run's unfinished Job; the status message while it holds the run.
    The Job controller stops a suspended Job's pods with SIGTERM (the runtime saves and exits as
    interrupted) and starts new ones when it is resumed. A Job in a Kueue queue is Kueue's to
    suspend (it would admit it again at once): its Workload is deactivated instead."""
    want, meta = bool((body.get("spec") or {}).get("suspend")), job["metadata"]
    name, path = meta["name"], job_builder.jobs_path(meta["namespace"], meta["name"])
    if job_builder.QUEUE_LABEL not in (meta.get("labels") or {}):
        if bool(job["spec"].get("suspend")) != want:
            job["spec"] = kube.patch(path, {"spec": {"suspend": want}})["spec"]
        return (f"spec.suspend is true: Job {name} is suspended and its pods stopped, their work saved; set "
                "spec.suspend to false to resume") if want else None
    if not (want or was_held):
        return None  # nothing to deactivate, nothing to give back: no Workload read
    api, workloads = _workloads_of(kube, job)
    for workload in workloads:
        if workload.get("spec", {}).get("active", True) == want:
            kube.patch(f"{api}/namespaces/{meta['namespace']}/workloads/{workload['metadata']['name']}",
                       {"spec": {"active": not want}})
    if not want:
        return None
    if not workloads:
        return f"spec.suspend is true: waiting for Kueue's Workload of Job {name} to deactivate it"
    return (f"spec.suspend is true: Kueue Workload {workloads[0]['metadata']['name']} of Job {name} is "
            "deactivated (its pods stopped, their work saved, its quota given back); set spec.suspend to false "
            "to queue it again")


def _workloads_of(kube: Kube, job: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """(the Workload API the cluster serves, Kueue's Workloads of a Job: owned by it). None when
    Kueue is not installed."""
    for api in KUEUE_APIS:
        try:
            items = kube.list(f"{api}/namespaces/{job['metadata']['namespace']}/workloads", {})
        except NotFound:
            continue
        return api, [w for w in items if _owned(job, w)]
    return KUEUE_APIS[0], []


def _ensure(body: dict[str, Any], children: list[dict[str, Any]], kube: Kube) -> bool:
    """Create the children that are absent, in order (the Job last); True when this call created the
    Job. A ConfigMap or Service found under its name must be this resource's, else ChildInTheWay: one
    that a deleted resource of the same name left (same name, same task) would be garbage-collected
    under the new Job, whose pods could then never mount their task."""
    created = False
    for child in children:
        path = job_builder.api_path(child)
        if kube.ensure(path, child):
            created |= child["kind"] == "Job"
        elif child["kind"] != "Job":  # the Job's owner is the caller's to check, with its state
            name = child["metadata"]["name"]
            found = kube.get_or_none(f"{path}/{name}")
            why = _in_the_way(body, [found], child["kind"]) if found else _being_deleted(child["kind"], name)
            if why:
                raise ChildInTheWay(why)
    return created


def _failed(job: dict[str, Any]) -> dict[str, Any] | None:
    conditions = (job.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "Failed" and c.get("status") == "True"), None)


def attempt_ending(job: dict[str, Any]) -> str | None:
    """How a multi-node attempt's Job ended: None (it has not), "interrupted" (a pod was preempted
    or stopped at a checkpoint: not counted), "failed" (counted), "final" (a retry cannot help: an
    invalid task, the deadline). The Job controller names the podFailurePolicy rule that failed it."""
    failed = _failed(job)
    if failed is None:
        return None
    if failed.get("reason") == "BackoffLimitExceeded":
        return "failed"
    if failed.get("reason") != "PodFailurePolicy":
        return "final"
    match = re.search(r"rule at index (\d+)", failed.get("message") or "")
    rules = job["spec"]["podFailurePolicy"]["rules"]
    if not match or int(match[1]) >= len(rules):
        return "failed"  # a message this operator cannot read: count it, so retries stay bounded
    codes = (rules[int(match[1])].get("onExitCodes") or {}).get("values") or []
    return "final" if EXIT_INVALID_TASK in codes else "interrupted"


def _attempt(body: dict[str, Any], task: dict[str, Any], kube: Kube, settings: OperatorSettings,
             progress: dict[str, Any], jobs: list[dict[str, Any]]) -> tuple[dict[str, Any], bool, tuple[str, str, str] | None]:
    """(the Job of the current attempt, whether this call created it, (phase, reason, message) when an
    attempt ended and the next one took or takes its place, or cannot) for a multi-node FineTune: a
    Job per attempt. The next attempt starts once no pod of the last one is left, so none of them
    still writes a checkpoint or holds the GPUs; failures and running time are counted on the Jobs,
    so a restarted operator counts the same."""
    meta = body["metadata"]
    latest = max(jobs, key=job_builder.attempt_of, default=None)
    attempt, failures, active, turn = 1, 0, 0, None
    ending = attempt_ending(latest) if latest else None
    if latest and ending in ("interrupted", "failed"):
        attempt = job_builder.attempt_of(latest)
        failures = job_builder.failures_before(latest) + (ending == "failed")
        backoff_limit, deadline = settings.limits(body.get("spec") or {})
        if failures <= backoff_limit:
            why = progress.get("message") if progress.get("state") in ("Failed", "Interrupted") else \
                _failed(latest).get("message") if ending == "interrupted" else \
                f"a pod of Job {latest['metadata']['name']} failed"
            done = "was interrupted" if ending == "interrupted" else "failed"
            reason = "Interrupted" if ending == "interrupted" else "Retrying"
            active = job_builder.active_seconds_before(latest) + _active_seconds(latest)
            if deadline and active >= deadline:
                return latest, False, ("Failed", "DeadlineExceeded", (
                    f"attempt {attempt} {done} ({why}), and the run has used its activeDeadlineSeconds "
                    f"({deadline} s) over {attempt} attempts: no attempt {attempt + 1} is started"))
            lstatus = latest.get("status") or {}
            if lstatus.get("active") or lstatus.get("terminating"):
                return latest, False, ("Running", reason, f"attempt {attempt} {done} ({why}); attempt {attempt + 1} "
                                                          "starts once its pods have stopped")
            attempt += 1
            counted = "not counted as a failure" if ending == "interrupted" else \
                f"{failures} of {backoff_limit} retries used"
            turn = ("Running", reason, f"attempt {attempt - 1} {done} ({why}); attempt {attempt} resumes from the "
                                       f"last checkpoint ({counted})")
    elif latest:  # running, or ended for good: the same Job, as made
        attempt, failures = job_builder.attempt_of(latest), job_builder.failures_before(latest)
        active = job_builder.active_seconds_before(latest)
    created = _ensure(body, job_builder.build(body, task, settings, attempt, failures, active), kube)
    name = job_builder.attempt_name(job_builder.child_name(meta["name"], task["digest"]), attempt)
    # The Job as listed above, the view this decision was made on. Read again, it may have failed
    # meanwhile, and would then pass for the run's end without its failure being counted (that
    # change brings the next reconciliation, which counts it).
    listed = next((j for j in jobs if j["metadata"]["name"] == name), None)
    job = listed if listed and not created else kube.get(job_builder.jobs_path(meta["namespace"], name))
    return job, created, turn if created else None


def _active_seconds(job: dict[str, Any]) -> int:
    """How long a finished attempt's Job ran: from its start (reset, as Kubernetes does, when a
    suspended Job is admitted again) to the condition that failed it."""
    start = (job.get("status") or {}).get("startTime")
    if not start:
        return 0  # never started: it waited suspended in the queue
    end = (_failed(job) or {}).get("lastTransitionTime")
    end_at = datetime.fromisoformat(end) if end else datetime.now(timezone.utc)
    return max(0, int((end_at - datetime.fromisoformat(start)).total_seconds()))


def _progress(run, progress: dict | None = None, done: bool = False) -> dict[str, Any]:
    progress = progress if progress is not None else (read_progress(run) or {})
    out = {"percent": 100.0 if done else progress.get("percent"), "done": progress.get("done"),
           "total": progress.get("total"), "unit": progress.get("unit"), "stage": progress.get("stage"),
           "etaSeconds": 0 if done else progress.get("etaSeconds"), "figure": progress.get("figure")}
    return {k: v for k, v in out.items() if v is not None}


def _pod_problem(kube: Kube, namespace: str, job_name: str) -> tuple[str, str] | None:
    """Why the Job's pod is not progressing, in the pod's own words: unschedulable (no free GPU,
    quota), an image that cannot be pulled, an OOM kill."""
    for pod in kube.list(f"/api/v1/namespaces/{namespace}/pods", {"job-name": job_name}):
        status = pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return cond.get("reason") or "Unschedulable", f"pod {pod['metadata']['name']}: {cond.get('message', '')}"
        for cs in status.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_WAITING:
                return waiting["reason"], f"pod {pod['metadata']['name']}: {waiting.get('message', waiting['reason'])}"
            terminated = (cs.get("lastState") or {}).get("terminated") or (cs.get("state") or {}).get("terminated") or {}
            if terminated.get("reason") == "OOMKilled":
                return "OOMKilled", f"pod {pod['metadata']['name']} ran out of memory; raise spec.resources.memory or lower the batch size"
    return None


def job_owner(job: dict[str, Any]) -> tuple[str, str] | None:
    """(kind, name) of the resource that owns a Job, if it is one of ours."""
    for ref in (job.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") in KINDS:
            return ref["kind"], ref["name"]
    return None


def job_summary(job: dict[str, Any]) -> str:
    """What changed in a Job, as a short stable string (the same state gives the same string)."""
    status = job.get("status") or {}
    done = sorted(c["type"] for c in status.get("conditions") or [] if c.get("status") == "True")
    return (f"Job {job['metadata']['name']}: active={status.get('active', 0)} failed={status.get('failed', 0)} "
            f"succeeded={status.get('succeeded', 0)} {','.join(done)}").strip()


def dependents(kube: Kube, kind: str, namespace: str, name: str,
               where: Callable[[dict[str, Any]], bool] = lambda obj: True) -> list[tuple[str, str]]:
    """(kind, name) of the resources in the namespace that reference this one (and are `where`, as
    listed): those waiting for it, and those that ran on an earlier result of it, for which a new result
    is a new task (a Benchmark of a retrained FineTune). Reconciled on an unchanged task, a finished one
    stays as it is."""
    found = []
    for info in KINDS.values():
        for obj in filter(where, kube.list(custom_path(info.plural, namespace), {})):
            try:
                refs = references(parse(manifest_of(obj)))
            except PlanError:
                continue
            if any(k == kind and n == name for _, k, n in refs):
                found.append((info.kind, obj["metadata"]["name"]))
    return found
