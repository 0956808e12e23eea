"""Agreement between the processes of an ``accelerate launch`` run.

A step that one process takes for all (lock a folder, open a corpus, write a manifest) or that
each takes for its own share (draw shards, sample images) can fail on one process only. If that
process simply raised, the others would wait for it at their next collective call forever (NCCL)
or die with a transport error (gloo). Here every such step ends in a collective that carries the
outcome, so every process returns the same result or raises the same error, at the same point.

With no accelerator, or a single process, the helpers just call the function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .io import PPAPError

T = TypeVar("T")

_Outcome = tuple[bool, Any, bool, str]  # (ok, result, is_ppap_error, message)


def _distributed(accelerator) -> bool:
    return accelerator is not None and accelerator.num_processes > 1


def _run(fn: Callable[[], T]) -> tuple[_Outcome, BaseException | None]:
    """``fn()``'s outcome as picklable values, and the exception it raised (kept on this process,
    so that it re-raises with its own traceback)."""
    try:
        return (True, fn(), False, ""), None
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        return (False, None, isinstance(e, PPAPError), first if isinstance(e, PPAPError) else f"{type(e).__name__}: {first}"), e


def _raise(outcome: _Outcome, own: BaseException | None, rank: int) -> None:
    """Raise the failure ``outcome`` describes: the exception itself on the process that raised
    it, the same one-line message elsewhere (a PPAPError for bad input, else a RuntimeError)."""
    if own is not None:
        raise own
    _, _, is_ppap, message = outcome
    if is_ppap:
        raise PPAPError(message)
    raise RuntimeError(f"{message} (on process {rank})")


def main_decides(accelerator, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only; every process returns its result, or raises its error
    (``fn``'s result must be picklable). The broadcast also syncs the processes, as a barrier."""
    if not _distributed(accelerator):
        return fn()
    from accelerate.utils import broadcast_object_list

    outcome, own = _run(fn) if accelerator.is_main_process else ((True, None, False, ""), None)
    box: list[Any] = [outcome]
    broadcast_object_list(box, from_process=0)
    if not box[0][0]:
        _raise(box[0], own, 0)
    return box[0][1]


def every_rank(accelerator, fn: Callable[[], T]) -> list[T]:
    """Run ``fn`` on every process; every process returns the list of all processes' results in
    rank order, or, if any raised, every process raises the error of the lowest such rank."""
    if not _distributed(accelerator):
        return [fn()]
    from accelerate.utils import gather_object

    outcome, own = _run(fn)
    outcomes = gather_object([outcome])
    for rank, out in enumerate(outcomes):
        if not out[0]:
            _raise(out, own if rank == accelerator.process_index else None, rank)
    return [out[1] for out in outcomes]


def leave_process_group() -> None:
    """End this process's membership of the process group that ``accelerate launch`` made, if any:
    a process that exits without it can abort at exit (torch's communication threads are still
    alive when the interpreter shuts down), after its work is done."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
