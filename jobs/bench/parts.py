"""Timed parts of a benchmark plan, each in a fresh process with its share of the time: a part that fails or
overruns leaves an error figure and the plan goes on (the gpu benchmark's parts)."""

import contextlib
import json
import multiprocessing
import os
import sys
import time


def run_parts(parts: list[tuple[str, float, object, tuple]], total_s: float) -> dict:
    """Each part in turn through timed_part, with its weight's share of the time still left (what a part
    leaves unused goes to those after it): its figures prefixed with its name, its budget and seconds."""
    if total_s <= 0 or any(weight <= 0 for _, weight, _, _ in parts):
        raise ValueError(f"run_parts needs total_s > 0 and every weight > 0, got {total_s} and "
                         f"{[weight for _, weight, _, _ in parts]}")
    deadline, figures = time.perf_counter() + total_s, {}
    for index, (name, weight, function, arguments) in enumerate(parts):
        budget = (deadline - time.perf_counter()) * weight / sum(part[1] for part in parts[index:])
        result = {"budget_s": budget, **timed_part(function, arguments, budget)}
        figures.update({f"{name}_{key}": value for key, value in result.items()})
        print(f"gpu: {name} " + json.dumps(result), file=sys.stderr, flush=True)
    return figures


def timed_part(function, arguments: tuple, budget_s: float) -> dict:
    """function(*arguments) in a fresh process (its own CUDA context and compile caches), stopped after
    budget_s: its figures and the seconds taken, or {"error": why, "seconds": ...} when it raised, died or
    overran. A budget of 0 or less starts nothing."""
    if budget_s <= 0:
        return {"error": "not started: no time left", "seconds": 0.0}
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_part_process, args=(sender, function, arguments))
    started = time.perf_counter()
    child.start()
    sender.close()  # the child holds the only sending end: its death is an EOF here
    finished, outcome = receiver.poll(budget_s), None
    if finished:
        with contextlib.suppress(EOFError):
            outcome = receiver.recv()
    seconds = time.perf_counter() - started
    _stop(child, grace_s=10 if finished else 0)
    if outcome is None:
        outcome = {"error": f"its process ended (exit code {child.exitcode}) without a result" if finished
                   else f"overran its budget of {budget_s:.0f} s"}
    return {**outcome, "seconds": seconds}


def _part_process(sender, function, arguments: tuple) -> None:
    """A part's process: its stdout goes to stderr (the benchmark's stdout is one JSON object), its figures
    or its error back through `sender`."""
    os.dup2(2, 1)
    try:
        outcome = function(*arguments)
    except Exception as exc:  # a part's failure is a figure of the plan, not a crash of it
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
    sender.send(outcome)


def _stop(process, grace_s: float) -> None:
    """Wait up to grace_s for a part's process to finish (Ray and the like shut down), then end it."""
    process.join(grace_s)
    if process.is_alive():
        process.terminate()
        process.join(10)
    if process.is_alive():
        process.kill()
        process.join()
