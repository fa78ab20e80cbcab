"""The streaming conversion: plan every output from the headers, then quantize and write one weight at a time.

Planning (``plan_conversion``) reads nothing but safetensors headers and
config.json: the adapter maps every source tensor to an :class:`Item`, each
gets a :class:`Task` (a QuantSpec, or None to store it as it is), and all
shapes, dtypes and names are checked before OUT is touched.

Execution (``convert``) walks the tasks in source order.  Worker threads load
one tensor (memory-mapped), quantize it and hand the parts back; the main
thread gives them to the :class:`~moeconv.format.ShardedWriter` in task order,
so the output is the same whatever the number of workers.  At most
``2 x workers`` tasks are in flight, which bounds memory.

Resuming: the run's identity (source headers, options, scheme assignment) is
written to ``OUT/.moeconv-partial/convert.json`` before anything else.  A
re-run with the same identity hands the writer ``resume=True``; the writer
keeps the shards that were finished and the tasks they hold are skipped.
Because tasks are always added in the same order and the writer's shard
boundaries depend only on that order, the result is byte-identical to an
uninterrupted run.  A run with a different identity is refused.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import shutil
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeconv_numpy.metadata import ROUTER_DTYPES
from moeconv_numpy.reader import CONFIG_FILE, INDEX_FILE
from moeconv_numpy.schemes import scheme_info, stored_bits

from .adapters import ROUTED, Adapter, Item, adapter_for_config
from .adapters.base import FLOAT_DTYPES
from .format import PARTIAL_DIR, ShardedWriter
from .quant import QuantSpec
from .source import Source

#: quantize(weight, spec, logical_name) -> {suffix: tensor}; RTN, or GPTQ/AWQ closed over their statistics.
Quantizer = Callable[[torch.Tensor, QuantSpec, str], dict[str, torch.Tensor]]

RUN_FILE = "convert.json"
#: errno values that mean "the disk (or the user's quota) is full": clean up and say so in one line.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn"}
_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "I16": 2,
                "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "BOOL": 1}
#: Dtypes the writer can store as plain tensors.
_PLAIN_DTYPES = ("BF16", "F16", "F32", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL")


class ConvertError(ValueError):
    """The source cannot be converted as asked (one line naming the file, tensor or option)."""


@dataclass(frozen=True)
class Options:
    """What ``moeconv convert`` was asked to do (everything that changes the output bytes)."""

    spec: QuantSpec = field(default_factory=lambda: QuantSpec("nf4", 64, True))
    dense_spec: QuantSpec | None = None
    keep: tuple[str, ...] = ()
    method: str = "rtn"
    max_shard_bytes: int | None = None
    #: sha256 of the calibration text (GPTQ/AWQ): another text gives other bytes
    calibration: str | None = None

    def identity(self) -> dict[str, Any]:
        return {
            "spec": spec_dict(self.spec),
            "dense_spec": spec_dict(self.dense_spec) if self.dense_spec else None,
            "keep": list(self.keep),
            "method": self.method,
            "max_shard_bytes": self.max_shard_bytes,
            "calibration": self.calibration,
        }


def group_size_of(spec: QuantSpec) -> int:
    return spec.group_size or scheme_info(spec.scheme).default_group_size


def double_quant_of(spec: QuantSpec) -> bool:
    return bool(spec.double_quant) and scheme_info(spec.scheme).family in ("nf4", "fp4")


def spec_dict(spec: QuantSpec) -> dict[str, Any]:
    return {"scheme": spec.scheme, "group_size": group_size_of(spec), "double_quant": double_quant_of(spec)}


@dataclass(frozen=True)
class Task:
    """One item and what to do with it: quantize with ``spec``, or store as ``store_dtype``."""

    item: Item
    spec: QuantSpec | None
    store_dtype: str | None
    source_bytes: int

    @property
    def out_bytes(self) -> int:
        if self.spec is not None:
            return stored_bits(self.spec.scheme, self.item.shape, group_size_of(self.spec), double_quant_of(self.spec)) // 8
        n = _DTYPE_BYTES[self.store_dtype]
        for d in self.item.shape:
            n *= d
        return n

    @property
    def numel(self) -> int:
        n = 1
        for d in self.item.shape:
            n *= d
        return n


@dataclass
class Conversion:
    """A checked plan: the source, its adapter and one task per output, in writing order."""

    source: Source
    adapter: Adapter
    options: Options
    tasks: list[Task]
    assignment: dict[str, QuantSpec]

    @property
    def source_bytes(self) -> int:
        return sum(t.source_bytes for t in self.tasks)

    @property
    def out_bytes(self) -> int:
        return sum(t.out_bytes for t in self.tasks)

    def max_shard_bytes(self) -> int:
        """The output shard limit: the option, else a quarter of the largest source shard (at most 5 GB).

        The writer holds the open output shard in memory, so tying its size to
        the source's shards keeps peak memory a fraction of the largest source shard.
        """
        if self.options.max_shard_bytes is not None:
            return self.options.max_shard_bytes
        return max(1, min(5_000_000_000, self.source.largest_file_bytes() // 4))

    def identity(self) -> str:
        """Hash of everything that determines the output bytes; equal identities may resume each other."""
        doc = {
            "source": self.source.fingerprint(),
            "adapter": self.adapter.name,
            "options": self.options.identity(),
            "max_shard_bytes": self.max_shard_bytes(),
            "assignment": {k: spec_dict(v) for k, v in sorted(self.assignment.items())},
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _file(source: Source, item: Item) -> Path:
    return source.path / source.tensors[item.sources[0]].file


def _where(source: Source, item: Item) -> str:
    return f"{_file(source, item)}: tensor {item.sources[0]!r}"


def _task(
    source: Source, item: Item, options: Options, assignment: Mapping[str, QuantSpec], readers: Mapping[str, int]
) -> Task:
    # a fused source tensor is read by several items (``readers``): each counts its share of the bytes
    nbytes = sum(_DTYPE_BYTES.get(source.tensors[s].dtype, 0) * _numel(source.tensors[s].shape) // readers[s]
                 for s in item.sources)
    kept = _matches(item.name, options.keep) or any(_matches(s, options.keep) for s in item.sources)
    spec = None
    if not item.router and not kept:
        if item.role == ROUTED:  # weights the source already stores in a format scheme keep it by default
            spec = assignment.get(item.name, item.native or options.spec)
        elif item.role is not None and options.dense_spec is not None:
            spec = options.dense_spec
    if spec is not None:
        if item.dtype not in FLOAT_DTYPES:
            raise ConvertError(
                f"{_where(source, item)}: dtype {source.tensors[item.sources[0]].dtype} is not supported for "
                f"quantization (supported: {', '.join(FLOAT_DTYPES)}, and F8_E4M3 with weight_scale_inv)"
            )
        return Task(item, spec, None, nbytes)
    if item.dtype not in _PLAIN_DTYPES:
        raise ConvertError(
            f"{_where(source, item)}: dtype {item.dtype} is not supported "
            f"(F8 weights need a weight_scale_inv tensor; plain tensors may be {', '.join(_PLAIN_DTYPES)})"
        )
    if item.router and item.dtype not in ROUTER_DTYPES:  # casting integer "logit weights" would change routing
        raise ConvertError(
            f"{_where(source, item)}: router stored as {item.dtype}; a router must be a float tensor "
            f"({', '.join(ROUTER_DTYPES)}, or FP8 with weight_scale_inv) because it is kept exactly"
        )
    from_fp8 = len(item.sources) > 1  # dequantized from FP8 on the fly: store as BF16
    store = "BF16" if from_fp8 else item.dtype
    return Task(item, None, store, nbytes)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_conversion(
    source: Source, options: Options, assignment: Mapping[str, QuantSpec] | None = None
) -> Conversion:
    """Check the source against its adapter and decide every output; reads headers only."""
    adapter = adapter_for_config(source.config)
    items = adapter.plan(source.config, source.tensors)
    assignment = dict(assignment or {})
    routed = {it.name for it in items if it.role == ROUTED}
    unknown = sorted(set(assignment) - routed)
    if unknown:
        raise ConvertError(f"the scheme assignment names {unknown[0]!r}, which is not a routed-expert weight of this model")
    readers = Counter(s for it in items for s in it.sources)
    tasks = [_task(source, it, options, assignment, readers) for it in items]
    for t in tasks:
        if t.spec is not None:
            try:
                stored_bits(t.spec.scheme, t.item.shape, group_size_of(t.spec), double_quant_of(t.spec))
            except ValueError as exc:
                raise ConvertError(f"{_where(source, t.item)}: {exc}") from None
    return Conversion(source, adapter, options, tasks, assignment)


def quantization_config(conv: Conversion, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` block of the output config.json (everything dequantize needs)."""
    src = conv.source
    qc = {
        "quant_method": "moeconv",
        **spec_dict(conv.options.spec),
        "method": conv.options.method,
        "adapter": conv.adapter.name,
        "dense_scheme": spec_dict(conv.options.dense_spec) if conv.options.dense_spec else None,
        "keep": list(conv.options.keep),
        "mixed_precision": bool(conv.assignment),
        "source": {"repo_id": src.repo_id, "revision": src.revision},
    }
    if src.config.get("quantization_config"):
        qc["source_quantization_config"] = src.config["quantization_config"]
    qc.update(extra or {})
    return qc


def output_config(conv: Conversion, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    config = {k: v for k, v in conv.source.config.items() if k != "quantization_config"}
    config["quantization_config"] = quantization_config(conv, extra)
    return config


def _compute_dtype(conv: Conversion, item: Item) -> str:
    """The dtype a weight computes in: as stored, or the model's own dtype when the source stores it
    quantized (FP8 with block scales, MXFP4 blocks) and it was widened to float32 only to be requantized."""
    if len(item.sources) > 1 or conv.source.tensors[item.sources[0]].dtype != item.dtype:
        config = conv.source.config
        return config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return _DTYPE_NAMES.get(item.dtype, item.dtype.lower())


def _entry_meta(conv: Conversion, task: Task) -> dict[str, Any]:
    item = task.item
    return {
        **spec_dict(task.spec),
        "shape": list(item.shape),
        "dtype": _compute_dtype(conv, item),
        "role": item.role,
        "layer": item.layer,
        "expert": item.expert,
        "proj": item.proj,
    }


def _run_file_state(out: Path, identity: str) -> bool:
    """Prepare OUT for this run; True when it continues an earlier run with the same identity.

    Refuses a directory that holds anything but an unfinished run of this very
    conversion, so nothing of the user's is ever overwritten or mixed.
    """
    partial = out / PARTIAL_DIR
    run_file = partial / RUN_FILE
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output {out} exists and is not a directory")
    entries = set(os.listdir(out)) if out.is_dir() else set()
    previous = json.loads(run_file.read_text()).get("identity") if run_file.is_file() else None
    if previous == identity:
        return True  # other entries are this run's own, left by a kill inside finalize(): the writer takes them back
    if entries - {PARTIAL_DIR}:
        raise ConvertError(f"output {out} is not empty: choose a new directory or delete it")
    if PARTIAL_DIR in entries:
        if any(partial.glob("shard-*.safetensors")):
            raise ConvertError(
                f"output {out} holds an unfinished conversion with other arguments or another source; "
                "re-run it with the same arguments to resume, or delete the directory"
            )
    partial.mkdir(parents=True, exist_ok=True)
    tmp = partial / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps({"identity": identity}) + "\n")
    os.replace(tmp, run_file)
    return False


def _cleanup(out: Path, created: bool, outputs: set[str], kept: set[str]) -> None:
    """Remove what a failed run wrote, leaving OUT as it was before (absent if we created it).

    ``outputs`` are the names finalize() writes besides the shards; it may have
    moved some files into OUT already when the disk filled up.  ``kept`` are
    the files of the partial directory that an earlier, interrupted run of
    this conversion left (this run resumed from them): they stay, resumable.
    """
    partial = out / PARTIAL_DIR
    if kept:
        for path in partial.iterdir():
            if path.name not in kept:
                path.unlink()
    else:
        shutil.rmtree(partial, ignore_errors=True)
    for path in out.glob("model*.safetensors"):
        path.unlink(missing_ok=True)
    for name in outputs:
        (out / name).unlink(missing_ok=True)
    if created:
        try:
            out.rmdir()
        except OSError:
            pass


class _Executor:
    """Loads and quantizes tasks on worker threads; yields results in task order, 2 x workers in flight."""

    def __init__(self, conv: Conversion, quantizer: Quantizer, workers: int, device: str):
        self.conv, self.quantizer, self.device = conv, quantizer, torch.device(device)
        self.workers = workers

    def _work(self, task: Task) -> tuple[Task, Any]:
        item, source = task.item, self.conv.source
        if task.spec is not None and task.spec == item.native:
            return task, item.load_native(source)  # already in the format: written byte for byte
        value = item.load(source)
        if task.spec is None:
            if value.dtype != _torch_dtype(task.store_dtype):
                value = value.to(_torch_dtype(task.store_dtype))
            return task, value
        try:
            parts = self.quantizer(value.to(self.device), task.spec, item.name)
        except ValueError as exc:  # NaN / Inf in the weight: name the file too
            where = _where(source, item) if item.name not in str(exc) else _file(source, item)
            raise ConvertError(f"{where}: {exc}") from None
        return task, {k: v.to("cpu") for k, v in parts.items()}

    def run(self, tasks: list[Task]) -> Iterator[tuple[Task, Any]]:
        if self.workers <= 1:
            yield from map(self._work, tasks)
            return
        # Each worker gets its share of torch's intra-op threads: N weights on 1 thread each
        # scale better than N weights fighting over every core.
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // self.workers))
        try:
            yield from self._parallel(tasks)
        finally:
            torch.set_num_threads(threads)

    def _parallel(self, tasks: list[Task]) -> Iterator[tuple[Task, Any]]:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="moeconv") as pool:
            pending: deque[Future] = deque()
            todo = iter(tasks)
            try:
                for task in todo:
                    pending.append(pool.submit(self._work, task))
                    if len(pending) >= 2 * self.workers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()


def _torch_dtype(code: str) -> torch.dtype:
    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
            "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "U16": torch.uint16, "I32": torch.int32,
            "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "BOOL": torch.bool}[code]


@dataclass
class Result:
    """What a conversion wrote (or, resumed, found already written)."""

    out: Path
    tasks_done: int
    tasks_resumed: int
    source_bytes: int
    out_bytes: int


def convert(
    conv: Conversion,
    out: str | os.PathLike,
    *,
    quantizer: Quantizer | None = None,
    workers: int = 1,
    device: str = "cpu",
    extra_files: Mapping[str, bytes | Path] | None = None,
    config_extra: Mapping[str, Any] | None = None,
    progress: Callable[[Task], None] | None = None,
) -> Result:
    """Run a planned conversion into ``out`` (resuming an interrupted identical run).

    ``quantizer`` defaults to RTN (``moeconv.quant.quantize``).  ``extra_files``
    (model card, tokenizer files...) and ``config_extra`` (more
    quantization_config keys) are written at the end.  ``progress`` is called
    after each task is handed to the writer (the CLI's progress bar; tests use
    it to interrupt a run).  On a source error (NaN/Inf in a weight) or a full
    disk, everything this run wrote is removed; any other interruption leaves
    the finished shards for a resume.
    """
    from .quant import quantize

    out = Path(out)
    created = not out.exists()
    identity = conv.identity()
    files = {p.name: p for p in conv.source.copy_files}
    files.update(extra_files or {})
    outputs = {*files, CONFIG_FILE, INDEX_FILE}
    try:
        resumed = _run_file_state(out, identity)  # a ConvertError here means OUT is not ours: it is left alone
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        _cleanup(out, created, set(), set())
        raise ConvertError(f"no space left on the device while writing {out}; removed what this run wrote") from None
    kept: set[str] = set()
    try:
        writer = ShardedWriter(out, conv.max_shard_bytes(), resume=True)
        kept = set(os.listdir(out / PARTIAL_DIR)) if resumed else set()
        done = writer.completed_tensors | set(writer.completed_weights)
        todo = [t for t in conv.tasks if t.item.name not in done]
        for task, value in _Executor(conv, quantizer or quantize, workers, device).run(todo):
            if task.spec is None:
                writer.add_tensor(task.item.name, value, router=task.item.router)
            else:
                writer.add_quantized(task.item.name, value, _entry_meta(conv, task))
            if progress is not None:
                progress(task)
        writer.finalize(output_config(conv, config_extra), files)
    except ConvertError:
        _cleanup(out, created, outputs, kept)
        raise
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        _cleanup(out, created, outputs, kept)
        raise ConvertError(f"no space left on the device while writing {out}; removed what this run wrote") from None
    return Result(out, len(todo), len(conv.tasks) - len(todo), conv.source_bytes, conv.out_bytes)
