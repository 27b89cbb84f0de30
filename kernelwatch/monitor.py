"""Watch the depthwise kernels of a model while it trains: snapshots on a schedule, classified
and written to TensorBoard on a background thread. See ``docs/monitor.md``.

>>> import tempfile, torch
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.Conv2d(16, 16, 5, groups=16))
>>> with tempfile.TemporaryDirectory() as log_dir:
...     with KernelWatch(log_dir, every=2) as watch:
...         for epoch in range(4):  # epoch 0: before training
...             _ = watch.on_epoch_end(model, epoch)  # True if it took a snapshot
>>> watch.steps  # every second epoch, and the last one
(0, 2, 3)
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from kernelwatch._dir_lock import LOCK_FILE, DirLock
from kernelwatch.anomalies import Anomaly, AnomalyConfig, AnomalyDetector, AnomalyError, severity_at_least
from kernelwatch.errors import KernelWatchError
from kernelwatch.extraction import (
    DepthwiseKernels,
    is_depthwise,
    is_depthwise_any,
    is_sharded,
    iter_conv_weights,
    unsupported_reason,
)
from kernelwatch.format import SEVERITIES, check_step
from kernelwatch.input_sample import InputSample, PatchSampler, sample_patches
from kernelwatch.snapshot import DetailCadence, SpectrumCache, StemInput, write_snapshot
from kernelwatch.update_lens import UpdateReference
from kernelwatch.writing import EventWriter

logger = logging.getLogger("kernelwatch")

#: Version of :meth:`KernelWatch.state_dict`.
STATE_VERSION = 1
_LOG_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_STOP = object()


def log_schedule(last: int, n: int = 16) -> list[int]:
    """``0``, ``last`` and about ``n`` log-spaced points between: dense early, where patterns
    emerge (appendix G), sparse late.

    >>> log_schedule(100, 8)
    [0, 1, 2, 4, 7, 14, 27, 52, 100]
    >>> log_schedule(3)
    [0, 1, 2, 3]
    """
    if isinstance(last, bool) or not isinstance(last, (int, np.integer)) or last < 0:
        raise KernelWatchError(f"the last epoch of a log schedule must be an integer >= 0, got {last!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise KernelWatchError(f"a log schedule needs n >= 2 points, got {n!r}")
    points = np.round(np.geomspace(1, max(int(last), 1), int(n))).astype(int) if last > 0 else []
    return sorted({0, int(last), *(int(p) for p in points)})


@dataclass
class _Snapshot:
    """Conv weights copied off the device at one step, for the worker."""

    step: int
    weights: dict[str, torch.Tensor]  # bare layer name -> CPU copy of the conv weight
    depthwise: list[str]
    dilation: dict[str, tuple[int, int]]
    unsupported: dict[str, str]
    copied: list[Any] = field(default_factory=list)  # CUDA events marking the end of the copies
    on_device: dict[str, torch.Tensor] = field(default_factory=dict)  # depthwise kernels left on their GPU
    session_start: int | None = None
    stem: str | None = None  # the first-layer lens's conv, and the inputs it saw
    inputs: InputSample | None = None
    done: threading.Event = field(default_factory=threading.Event)  # set once the worker is through with it


class KernelWatch:
    """Snapshot a model's conv kernels on a schedule; classify and write them in the background.

    Schedules (one of): ``every=N`` (steps divisible by N; the default is every call),
    ``schedule=[0, 5, 20]`` (those steps) or ``schedule="log", total_epochs=E``
    (:func:`log_schedule` of ``E`` with ``n_snapshots`` points). The first call and the last
    one (see :meth:`close`) always snapshot; a step never snapshots twice.

    ``accelerator`` (an ``accelerate.Accelerator``) or an initialised ``torch.distributed``
    makes it rank-aware: only the main process copies, classifies and writes. Every rank must
    still make the same calls, because sharded (FSDP) weights are gathered by a collective.

    Anomalies are logged by the worker; ``on_anomaly(anomaly)`` is called and ``raise_on``
    (``"info"``, ``"warning"``, ``"error"`` or None) raises :class:`~kernelwatch.anomalies.AnomalyError`
    on the training thread at the next call (or at :meth:`close`).

    Monitoring never stops the training: a failure on the worker (a full disk) is logged once,
    at ERROR, with what was kept, and the watch stops writing; later calls return False. With
    ``strict=True`` it is raised instead, as a :class:`KernelWatchError` at the next call (the
    watch stops all the same), and a log directory another live watch writes to is an error
    rather than a warning.

    ``first_layer=True`` (the default) also watches the model's stem, its first convolution on
    the input: a forward pre-hook keeps a small sample of the real input patches
    (:class:`~kernelwatch.input_sample.PatchSampler`), and each snapshot writes the stem's
    filters and its first-layer report against them (``docs/monitor.md``).

    The costliest records are written at their own cadence: kernel sprites every
    ``sprite_every``-th snapshot, quality metrics every ``quality_every``-th, and both at each
    layer's first snapshot and (at :meth:`close`) for the last one (see
    :class:`~kernelwatch.snapshot.DetailCadence`). With ``classify_on_device`` (the default) the
    kernels of a model on a GPU are classified there; the worker only draws and writes.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        every: int | None = None,
        *,
        schedule: Iterable[int] | str | None = None,
        total_epochs: int | None = None,
        n_snapshots: int = 16,
        accelerator: Any = None,
        on_anomaly: Callable[[Anomaly], None] | None = None,
        raise_on: str | None = None,
        anomaly_config: AnomalyConfig | None = None,
        max_kernels: int = 64,
        queue_size: int = 2,
        flush_timeout: float = 60.0,
        handle_sigterm: bool = True,
        strict: bool = False,
        first_layer: bool = True,
        sprite_every: int = 10,
        quality_every: int = 20,
        classify_on_device: bool = True,
    ):
        self.log_dir = str(log_dir)
        self.strict = bool(strict)
        self._wanted = _schedule(every, schedule, total_epochs, n_snapshots)
        if raise_on is not None and raise_on not in SEVERITIES:
            raise KernelWatchError(f"raise_on must be None or one of {SEVERITIES}, got {raise_on!r}")
        if queue_size < 1 or max_kernels < 1:
            raise KernelWatchError("queue_size and max_kernels must be >= 1")
        self.on_anomaly, self.raise_on, self.max_kernels = on_anomaly, raise_on, max_kernels
        self.flush_timeout = flush_timeout
        self._cadence = DetailCadence(sprite_every, quality_every)
        self.classify_on_device = bool(classify_on_device)
        self._deferred: list[Callable[[], None]] = []  # the last snapshot's skipped sprites and quality
        self._accelerator = accelerator
        self._is_main = _is_main_process(accelerator)
        # Schedule state: identical on every rank, so that all enter the same collectives.
        self._calls = 0
        self._last_step: int | None = None
        self._steps: list[int] = []
        self._last_model: nn.Module | None = None  # the last call's, if it was skipped
        self._resumed_after: int | None = None
        self._replaying = False  # after load_state_dict, until a call passes the saved last step
        self._session_started = False
        self._closed = False
        self._failed = False  # set on the first failure of the worker; it writes nothing after
        # Worker state; shared with the training thread through the queue and this lock only.
        self._lock = threading.Lock()
        self._pending: list[Anomaly] = []
        self._error: KernelWatchError | None = None  # strict: a failure to raise at the next call
        self._written: int | None = None  # the last step whose snapshot the worker completed
        self._kernel_sizes: dict[str, tuple[int, int]] = {}  # each conv's first kernel size
        self._resized: set[str] = set()  # convs whose kernel size changed
        self._detector = AnomalyDetector(anomaly_config)
        self._spectra = SpectrumCache()
        self._reference = UpdateReference()
        self._warned: set[str] = set()
        self._first_layer = bool(first_layer)  # until the stem is looked for
        self._sampler: PatchSampler | None = None
        self._stem_previous: torch.Tensor | None = None  # the worker's: the stem at the last snapshot
        self._writer: EventWriter | None = None
        self._dir_lock: DirLock | None = None
        self._worker: threading.Thread | None = None
        self._previous_sigterm: Any = None
        self._sigterm_installed = False
        if not self._is_main:
            return
        # A KernelWatchError naming the directory if it cannot be written; a warning (strict:
        # an error) if another live watch writes there.
        try:
            os.makedirs(self.log_dir, exist_ok=True)
            self._dir_lock = DirLock.acquire(self.log_dir, self.strict)
        except OSError as err:
            raise KernelWatchError(f"cannot write TensorBoard events to {self.log_dir!r}: {err}") from err
        try:
            self._writer = EventWriter(self.log_dir)
        except BaseException:
            if self._dir_lock is not None:
                self._dir_lock.release()
            raise
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        torch.get_num_threads()  # fixes this thread's torch thread count before the worker starts
        self._worker = threading.Thread(target=self._work, name="kernelwatch-worker", daemon=True)
        self._worker.start()
        atexit.register(self._at_exit)
        if handle_sigterm and threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._sigterm_installed = True

    # -- the training-side API ------------------------------------------------------------------

    @property
    def steps(self) -> tuple[int, ...]:
        """The steps snapshotted so far (on every rank, written by the main process only)."""
        return tuple(self._steps)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> bool:
        """Call after each epoch (and with ``epoch=0`` before training); snapshots when the
        schedule says so. Returns whether it took a snapshot."""
        return self.snapshot(model, epoch)

    def snapshot(self, model: nn.Module, step: int, force: bool = False) -> bool:
        """Snapshot ``model`` at ``step`` if the schedule (or ``force``) says so and ``step`` is
        later than every earlier call's. Blocks only while the kernels are copied off the
        device, and while the queue is full (``queue_size`` snapshots waiting)."""
        self._check_open()
        self._deliver()
        step = check_step(step)
        if self._last_step is not None and step <= self._last_step:
            self._skip(step)
            return False
        take = force or self._calls == 0 or self._wanted(step)
        self._calls += 1
        self._last_step = step
        self._replaying = False
        self._last_model = None if take else model
        if not take:
            return False
        return self._take(model, step)

    def on_train_end(self, model: nn.Module, step: int) -> None:
        """Snapshot the final weights (unless ``step`` was snapshotted already), then :meth:`close`."""
        self._check_open()
        self._deliver()
        step = check_step(step)
        if self._last_step is None or step > self._last_step:
            self.snapshot(model, step, force=True)
        elif step == self._last_step and self._last_model is not None:
            self._last_model = None
            self._take(model, step)
        elif step < self._last_step:
            self._skip(step)
        self._close(final=False, deliver=True)

    def close(self) -> None:
        """Take the final snapshot if the last call was skipped (of the model it was given),
        write everything queued, and close the event file. Idempotent. Raises what the worker
        or ``raise_on`` left pending."""
        self._close(final=True, deliver=True)

    def flush(self) -> None:
        """Block until every snapshot taken so far is classified and in the event file."""
        self._drain(None)
        self._deliver()

    def __enter__(self) -> KernelWatch:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # After an exception: flush what was taken, but no final snapshot (under FSDP it would
        # need every rank, and the others may not get here) and nothing raised over it.
        self._close(final=exc_type is None, deliver=exc_type is None)

    # -- resume ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The timeline so far (JSON-able), to save with the training checkpoint. Waits until
        the worker has caught up, so that the anomaly history includes every snapshot."""
        self.flush()
        state = {
            "version": STATE_VERSION,
            "calls": self._calls,
            "last_step": self._last_step,
            "steps": list(self._steps),
            "anomalies": self._detector.state_dict(),
        }
        if self._resized:  # the first kernel size of each conv whose size changed
            state["kernel_sizes"] = {name: list(self._kernel_sizes[name]) for name in sorted(self._resized)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the timeline of ``state``: calls up to its last step are skipped, the first
        call is not forced, and records that a crashed run wrote after that step are dropped
        by TensorBoard (a restart marker is written). Call before the first snapshot."""
        if self._calls or self._closed:
            raise KernelWatchError("load_state_dict must be called before the first snapshot")
        version = state.get("version") if isinstance(state, dict) else None
        if not isinstance(version, int) or version > STATE_VERSION:
            raise KernelWatchError(
                f"not a KernelWatch state this kernelwatch reads (version {version!r}; it reads up to {STATE_VERSION})"
            )
        try:
            calls, last_step = int(state["calls"]), state["last_step"]
            steps = [int(s) for s in state["steps"]]
            anomalies = state["anomalies"]
            sizes = {str(name): (int(h), int(w)) for name, (h, w) in (state.get("kernel_sizes") or {}).items()}
            last_step = None if last_step is None else check_step(last_step)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise KernelWatchError(f"not a KernelWatch state: {err!r}") from err
        self._detector.load_state_dict(anomalies)
        self._kernel_sizes.update(sizes)
        self._resized.update(sizes)
        if self._is_main:
            try:
                self._reference = UpdateReference.load(self.log_dir)
            except KernelWatchError as err:
                logger.warning("kernelwatch: %s; the update lens restarts from this run's first snapshot", err)
            # A depthwise layer's first kernel size, also for a size that changes at the resume.
            for name, kernels in self._reference.kernels.items():
                if "@" not in name:
                    self._kernel_sizes.setdefault(name, (int(kernels.shape[-2]), int(kernels.shape[-1])))
        self._calls, self._steps = calls, steps
        self._last_step = last_step
        self._resumed_after = self._last_step
        self._replaying = last_step is not None

    # -- training thread internals --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise KernelWatchError(f"this KernelWatch for {self.log_dir!r} is closed")

    def _skip(self, step: int) -> None:
        """A call whose step is not after the last call's: skipped, and warned once (a step
        counter that restarts each epoch would otherwise silently end the timeline)."""
        if self._replaying and self._resumed_after is not None and step <= self._resumed_after:
            logger.debug("kernelwatch: step %d is before the checkpoint's step %d; skipped", step, self._resumed_after)
        elif "skipped step" in self._warned:
            logger.debug("kernelwatch: step %d is not after step %d; skipped", step, self._last_step)
        else:
            self._warned.add("skipped step")
            logger.warning(
                "kernelwatch: step %d is not after the previous call's step %d, so this call is skipped, and so "
                "is every later call until the step passes %d (warned once). Pass a step that grows over the "
                "whole run, e.g. a global step counter (epoch * batches_per_epoch + batch), not one that "
                "restarts each epoch.",
                step,
                self._last_step,
                self._last_step,
            )

    def _take(self, model: nn.Module, step: int) -> bool:
        """Snapshot ``model`` at ``step``; False (nothing taken) once the watch has stopped."""
        if self._failed:
            # Stopped after a failure: under FSDP the other ranks still gather at this call.
            if is_sharded(model):
                self._copy(model, step)
            return False
        snapshot = self._copy(model, step)
        self._steps.append(step)
        if snapshot is None:  # not the main process
            return True
        if not self._session_started:
            self._session_started = True
            # Marks a (re)start for TensorBoard: it drops what a crashed run wrote after the
            # checkpoint this run resumed from, so no step appears twice.
            snapshot.session_start = step if self._resumed_after is None else self._resumed_after + 1
        # Blocks while queue_size snapshots wait: memory stays bounded, no snapshot is lost.
        self._queue.put(snapshot)
        if _trains_on_every_core(model):
            # The worker would take a core from the training, whose other OpenMP threads then
            # spin at their next barrier: waiting costs the training as much time and half the CPU.
            snapshot.done.wait(self.flush_timeout)
        return True

    def _copy(self, model: nn.Module, step: int) -> _Snapshot | None:
        """Copy every Conv2d weight off the device; gather sharded ones on every rank."""
        if not isinstance(model, nn.Module):
            raise KernelWatchError(f"KernelWatch needs the nn.Module being trained, got {type(model).__name__}")
        sharded = is_sharded(model)
        # Checked on every rank, so that all raise alike.
        if not any(is_depthwise_any(m) for m in model.modules()):
            raise KernelWatchError(
                f"no depthwise convolutions in {type(model).__name__} (nn.Conv2d with groups == "
                "in_channels > 1): nothing for KernelWatch to watch"
            )
        if not sharded and not self._is_main:
            return None  # DDP: every rank holds the same weights; no collective needed
        if not sharded and self._accelerator is not None:
            model = self._accelerator.unwrap_model(model)
        if self._is_main and self._first_layer:
            self._watch_stem(model)
        snapshot = _Snapshot(step, {}, [], {}, {})
        cuda_devices = set()
        with torch.no_grad():
            # Every Conv2d for the quality metrics; 3-D depthwise ones only to be reported.
            for name, module, weight in iter_conv_weights(model, select=_watched):
                if not self._is_main:
                    continue  # other ranks only take part in the gather
                if not isinstance(module, nn.Conv2d):
                    snapshot.unsupported[name] = unsupported_reason(weight)
                    continue
                snapshot.weights[name] = _off_device(weight)
                if self._sampler is not None and module is self._sampler.module:
                    snapshot.stem, snapshot.inputs = name, self._sampler.sample()
                if weight.device.type == "cuda":
                    cuda_devices.add(weight.device)
                if is_depthwise(module):
                    snapshot.depthwise.append(name)
                    if self.classify_on_device and _on_accelerator(weight):
                        snapshot.on_device[name] = weight.detach().to(torch.float32, copy=True).squeeze(1)
                    if any(d > 1 for d in module.dilation):
                        snapshot.dilation[name] = tuple(module.dilation)
        for device in cuda_devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            snapshot.copied.append(event)
        return snapshot if self._is_main else None

    def _watch_stem(self, model: nn.Module) -> None:
        """Hook the sampler onto the model's stem, at the first snapshot (once)."""
        from kernelwatch.first_layer import find_stem, stem_limit_reason

        self._first_layer = False
        try:
            name, stem = find_stem(model)
        except KernelWatchError as err:
            logger.info("kernelwatch: no first-layer lens for this model (%s)", err)
            return
        if is_depthwise(stem):  # as kw.analyze: a depthwise first conv is no stem
            logger.info("kernelwatch: no first-layer lens for this model (its first conv %r is depthwise)", name)
            return
        shape = (stem.out_channels, stem.in_channels // stem.groups, *stem.kernel_size)
        reason = stem_limit_reason(shape, stem.stride)
        if reason is not None:  # the lens is an extra: everything else is still watched
            logger.warning("kernelwatch: no first-layer lens for this model (%s); every other record is written", reason)
            return
        self._sampler = PatchSampler(stem)

    def _deliver(self) -> None:
        """Hand what the worker left on to the training thread: its failure, then anomalies."""
        with self._lock:
            error, self._error = self._error, None
            anomalies, self._pending = self._pending, []
        if error is not None:
            raise error
        for anomaly in anomalies:
            if self.on_anomaly is not None:
                self.on_anomaly(anomaly)
        flagged = [a for a in anomalies if self.raise_on is not None and severity_at_least(a, self.raise_on)]
        if flagged:
            raise AnomalyError(flagged)

    def _close(self, final: bool, deliver: bool) -> None:
        if self._closed:
            return
        try:
            model, self._last_model = self._last_model, None
            if final and model is not None:
                self._take(model, self._last_step)
        finally:
            self._closed = True
            if self._sampler is not None:
                self._sampler.remove()
            self._shutdown()
        if deliver:
            self._deliver()
        elif self._error is not None:  # strict, but nothing left to raise it from
            logger.error("%s", self._error)

    def _shutdown(self) -> None:
        """Stop the worker once it has written everything queued; close the file."""
        if self._worker is None:
            return
        self._queue.put(_STOP)
        self._worker.join(self.flush_timeout)
        if self._worker.is_alive():
            logger.error("kernelwatch: worker still busy after %.0f s; closing without it", self.flush_timeout)
            self._failed = True  # what it still writes fails on the closed file, unreported
        try:
            self._writer.close()
        except KernelWatchError as err:
            self._fail(None, err)
        if self._dir_lock is not None:
            self._dir_lock.release()
        atexit.unregister(self._at_exit)
        # Only the main thread may set handlers; a handler set after ours stays (it chains to us,
        # and ours passes on once closed).
        in_main_thread = threading.current_thread() is threading.main_thread()
        if self._sigterm_installed and in_main_thread and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous_sigterm)

    def _drain(self, timeout: float | None) -> None:
        """Wait until the worker has written every queued snapshot (or ``timeout`` passed)."""
        if self._worker is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        # Polling, not Queue.join(): a signal handler must not wait on a lock the code it
        # interrupted may hold.
        while self._queue.unfinished_tasks and self._worker.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                logger.error("kernelwatch: snapshots not written within %.0f s", timeout)
                return
            time.sleep(0.005)
        self._writer.flush()  # a no-op once closed

    def _at_exit(self) -> None:
        self._close(final=False, deliver=False)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self._closed:
            self._drain(self.flush_timeout)
        previous = self._previous_sigterm
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # the default action (or a handler set outside Python)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    # -- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        _use_one_torch_thread()
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    if not self._failed:
                        self._write_deferred()
                    return
                if not self._failed:
                    self._process(item)
                    self._written = item.step
            except BaseException as err:  # logged once (strict: raised at the next call); it stops the watch
                self._fail(None if item is _STOP else item.step, err)
            finally:
                if item is not _STOP:
                    item.done.set()
                self._queue.task_done()

    def _fail(self, step: int | None, err: BaseException) -> None:
        """Stop the watch after ``err``: log it once at ERROR, or (strict) leave it to be raised
        on the training thread at the next call. The training goes on either way."""
        with self._lock:
            if self._failed:
                return
            self._failed = True
        at = "" if step is None else f" at step {step}"
        kept = (
            f"no snapshot of this run was completed in {self.log_dir!r}"
            if self._written is None
            else f"snapshots up to step {self._written} are in {self.log_dir!r}"
        )
        reason = str(err) if isinstance(err, KernelWatchError) else f"{type(err).__name__}: {err}"
        message = (
            f"kernelwatch's background worker failed{at} ({reason}); {kept}, "
            "and this watch writes nothing more"
        )
        if self.strict:
            error = KernelWatchError(message)
            error.__cause__ = err
            with self._lock:
                self._error = error
            return
        # A full disk or a lost mount needs no traceback; anything else is a bug to report.
        logger.error(
            "%s. The training goes on (strict=True would raise this at the next call).",
            message,
            exc_info=None if _caused_by_os_error(err) else err,
        )

    def _process(self, snapshot: _Snapshot) -> None:
        for event in snapshot.copied:
            event.synchronize()
        self._separate_sizes(snapshot)
        step, writer = snapshot.step, self._writer
        if snapshot.session_start is not None:
            writer.start_session(snapshot.session_start)
        kernels = DepthwiseKernels()
        kernels.unsupported.update(snapshot.unsupported)
        for name in snapshot.depthwise:
            kernels.add(name, snapshot.weights[name])
        self._warn_once(
            "unsupported",
            "%d depthwise layer(s) left out: %s",
            len(kernels.unsupported),
            "; ".join(f"{name or '<root>'}: {why}" for name, why in kernels.unsupported.items()),
            when=bool(kernels.unsupported),
        )
        kernels.dilated.update(snapshot.dilation)
        stem = None
        if snapshot.stem in snapshot.weights:  # not when its kernel size changed (renamed)
            conv = self._sampler.module
            try:
                patches = sample_patches(snapshot.inputs, conv.kernel_size, conv.stride)
            except KernelWatchError as err:  # inputs with NaN: no record, the rest is written
                self._warn_once("first_layer", "no first-layer record (warned once): %s", err, when=True)
            else:
                stem = StemInput(snapshot.stem, tuple(conv.stride), patches, self._stem_previous)
            self._stem_previous = snapshot.weights[snapshot.stem]
        written = write_snapshot(
            writer,
            step,
            kernels,
            snapshot.weights,
            self._spectra,
            self._reference,
            self._detector,
            self.max_kernels,
            stem=stem,
            cadence=self._cadence,
            on_device=snapshot.on_device,
        )
        self._deferred = written.deferred
        if self._reference.changed:
            self._reference.save(self.log_dir)
        self._warn_once(
            "no_spectrum",
            "no spectrum serves the kernels of %s (even sizes have no centre pixel; every odd size >= 3 is "
            "served); these layers are skipped",
            ", ".join(f"{name or '<root>'} ({k}x{k})" for name, k in written.no_spectrum.items()),
            when=bool(written.no_spectrum),
        )
        self._warn_once(
            "first_layer", "no first-layer record (warned once): %s", written.first_layer_error,
            when=written.first_layer_error is not None,
        )
        # One flush per snapshot: a process killed later keeps this snapshot readable.
        writer.flush()
        for anomaly in written.anomalies:
            logger.log(_LOG_LEVELS[anomaly.severity], "kernelwatch step %d: %s", step, anomaly.message)
        with self._lock:
            self._pending.extend(written.anomalies)

    def _write_deferred(self) -> None:
        """Complete the last snapshot: the sprites and quality metrics its cadence skipped."""
        deferred, self._deferred = self._deferred, []
        for write in deferred:
            write()

    def _separate_sizes(self, snapshot: _Snapshot) -> None:
        """Give a conv whose kernel size changed a series of its own, ``<layer>@<h>x<w>``, so
        that no timeline mixes sizes; the layer's first size keeps the bare name."""
        renamed = {}
        for name, weight in snapshot.weights.items():
            size = (int(weight.shape[-2]), int(weight.shape[-1]))
            first = self._kernel_sizes.setdefault(name, size)
            if size == first:
                continue
            renamed[name] = f"{name}@{size[0]}x{size[1]}"
            if name not in self._resized:
                self._resized.add(name)
                logger.warning(
                    "kernelwatch: the kernels of layer %r changed from %dx%d to %dx%d at step %d; each size "
                    "other than the first is written as a layer of its own (%r), so no timeline mixes sizes",
                    name or "<root>",
                    *first,
                    *size,
                    snapshot.step,
                    renamed[name],
                )
        if renamed:
            snapshot.weights = {renamed.get(n, n): w for n, w in snapshot.weights.items()}
            snapshot.depthwise = [renamed.get(n, n) for n in snapshot.depthwise]
            snapshot.dilation = {renamed.get(n, n): d for n, d in snapshot.dilation.items()}
            snapshot.on_device = {renamed.get(n, n): k for n, k in snapshot.on_device.items()}

    def _warn_once(self, key: str, message: str, *args: Any, when: bool) -> None:
        if when and key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)


def _schedule(
    every: int | None, schedule: Iterable[int] | str | None, total_epochs: int | None, n_snapshots: int
) -> Callable[[int], bool]:
    """Whether a step is wanted, by one of the three kinds of schedule."""
    if every is not None and schedule is not None:
        raise KernelWatchError("give either every= or schedule=, not both")
    if schedule is None:
        every = 1 if every is None else every
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise KernelWatchError(f"every must be an integer >= 1, got {every!r}")
        return lambda step: step % every == 0
    if isinstance(schedule, str):
        if schedule != "log":
            raise KernelWatchError(f"schedule must be 'log' or a list of steps, got {schedule!r}")
        if total_epochs is None:
            raise KernelWatchError("schedule='log' needs total_epochs= (the last epoch or step the run reaches)")
        wanted = frozenset(log_schedule(total_epochs, n_snapshots))
    else:
        try:
            wanted = frozenset(check_step(step) for step in schedule)
        except TypeError as err:
            raise KernelWatchError(f"schedule must be 'log' or a list of integer steps, got {schedule!r}") from err
        except KernelWatchError as err:
            raise KernelWatchError(f"schedule={schedule!r}: {err}") from err
    return wanted.__contains__


def _caused_by_os_error(err: BaseException | None) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _watched(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) or is_depthwise_any(module)


def _use_one_torch_thread() -> None:
    """Run this thread's torch ops on one thread, leaving every other thread's count as it was.

    A thread that runs parallel torch ops gets an OpenMP pool of its own, and while pools hold
    more threads than there are cores, libgomp stops spinning in all of them: a CPU training
    with a live worker of full width ran 45 % slower (convnext_atto, 2 threads on 2 cores).
    With OpenMP, torch.set_num_threads sets the calling thread's OpenMP and MKL counts, and also
    the default of threads that start later, which a short-lived thread puts back.
    """
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return  # other backends share one pool: leave it to the user
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    restore = threading.Thread(target=torch.set_num_threads, args=(threads,), name="kernelwatch-threads")
    restore.start()
    restore.join()


def _trains_on_every_core(model: nn.Module) -> bool:
    """Whether ``model`` trains on the CPU with as many torch threads as this process has cores."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu":
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return torch.get_num_threads() >= cores


def _is_main_process(accelerator: Any) -> bool:
    if accelerator is not None:
        return bool(accelerator.is_main_process)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def _on_accelerator(weight: torch.Tensor) -> bool:
    """A plain tensor on a GPU (not sharded, not meta): its kernels can be classified there."""
    return weight.device.type not in ("cpu", "meta") and type(weight) in (torch.Tensor, nn.Parameter)


def _off_device(weight: torch.Tensor) -> torch.Tensor:
    """A CPU copy; from CUDA into pinned memory without waiting (a CUDA event marks the end)."""
    weight = weight.detach()
    if weight.is_meta:
        return weight
    if weight.device.type == "cuda":
        buffer = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True)
        return buffer.copy_(weight, non_blocking=True)
    # A copy even on CPU: training updates the weights in place while the worker reads them.
    # (Not through numpy, though single-threaded copies would spare torch's pool some spinning:
    # a tensor once viewed by numpy can never be resized again, and FSDP resizes its storage.)
    return weight.to("cpu", copy=True)


__all__ = ["LOCK_FILE", "STATE_VERSION", "KernelWatch", "log_schedule"]
