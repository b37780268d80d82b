"""A grader written in Python, as OpenAI's python grader: the spec's source defines
grade(sample, item) -> float, called with sample {"output_text": the answer, "output_tools": the tool
calls it makes, as OpenAI's tool calls, "output_reasoning": the reasoning a reasoning model wrote before
it, "" where none} and item the dataset row.

The source runs in a child process of its own (`python -m llmfactory_runtime.python_grader`), one per
training process and source, for three reasons: its state and random draws stay out of training's (a
resumed run's random state is the checkpoint's, and a grader drawing from it would change what is
sampled next); its prints go to the log rather than into the channel its scores come back on; and a
call that runs past TIME_LIMIT_S is stopped by an alarm in that process without touching training.
Importing this module imports nothing heavy: the child starts in a fraction of a second.

The child's environment is the Job's without its credentials (CREDENTIAL_ENV), and the AWS SDKs are
pointed away from the credential files of the home folder: a grader that runs the code a model
wrote must not find the store's keys at hand. It is not a sandbox: files and the network the Job
reaches, it reaches (the spec's description says so).
"""

from __future__ import annotations

import atexit
import json
import math
import numbers
import os
import signal
import subprocess
import sys
import traceback
from typing import Any

from . import CREDENTIAL_ENV
from .task import InvalidTask
from .tool_calls import openai_calls

# Seconds one grade() call (and the source's top-level code) may run: a hung grader stops the run
# with an error, not forever.
TIME_LIMIT_S = 60.0

_running: dict[str, PythonGrader] = {}


class PythonGrader:
    """The child process that runs one source; `field` names it in the spec, for errors."""

    def __init__(self, source: str, field: str):
        self.field = field
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, repr(TIME_LIMIT_S)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, encoding="utf-8", env=_environment())
        reply = self._ask({"source": source})
        if "error" in reply:
            self.close()
            raise InvalidTask(f"{field}.source: {reply['error']}")

    def grade(self, answers: list[tuple[str, str]], items: list[dict[str, Any]]) -> list[float]:
        """The scores of answers (reasoning, what it says) with their rows."""
        reply = self._ask({"samples": [{"output_text": a, "output_tools": openai_calls(a), "output_reasoning": r}
                                       for r, a in answers], "items": items})
        if "error" in reply:
            raise InvalidTask(f"{self.field}.source: grade() failed on the answer "
                              f"{answers[reply['index']][1][:300]!r}: {reply['error']}")
        return reply["scores"]

    def _ask(self, request: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request, ensure_ascii=False) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, ValueError):  # it had ended before this request (ValueError: input closed)
            line = ""
        if not line:  # killed (out of memory), or the source ended its process with os._exit
            raise RuntimeError(f"{self.field}.source: the grader's process ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the child's loop ends at end of input
        except BrokenPipeError:  # it had ended already, with a request unread
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _environment() -> dict[str, str]:
    """This process's environment without credentials; the AWS SDKs' credential and config files
    pointed at nothing (so a profile in ~/.aws is not found either)."""
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV}
    return env | {"AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull}


def grade(source: str, answers: list[tuple[str, str]], items: list[dict[str, Any]], field: str) -> list[float]:
    """grade(sample, item) of each answer (its reasoning, what it says) with its row, by the source's process
    (started once per source)."""
    if source not in _running:
        _running[source] = PythonGrader(source, field)
    return _running[source].grade(answers, items)


@atexit.register
def _close_all() -> None:
    for grader in _running.values():
        grader.close()
    _running.clear()


def _failure(e: BaseException) -> str:
    """The exception with its traceback from the source's frames on (this module's left out)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(e), e, tb)).strip()


def _finite(value: Any) -> float | None:
    """A returned number (Python's or NumPy's, bool included) as a float, None if it is none or not finite."""
    try:
        number = float(value) if isinstance(value, numbers.Real) else math.nan
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _serve(limit: float) -> None:
    """The child: read the source, then answer each {samples, items} line with {scores} or {error, index}."""
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # the source's prints (Python's and C's) go to the log, not into the channel
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    def on_alarm(*_) -> None:
        raise TimeoutError(f"ran past the time limit of {limit:g} s")

    signal.signal(signal.SIGALRM, on_alarm)
    # A SIGTERM or Ctrl-C sent to the whole process group (a local run, a launcher) is training's to
    # handle: it checkpoints, then exits, which closes this process's input and so ends it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def limited(call, *args):
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            return call(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    namespace: dict[str, Any] = {"__name__": "grader"}
    try:
        limited(exec, compile(json.loads(sys.stdin.readline())["source"], "<grader source>", "exec"), namespace)
        if not callable(namespace.get("grade")):
            raise NameError("the source defines no function grade(sample, item)")
    except BaseException as e:  # noqa: BLE001 - SystemExit too: the source's fault, reported
        reply({"error": _failure(e)})
        return
    reply({"ok": True})
    for line in sys.stdin:
        request = json.loads(line)
        scores: list[float] = []
        for i, (sample, item) in enumerate(zip(request["samples"], request["items"])):
            try:
                value = limited(namespace["grade"], sample, item)
            except BaseException as e:  # noqa: BLE001
                reply({"error": _failure(e), "index": i})
                break
            number = _finite(value)
            if number is not None:
                scores.append(number)
            else:
                reply({"error": f"it returned {value!r}, not a finite number", "index": i})
                break
        else:
            reply({"scores": scores})


if __name__ == "__main__":
    _serve(float(sys.argv[1]))
