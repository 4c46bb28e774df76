"""``checkpoint_and_exit``: the last checkpoint after a preemption signal, then the exit.

At a step boundary after the signal: (several ranks: agree on the step first, see
aiockpt.distributed.agreement) let earlier checkpoints finish, capture this step unless it
is saved already, persist it to the fastest tier that can make it durable within what is
left of the grace period, log what was saved and how long it took, and raise SystemExit
with the conventional status 128 + the signal's number, so that ``finally`` blocks and
``close()`` run. When no tier can finish in time, nothing is started, so nothing older is
touched (retention runs only after a commit), and the exit is the same.

Called without a signal, there is no SIGKILL to beat: the step is saved and the status is
0. Several ranks without ``preemption_signals`` then call it at the same step, as they
call ``checkpoint()``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .._util.bridge import Bridge
from .._util.units import human_bytes
from ..distributed.agreement import BUSY_PERIOD_S, Verdict
from ..errors import CheckpointError, UsageError
from .core import Core
from .deadline import fastest_fitting
from .failures import FailureLog
from .saver import Saver
from .tiers import checkpoint_tiers

__all__ = ["checkpoint_and_exit"]

logger = logging.getLogger(__name__)


async def checkpoint_and_exit(core: Core, step: int, bridge: Bridge) -> None:
    """Save ``step`` within the grace period and exit; return only to let a rank train on
    to the step the ranks agreed on."""
    core.saver.check_step(step)
    preemption = core.preemption
    agreement = preemption.agreement
    if agreement is not None:
        if preemption.signal is None:
            raise UsageError(
                "checkpoint_and_exit() under torch.distributed agrees on the step with the "
                "other ranks once a preemption signal has reached one of them: call it at "
                "every step boundary while ckpt.preempted is set (and set "
                "preemption_signals), or checkpoint() the same step on every rank"
            )
        while True:
            verdict = preemption.reached(step)
            if verdict is Verdict.STOP:
                break
            if not agreement.watching and agreement.agreed.stop_step is None:
                raise CheckpointError(
                    "the ranks can no longer agree on a step to save after "
                    f"{preemption.signal.name}: {agreement.error or 'a rank closed'}; "
                    "nothing was saved for it"
                ) from agreement.error
            if verdict is Verdict.CONTINUE:
                return
            await bridge(asyncio.sleep(BUSY_PERIOD_S))
    preemption.answered = True
    began = time.monotonic()
    signum = preemption.signal
    status = 128 + signum if signum is not None else 0
    what = f"{signum.name} at step {step}" if signum is not None else f"exit at step {step}"
    # Checkpoints in flight commit (or fail) first: one of them may be this step, and the
    # time they take is no longer there for this one.
    await bridge(core.pipeline.drain())
    saved = _saved_already(core.failures, step)
    seconds_left = preemption.seconds_left()
    nbytes = _state_bytes(core.saver)
    choice, estimates = fastest_fitting(preemption.tiers, nbytes, seconds_left)
    # Without a signal no SIGKILL is on its way: there is no deadline to miss.
    fits = saved or choice is not None or signum is None
    if agreement is not None:
        fits = agreement.all_fit(fits)  # one rank's checkpoint is no checkpoint
    if not fits:
        whose = "this rank's" if choice is None else "another rank's"
        logger.error(
            "%s: no tier can make %s checkpoint (%s) durable in the %.2f s left of "
            "preemption_grace_s = %g (estimates: %s); nothing is saved, and the newest "
            "committed checkpoint stays the newest. Exiting with status %d",
            what,
            whose if agreement is not None else "the",
            human_bytes(nbytes),
            max(seconds_left, 0.0),
            preemption.grace_s,
            ", ".join(f"{e.tier.name} {e.seconds:.2f} s" for e in estimates),
            status,
        )
        raise SystemExit(status)
    if not saved:
        # block: waiting for an in-flight place is part of the save, never a skip.
        # Through the tiers when there are any, so that their retention and copies stay
        # consistent, and to the primary whatever its interval: a preemption may take the
        # machine, and the memory tier with it.
        await checkpoint_tiers(core.tiers, core.saver, step, True, bridge, to_primary=True)
        await bridge(core.pipeline.drain())
        if core.tiers is not None:
            await bridge(core.tiers.drain())
        core.failures.raise_failures()  # on_error = "raise": the failure, chained
        if not _saved_already(core.failures, step):  # on_error = "warn": logged already
            logger.error(
                "%s: the checkpoint failed (see the warning above); nothing new is saved. "
                "Exiting with status %d",
                what,
                status,
            )
            raise SystemExit(status)
    took = time.monotonic() - began
    where = preemption.tiers[0].location if choice is None else choice.tier.location
    logger.warning(
        "%s: %s step %d in %s (%s) in %.2f s; %.2f s of preemption_grace_s = %g left. "
        "Exiting with status %d",
        what,
        "step saved already:" if saved else "saved",
        step,
        where,
        human_bytes(nbytes),
        took,
        preemption.seconds_left(),
        preemption.grace_s,
        status,
    )
    raise SystemExit(status)


def _saved_already(failures: FailureLog, step: int) -> bool:
    """Whether this checkpointer's newest checkpoint is ``step`` and it committed."""
    last = failures.last_started
    if last is None or last[0] != step:
        return False
    future = last[1]
    return (
        future.done()
        and not future.cancelled()
        and future.exception() is None
        and future.result() is not None
    )


def _state_bytes(saver: Saver) -> int:
    """Bytes of tensor state this process would write for a checkpoint now."""
    if saver.capturer is not None:
        return saver.capturer.layout.nbytes
    flat, _ = saver.share(saver.flatten())
    return sum(tensor.numel() * tensor.element_size() for tensor in flat.tensors)
