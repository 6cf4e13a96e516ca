""":func:`benchmark`: build every variant of a model per batch size, check its outputs against
onnxruntime's, time them in interleaved rounds and measure their memory (see :mod:`bncompile.bench`)."""

from __future__ import annotations

import gc
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from bncompile.bench.inputs import graph_inputs, resolve_shapes
from bncompile.bench.report import BASELINE, BenchReport, VariantResult, load_average, machine_info
from bncompile.bench.stats import summarize, summarize_settled
from bncompile.bench.timing import time_interleaved, time_settled, wait_idle
from bncompile.bench.variants import (first_line, native_stderr_to_log, ort_runner, pin_tvm_threads,
                                      select_variants, to_numpy, tvm_runner)
from bncompile import onnx_utils
from bncompile.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_REPEAT = 30
DEFAULT_WARMUP = 5
DEFAULT_THREADS = 1


def benchmark(model_or_path, *, batches: Sequence[int] | None = (1,), threads: int | None = None,
              target: str = "llvm", repeat: int = DEFAULT_REPEAT, warmup: int = DEFAULT_WARMUP,
              variants: Sequence[str] | None = None, progress: bool = True, seed: int = 0,
              memory: bool = True, input_shapes: dict | None = None, db=None,
              settle: bool | None = None) -> BenchReport:
    """Benchmark ``model_or_path`` (a path or an ``onnx.ModelProto``); see the module docstring.

    Args (keyword-only after the model):
        batches: batch sizes for the free batch dimension; ``None``: 1, or the model's fixed batch.
        threads: intra-op threads of onnxruntime and TVM; default :data:`DEFAULT_THREADS` (1).
        target: TVM target of the ``tvm`` variant.
        repeat, warmup: timed and discarded interleaved rounds.
        variants: names from :data:`ALL_VARIANTS`; default all CPU ones plus the CUDA ones available.
        progress: a tqdm bar on stderr.
        seed: seed of the random inputs.
        memory: measure peak RSS in subprocesses (slower: one process per variant and batch).
        input_shapes: ``{input: shape}`` for free non-batch dimensions.
        db: a tuning database folder (``bncompile tune``) the ``tvm`` variant compiles with.
        settle: settled rounds (:func:`bncompile.bench.timing.time_settled`: each timed call starts
            once the other runtimes' thread-pool workers sleep); default: when ``threads`` > 1.

    Raises InputError for a bad model, batch or setting. A variant that cannot be built (no
    compiler, a failed compile, no CUDA) is reported ``unavailable`` with its reason instead.
    """
    from tqdm import tqdm

    from bncompile.bench.memory import probe_memory   # not at the top: `python -m` runs it

    t_start = time.perf_counter()
    threads = DEFAULT_THREADS if threads is None else int(threads)
    if threads < 1:
        raise InputError(f"threads {threads}: give 1 or more")
    settle = threads > 1 if settle is None else bool(settle)
    if repeat < 1 or warmup < 0:
        raise InputError(f"repeat {repeat}, warmup {warmup}: give repeat >= 1 and warmup >= 0")
    model = onnx_utils.as_model_proto(model_or_path)
    name = str(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else (
        model.graph.name or "<in-memory model>")
    batch_list, per_batch = resolve_shapes(graph_inputs(model), batches, input_shapes)
    if variants is None or any(str(v).strip().startswith("tvm") for v in variants):
        pin_tvm_threads(threads)          # before anything imports TVM
    chosen, missing = select_variants(variants)
    inputs_desc = {n: [d if isinstance(d, int) and d > 0 else (d or "N") for d in dims]
                   for n, dims in graph_inputs(model)}
    report = BenchReport(model=name, inputs=inputs_desc, batches=batch_list, threads=threads,
                         target=str(target), repeat=int(repeat), warmup=int(warmup), seed=int(seed),
                         variants=chosen, settle=settle)
    report.machine = machine_info(threads)
    out_names = [o.name for o in model.graph.output]
    model_bytes = model.SerializeToString()

    folded_bytes, fold_error = None, None
    if any(v.startswith("folded-") for v in chosen):
        t = time.perf_counter()
        try:
            from bncompile.folding import fold
            res = fold(model, check=False, validate=False)
            folded_bytes = res.model.SerializeToString()
            rep = res.report
            report.fold = {"folded": len(rep.folded), "left": len(rep.left),
                           "nodes_before": rep.nodes_before, "nodes_after": rep.nodes_after}
        except Exception as err:  # noqa: BLE001 - the folded variants become unavailable
            fold_error = f"fold failed: {first_line(err)}"
            log.info("benchmark: %s", fold_error)
        report.seconds["fold"] = round(time.perf_counter() - t, 3)

    steps = len(batch_list) * (repeat + warmup)
    bar = tqdm(total=steps, desc="bench", unit="round", file=sys.stderr, disable=not progress,
               leave=False, dynamic_ncols=True)
    tmpdir = tempfile.TemporaryDirectory(prefix="bncompile-bench-") if memory else None
    try:
        files = {}
        if tmpdir is not None:
            files["orig"] = os.path.join(tmpdir.name, "model.onnx")
            Path(files["orig"]).write_bytes(model_bytes)
            if folded_bytes is not None:
                files["folded"] = os.path.join(tmpdir.name, "folded.onnx")
                Path(files["folded"]).write_bytes(folded_bytes)
        for b in batch_list:
            shapes = per_batch[b]
            feeds = onnx_utils.model_feeds(model, shapes, seed=seed)
            rows: dict[str, VariantResult] = {v: VariantResult(variant=v, batch=b) for v in chosen}
            runners: dict[str, Callable] = {}
            t = time.perf_counter()
            for v in chosen:
                bar.set_postfix_str(f"batch {b}: building {v}")
                why = missing.get(v)
                if why is None and v.startswith("folded-") and folded_bytes is None:
                    why = fold_error or "fold failed"
                if why is None:
                    try:
                        if v.startswith("tvm"):
                            runners[v] = tvm_runner(model, v, target, shapes, feeds, out_names,
                                                    db=None if v == "tvm-cuda" else db)
                        else:
                            src = folded_bytes if v.startswith("folded-") else model_bytes
                            runners[v] = ort_runner(src, v, threads, feeds)
                    except Exception as err:  # noqa: BLE001 - reported, the benchmark goes on
                        if v == BASELINE:
                            first = first_line(err)
                            raise InputError(f"onnxruntime cannot run the model: {first}") from None
                        why = first_line(err)
                        log.info("benchmark: %s unavailable: %s", v, why)
                if why is not None:
                    rows[v].status, rows[v].reason = "unavailable", why
            report.seconds[f"build@{b}"] = round(time.perf_counter() - t, 3)

            # accuracy against ort (one call each; it also warms them up)
            try:
                reference = to_numpy(runners[BASELINE]())
            except Exception as err:  # noqa: BLE001 - the baseline must run
                raise InputError(f"onnxruntime cannot run the model on inputs {dict(shapes)}: "
                                 f"{first_line(err)}") from None
            for v, fn in list(runners.items()):
                try:
                    errs = onnx_utils.compare_outputs(reference, to_numpy(fn()))
                except Exception as err:  # noqa: BLE001
                    rows[v].status, rows[v].reason = "unavailable", f"run failed: {first_line(err)}"
                    del runners[v]
                    continue
                rows[v].max_abs_err, rows[v].max_rel_err = errs["max_abs"], errs["max_rel"]

            bar.set_postfix_str(f"batch {b}: timing {len(runners)} variants")
            t = time.perf_counter()
            if settle:
                times = time_settled(runners, repeat, warmup, tick=lambda: bar.update(1))
            else:
                wait_idle()                    # no pool of an earlier benchmark or batch still spinning
                wall, cpu = time_interleaved(runners, repeat, warmup, tick=lambda: bar.update(1))
            report.seconds[f"time@{b}"] = round(time.perf_counter() - t, 3)
            for v, fn in runners.items():
                if settle:
                    summarize_settled(rows[v], times, v, BASELINE, b)
                else:
                    summarize(rows[v], wall[v], wall[BASELINE], b, cpu[v], cpu[BASELINE])
                rows[v].threads_used = _threads_used(fn)
            libraries = {}
            if tmpdir is not None:                 # TVM: export now, load in the probe (no compile there)
                for v, fn in runners.items():
                    if getattr(fn, "compiled", None) is not None:
                        try:
                            with native_stderr_to_log():   # TVM's C++ warnings while saving
                                libraries[v] = str(fn.compiled.export(os.path.join(tmpdir.name, f"{v}-{b}.so")))
                        except Exception as err:  # noqa: BLE001 - the probe compiles instead
                            log.info("benchmark: export of %s failed (%s); its memory includes compilation",
                                     v, first_line(err))
            runners.clear()
            gc.collect()

            if tmpdir is not None:
                bar.set_postfix_str(f"batch {b}: memory")
                t = time.perf_counter()
                feeds_file = os.path.join(tmpdir.name, f"feeds{b}.npz")
                np.savez(feeds_file, **feeds)
                for v in chosen:
                    if rows[v].status != "ok":
                        continue
                    src = files["folded"] if v.startswith("folded-") else files["orig"]
                    m = probe_memory(v, src, feeds_file, threads=threads, target=target,
                                      library=libraries.get(v))
                    if "error" in m:
                        rows[v].memory_method = m["error"]
                        continue
                    rows[v].peak_rss_mb = round(m["peak_kb"] / 1024, 2)
                    rows[v].run_rss_mb = None if m["run_kb"] is None else round(m["run_kb"] / 1024, 2)
                    note = ""
                    if v.startswith("tvm"):
                        note = " (exported library loaded)" if v in libraries else " (includes compilation)"
                    rows[v].memory_method = m["method"] + note
                report.seconds[f"memory@{b}"] = round(time.perf_counter() - t, 3)
            report.results.extend(rows[v] for v in chosen)
    finally:
        bar.close()
        if tmpdir is not None:
            tmpdir.cleanup()
    report.machine["loadavg_end"] = load_average()
    report.seconds["total"] = round(time.perf_counter() - t_start, 3)
    return report


def _threads_used(fn) -> int | None:
    """The threads a runner's runtime really used (``fn.threads()``), None when it cannot tell."""
    try:
        return int(fn.threads())
    except Exception:  # noqa: BLE001 - a runner without the attribute or a runtime without the query
        return None
