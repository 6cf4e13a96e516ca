"""Tuning with TVM's MetaSchedule: ``bncompile tune`` and ``compile(..., db=DIR)``.

The tasks are the PrimFuncs of the module :func:`bncompile.lower.driver.compile` builds, taken after our
preparation, legalization and fusion (:func:`bncompile.lower.graph_schedules.pipeline` with
``until_schedule=True``), so a tuned function is exactly the one compile looks up; bncompile's own
batch-norm kernels are never tasks, and by default neither are functions without a reduction (element-wise
and layout functions are memory-bound: the hand rules are as good). Each task is the function normalized
the way MetaSchedule normalizes a workload (``global_symbol="main"``, ``tirx.noalias``), its key in the
database is its structural hash.

The database is MetaSchedule's ``JSONDatabase``: ``DIR/database_workload.json`` and
``DIR/database_tuning_record.json``, one JSON record a line, appended as each batch of candidates is
measured, so an interrupted run (Ctrl-C, the time budget) leaves a valid database with everything measured
so far, and a second run adds to it. Before searching, the hand schedule of every task
(:func:`bncompile.lower.graph_schedules.rules`) is measured the same way and committed as a record, so the
database's best is never a schedule slower than the hand one (as measured); a task whose best record is the
hand schedule compiles with the hand rule.

Measuring: locally (``LocalRunner``), or on a remote board through TVM's RPC tracker
(``rpc_tracker="host:port"``, ``rpc_key``; ``RPCRunner``), candidates built here (for an ``aarch64``
target with ``aarch64-linux-gnu-g++``). The cost model is XGBoost's when ``xgboost`` is installed,
otherwise random (``cost_model=``).

Applying (:class:`TunedSchedules`): for each function of the compiled module, the best record of its
workload for the same target (kind, triple, CPU) is replayed on it; functions without one keep the hand
rules. ``CompiledModel.info["tuned"]`` lists the functions that took a tuned schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from bncompile.errors import InputError, UnsupportedError
from bncompile.lower import tvm as _tvm

log = logging.getLogger(__name__)

#: MetaSchedule's JSONDatabase files in a database folder
DB_FILES = ("database_workload.json", "database_tuning_record.json")
#: MetaSchedule's own logger (quiet unless -v: the CLI silences ``tvm.*`` loggers)
_MS_LOGGER = "tvm.s_tir.meta_schedule.bncompile"

__all__ = ["Task", "TuneResult", "TunedSchedules", "extract_tasks", "tune", "DB_FILES", "parse_tracker"]


def _ms():
    return _tvm.submodule("tvm.s_tir.meta_schedule")


# --------------------------------------------------------------------------- tasks

@dataclasses.dataclass
class Task:
    """One tuning task: a fused PrimFunc of the model (``mod``: normalized, function ``main``), the name
    of its first function in the compiled module, how many times the model calls it, its FLOP estimate."""

    name: str
    mod: Any
    weight: int
    flops: float


def normalize(func):
    """The workload of a PrimFunc, as MetaSchedule keys it: ``IRModule({"main": func})`` with
    ``global_symbol="main"`` and ``tirx.noalias``."""
    tvm = _tvm.tvm()
    func = func.with_attr("global_symbol", "main").with_attr("tirx.noalias", True)
    return tvm.IRModule({"main": func})


def _has_reduction(func) -> bool:
    from bncompile.lower.graph_schedules import _all_blocks, _iter_kinds, _schedule_of

    sch = _schedule_of(func)
    return any("R" in _iter_kinds(sch, blk) for blk in _all_blocks(sch))


def _static_args(mod) -> bool:
    """Every buffer of the function has a static shape (MetaSchedule allocates its arguments to measure)."""
    try:
        _ms().arg_info.ArgInfo.from_entry_func(mod, remove_preproc=True)
        return True
    except Exception:  # noqa: BLE001 - "Cannot convert ... ir.Var to IntImm": a symbolic dim
        return False


def _structural_equal(a, b) -> bool:
    return bool(_tvm.submodule("tvm_ffi").structural_equal(a, b))


def _flops(mod) -> float:
    try:
        return float(_tvm.submodule("tvm.s_tir.analysis").estimate_tir_flops(mod))
    except Exception:  # noqa: BLE001 - symbolic shapes: unknown
        return 0.0


def fused_module(model, *, target: Any = "llvm", input_shapes: Mapping | None = None, fold: bool = True):
    """``(fused Relax module before scheduling, target dict)``: what compile builds, up to the schedules."""
    from bncompile.lower import graph_schedules
    from bncompile.lower.driver import relax_module
    from bncompile.lower.targets import resolve_target

    name, tdict = resolve_target(target)
    if tdict.get("kind") != "llvm":
        raise UnsupportedError(f"tune: tuning is for CPU (llvm) targets; {name} is not one")
    tvm = _tvm.tvm()
    mod, _ctx, _proto, _defaults = relax_module(model, tdict=tdict, input_shapes=input_shapes, fold=fold)
    tgt = tvm.target.Target(tdict)
    fused = graph_schedules.pipeline(tgt, until_schedule=True)(mod)
    return fused, tdict


def extract_tasks(model, *, target: Any = "llvm", input_shapes: Mapping | None = None, fold: bool = True,
                  all_functions: bool = False, symbolic: list | None = None) -> list[Task]:
    """The tuning tasks of a model, heaviest first (structurally equal functions are one task). Functions
    with symbolic shapes cannot be measured: they are left out, and their names appended to ``symbolic``."""
    from bncompile.lower.graph_schedules import _is_ours

    tvm = _tvm.tvm()
    fused, _ = fused_module(model, target=target, input_shapes=input_shapes, fold=fold)
    calls: dict[str, int] = {}

    def count(node):
        if isinstance(node, tvm.relax.Call) and node.args and isinstance(node.args[0], tvm.ir.GlobalVar):
            calls[node.args[0].name_hint] = calls.get(node.args[0].name_hint, 0) + 1

    for func in fused.functions.values():
        if isinstance(func, tvm.relax.Function):
            tvm.relax.analysis.post_order_visit(func, count)
    tasks: list[Task] = []
    for gv, func in sorted(fused.functions.items(), key=lambda kv: kv[0].name_hint):
        if not isinstance(func, tvm.tirx.PrimFunc) or _is_ours(func):
            continue
        if not all_functions and not _has_reduction(func):
            continue
        mod = normalize(func)
        if not _static_args(mod):
            log.info("tune: %s has symbolic shapes; MetaSchedule cannot measure it (hand schedule kept)",
                     gv.name_hint)
            if symbolic is not None:
                symbolic.append(gv.name_hint)
            continue
        same = next((t for t in tasks if _structural_equal(t.mod, mod)), None)
        if same is not None:
            same.weight += calls.get(gv.name_hint, 1)
            continue
        tasks.append(Task(gv.name_hint, mod, calls.get(gv.name_hint, 1), _flops(mod)))
    tasks.sort(key=lambda t: -t.flops * t.weight)
    return tasks


# --------------------------------------------------------------------------- applying a database

def _target_key(target) -> tuple:
    t = _tvm.make_target(target)
    attrs = t.attrs
    return (str(t.kind.name), str(attrs.get("mtriple", "") or ""), str(attrs.get("mcpu", "") or ""),
            tuple(str(a) for a in (attrs.get("mattr", None) or ())))


def _is_searched(trace) -> bool:
    """A record from MetaSchedule's search (its trace samples tiles, unroll factors...) rather than a
    committed hand schedule (a trace of plain primitives)."""
    return any(str(inst.kind.name).startswith("Sample") for inst in trace.insts)


def check_database(path, *, flag: str = "--db") -> Path:
    """The database folder, checked: a folder holding MetaSchedule's two JSON files."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{flag} {str(p)!r} is not a folder: give the folder `bncompile tune --db` wrote")
    missing = [f for f in DB_FILES if not (p / f).is_file()]
    if missing:
        raise InputError(f"{flag} {str(p)!r} has no {' or '.join(missing)}: give the folder `bncompile tune "
                         "--db` wrote")
    return p


def open_database(path, *, create: bool = False, flag: str = "--db"):
    """MetaSchedule's ``JSONDatabase`` of the folder (created when ``create``)."""
    ms = _ms()
    p = Path(path)
    if create:
        p.mkdir(parents=True, exist_ok=True)
    else:
        check_database(p, flag=flag)
    try:
        return ms.database.JSONDatabase(work_dir=str(p), allow_missing=create, module_equality="structural")
    except Exception as err:  # noqa: BLE001 - a malformed file: one line that names it
        from bncompile.errors import first_line

        raise InputError(f"{flag} {str(p)!r} is not a MetaSchedule tuning database ({first_line(err, 200)}): "
                         "give the folder `bncompile tune --db` wrote, or tune again into a new folder") from None


class TunedSchedules:
    """The tuned schedules of a database folder, for one compile target: :meth:`apply` is the hook of
    :func:`bncompile.lower.graph_schedules.schedule_module`."""

    def __init__(self, path, target: Any):
        self.path = Path(path)
        self.db = open_database(path)
        self.key = _target_key(target)
        self.applied: dict[str, float] = {}

    def best(self, mod):
        """The best valid record of workload ``mod`` for this target, or None."""
        if not self.db.has_workload(mod):
            return None
        workload = self.db.commit_workload(mod)      # present: found, not written
        for rec in self.db.get_top_k(workload, 64):
            if rec.target is not None and _target_key(rec.target) == self.key:
                return rec
        return None

    def apply(self, func):
        """``func`` with its best tuned schedule, or None (no record, or the hand schedule is the best)."""
        mod = normalize(func)
        rec = self.best(mod)
        if rec is None or not _is_searched(rec.trace):
            return None
        try:
            sch = _tvm.s_tir().Schedule(mod)
            rec.trace.apply_to_schedule(sch, remove_postproc=False)
        except Exception as err:  # noqa: BLE001 - a record that no longer replays: the hand rules
            log.warning("tuning record does not replay (%s); using the hand schedule", err)
            return None
        return sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)


# --------------------------------------------------------------------------- tuning

@dataclasses.dataclass
class TuneResult:
    """What :func:`tune` did: tasks, trials measured, why it stopped, best time per task (seconds)."""

    db: str
    tasks: list[str]
    trials: int = 0
    stopped: str = "done"            # done | time budget | interrupted
    seconds: float = 0.0
    hand: dict = dataclasses.field(default_factory=dict)     # task -> hand schedule's time
    best: dict = dataclasses.field(default_factory=dict)     # task -> best searched time

    def summary(self) -> str:
        better = sum(1 for t, s in self.best.items() if t in self.hand and s < self.hand[t])
        return (f"{self.trials} trial(s) on {len(self.tasks)} task(s) in {self.seconds:.1f} s ({self.stopped}); "
                f"the search beat the hand schedule on {better} task(s); database: {self.db}")


class _Stop(Exception):
    """Raised in the measure callback to end the search (the time budget, Ctrl-C)."""


class _Terminated(BaseException):
    """SIGTERM or SIGHUP stopped a tuning run (see :func:`_stop_on_signals`)."""


@contextlib.contextmanager
def _stop_on_signals(state: dict):
    """Ctrl-C (and SIGTERM, SIGHUP) during tuning stop it after the batch being measured, through the
    measure callback: TVM's C++ task scheduler does not let a KeyboardInterrupt raised in the Python it
    calls (the builder, the runner) through cleanly, it is taken for a failed build and the search goes on,
    or the process crashes. The signal only sets ``state["stop"]``; a second one acts at once."""
    from bncompile._signals import installed

    saved: dict = {}

    def handler(signum, frame):
        if state["stop"] is not None and state["stop"] != "time budget":
            for sig, old in saved.items():
                signal.signal(sig, old)
            raise KeyboardInterrupt() if signum == signal.SIGINT else _Terminated(signum)
        state["stop"] = signum
        log.warning("tune: stopping after the batch being measured (again to stop at once)")

    try:
        with installed((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), handler) as previous:
            saved.update(previous)
            yield
    finally:
        if state["stop"] in (signal.SIGTERM, signal.SIGHUP) and callable(saved.get(state["stop"])):
            saved[state["stop"]](state["stop"], None)     # the CLI's handler: unwind as it does


def _check_stop(state: dict, deadline: float | None) -> None:
    if state["stop"] is None and deadline is not None and time.monotonic() >= deadline:
        state["stop"] = "time budget"
    if state["stop"] is not None:
        raise _Stop()


def parse_tracker(text: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError(f"--rpc-tracker {text!r}: give HOST:PORT (e.g. 127.0.0.1:9190)")
    return host, int(port)


def _progress_callback(bar, state: dict, deadline: float | None, names: list[str]):
    ms = _ms()
    derived_object = _tvm.submodule("tvm.ir.utils").derived_object

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            n = len(runner_results)
            state["trials"] += n
            bar.update(n)
            name = names[task_id]
            for res in runner_results:
                if res.run_secs is not None and res.error_msg is None:
                    secs = sum(float(s) for s in res.run_secs) / max(1, len(res.run_secs))
                    if secs < state["best"].get(name, float("inf")):
                        state["best"][name] = secs
            _check_stop(state, deadline)       # _Stop arrives as a RuntimeError through TVM's task scheduler

    return Progress()


def _builder(tdict: dict, workers: int):
    ms = _ms()
    from bncompile.lower.targets import target_arch

    f_export = None
    if target_arch(tdict) == "aarch64":
        f_export = _export_aarch64
    return ms.builder.LocalBuilder(max_workers=workers, f_build=_build, f_export=f_export)


def _build(mod, target, _params):  # pragma: no cover - runs in the builder's worker processes
    """MetaSchedule's ``default_build`` without its ``import tvm.s_tir.tensor_intrin``: that import takes
    40 s in a worker (~250 TVMScript functions, each calling ``inspect.stack()`` with ~3000 modules loaded),
    longer than the build timeout, so every first build of a worker timed out. Tensor intrinsics matter only
    to tensorized (int8 VNNI...) candidates, which need them registered in the tuning process too; bncompile
    never imports them there, so no candidate uses them."""
    from bncompile.lower import tvm as shim

    tvm = shim.tvm()
    layout = shim.submodule("tvm.s_tir.transform").RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)
    return tvm.tirx.build(layout(mod), target)


def _stoppable(builder, state: dict, deadline: float | None):
    """``builder`` checking the time budget and Ctrl-C before each batch: in MetaSchedule's first round over
    the tasks no result is joined (so no measure callback runs) until every task has had a batch built, and
    with many tasks that round takes minutes."""
    ms = _ms()
    derived_object = _tvm.submodule("tvm.ir.utils").derived_object

    @derived_object
    class Stoppable(ms.builder.PyBuilder):
        def build(self, build_inputs):
            _check_stop(state, deadline)
            return builder.build(build_inputs)

    return Stoppable()


def _export_aarch64(mod) -> str:  # pragma: no cover - runs in the builder's worker processes
    import tempfile

    from bncompile.lower import tvm as shim

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=shim.submodule("tvm.support.cc").cross_compiler("aarch64-linux-gnu-g++"))
    return path


def _runner(rpc_tracker: str | None, rpc_key: str | None, timeout: float):
    ms = _ms()
    if rpc_tracker is None:
        return ms.runner.LocalRunner(timeout_sec=timeout)
    host, port = parse_tracker(rpc_tracker)
    if not rpc_key:
        raise InputError("--rpc-key: give the key the board's RPC server registered with the tracker")
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=rpc_key,
                                 session_timeout_sec=max(10, int(timeout)))
    return ms.runner.RPCRunner(rpc_config=config, max_workers=1)


def _measure_hand(tasks: list[Task], tgt, db, builder, runner, result: TuneResult) -> None:
    """Measure the hand schedule of every task and commit it as a record (see the module docstring)."""
    from bncompile.lower.graph_schedules import rules

    ms = _ms()
    s_tir = _tvm.s_tir()
    scheds = []
    for task in tasks:
        sch = None
        with tgt:
            for rule in rules():
                try:
                    sch = rule.fn(task.mod["main"], tgt)
                except Exception:  # noqa: BLE001 - a rule that fails does not apply
                    sch = None
                if sch is not None:
                    break
        if sch is None:
            continue
        try:
            replay = s_tir.Schedule(task.mod)
            sch.trace.apply_to_schedule(replay, remove_postproc=False)
        except Exception as err:  # noqa: BLE001 - a hand trace that does not replay is not committed
            log.info("hand schedule of %s does not replay: %s", task.name, err)
            continue
        scheds.append((task, replay))
    if not scheds:
        return
    built = builder.build([ms.builder.BuilderInput(s.mod, tgt) for _, s in scheds])
    inputs, kept = [], []
    for (task, sch), b in zip(scheds, built):
        if b.error_msg is None:
            args = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
            inputs.append(ms.runner.RunnerInput(b.artifact_path, "cpu", args))
            kept.append((task, sch, args))
    for (task, sch, args), fut in zip(kept, runner.run(inputs)):
        res = fut.result()
        if res.error_msg is not None or not res.run_secs:
            continue
        workload = db.commit_workload(task.mod)
        db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, res.run_secs, tgt, args))
        result.hand[task.name] = sum(float(s) for s in res.run_secs) / len(res.run_secs)


def _scheduler(name: str, time_budget: float | None) -> str:
    """MetaSchedule's task scheduler for ``name`` (``"auto"``: round-robin under a time budget, else
    gradient). The gradient scheduler gives every task one batch before it joins any, and only a joined
    batch reaches the database: with 53-72 tasks (MobileNetV3, EfficientNet-B0, DenseNet-121 at 224x224)
    that first round took longer than a 420-600 s budget on a 2-core machine, so the budget ended with
    nothing measured kept (0 trials). Round-robin joins each task's batch before that task's next one, so
    what was measured is kept whenever the budget ends."""
    if name == "auto":
        return "round-robin" if time_budget is not None else "gradient"
    if name not in ("round-robin", "gradient"):
        raise InputError(f"task scheduler {name!r}: give auto, round-robin or gradient")
    return name


def tune(model, db, *, trials: int, target: Any = "llvm", input_shapes: Mapping | None = None,
         fold: bool = True, time_budget: float | None = None, rpc_tracker: str | None = None,
         rpc_key: str | None = None, trials_per_iter: int = 16, num_cores: int | None = None,
         cost_model: str = "auto", seed: int | None = None, all_functions: bool = False,
         progress: bool = True, timeout: float = 30.0, measure_hand: bool = True,
         population: int = 512, task_scheduler: str = "auto") -> TuneResult:
    """Tune the model's tasks with MetaSchedule for at most ``trials`` measured candidates (and
    ``time_budget`` seconds), into the database folder ``db`` (created, or added to); see the module
    docstring (``measure_hand=False``: no hand-schedule records, the search's best is applied whatever it
    is; ``population``: the evolutionary search's population, smaller is quicker and coarser;
    ``task_scheduler``: :func:`_scheduler`). Ctrl-C stops it with the database valid (KeyboardInterrupt is re-raised, with
    ``err.result`` the :class:`TuneResult` so far)."""
    from tqdm import tqdm

    from bncompile.lower.targets import resolve_target

    if trials < 1:
        raise InputError(f"--trials {trials}: give at least 1")
    if time_budget is not None and time_budget <= 0:
        raise InputError(f"--time-budget {time_budget}: give a positive number of seconds")
    if rpc_tracker is not None:
        parse_tracker(rpc_tracker)
    scheduler = _scheduler(task_scheduler, time_budget)
    t0 = time.monotonic()
    deadline = None if time_budget is None else t0 + time_budget
    ms = _ms()
    tvm = _tvm.tvm()
    symbolic: list = []
    tasks = extract_tasks(model, target=target, input_shapes=input_shapes, fold=fold, all_functions=all_functions,
                          symbolic=symbolic)
    if not tasks and symbolic:
        raise InputError(f"tune: the model's functions have symbolic shapes ({len(symbolic)}, e.g. a free batch), "
                         "which MetaSchedule cannot measure: give static shapes with --input-shape "
                         "NAME=1,3,224,224 (input_shapes=), and compile with the same shapes to use the database")
    _, tdict = resolve_target(target)
    cores = int(num_cores or os.cpu_count() or 1)
    tgt = tvm.target.Target({**tdict, "num-cores": cores})
    result = TuneResult(db=str(db), tasks=[t.name for t in tasks])
    if not tasks:
        result.seconds = time.monotonic() - t0
        return result
    database = open_database(db, create=True)
    if cost_model == "auto":
        try:
            import xgboost  # noqa: F401
            cost_model = "xgb"
        except ImportError:
            cost_model = "random"
    ms_log = logging.getLogger(_MS_LOGGER)

    def strategy():
        return ms.search_strategy.EvolutionarySearch(population_size=population,
                                                     init_min_unmeasured=min(50, population),
                                                     genetic_num_iters=4 if population >= 256 else 2)

    builder = _builder(tdict, cores)
    runner = _runner(rpc_tracker, rpc_key, timeout)
    state = {"trials": 0, "best": result.best, "stop": None}
    bar = tqdm(total=trials, unit="trial", desc="tune", disable=not progress, file=sys.stderr, leave=False)
    try:
        with _stop_on_signals(state):
            if measure_hand:
                _measure_hand(tasks, tgt, database, builder, runner, result)
            _check_stop(state, deadline)
            # the slowest first (the hand schedule's time x calls; unmeasured ones, which no rule took, before
            # all): MetaSchedule's task scheduler gives each task one batch in this order before it chooses
            tasks.sort(key=lambda t: -result.hand.get(t.name, float("inf")) * t.weight)
            contexts = [ms.TuneContext(mod=t.mod, target=tgt, space_generator="post-order-apply",
                                       search_strategy=strategy(), task_name=t.name, logger=ms_log,
                                       rand_state=-1 if seed is None else seed + k, num_threads=cores).clone()
                        for k, t in enumerate(tasks)]
            callbacks = [*ms.MeasureCallback.create("default"),
                         _progress_callback(bar, state, deadline, [t.name for t in tasks])]
            ms.tune_tasks(tasks=contexts, task_weights=[float(t.weight) for t in tasks], work_dir=str(db),
                          max_trials_global=trials, num_trials_per_iter=max(1, min(trials_per_iter, trials)),
                          builder=_stoppable(builder, state, deadline), runner=runner, database=database,
                          cost_model=cost_model,
                          measure_callbacks=callbacks, task_scheduler=scheduler)
    except Exception:  # noqa: BLE001 - the callback's _Stop arrives as a RuntimeError through TVM's FFI
        if state["stop"] is None:
            raise
    finally:
        bar.close()
        del builder, runner                  # their worker processes end now, not at exit
    result.trials = state["trials"]
    result.seconds = time.monotonic() - t0
    if state["stop"] == "time budget":
        result.stopped = "time budget"
    elif state["stop"] is not None:
        result.stopped = "interrupted"
        err = KeyboardInterrupt() if state["stop"] == signal.SIGINT else _Terminated(state["stop"])
        err.result = result
        raise err
    result.trials = state["trials"]
    result.seconds = time.monotonic() - t0
    return result
