"""``moeconv convert``: quantize a Hugging Face MoE checkpoint into the moeconv format."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import click

from moeconv.alloc.options import allocation_kwargs, allocation_options

_SIZE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*")
_UNITS = {None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_ALLOC_ONLY = ("alloc", "bit_levels", "zeta", "router_reference", "budget", "alloc_seed")


def parse_size(text: str) -> int:
    """``"1GB"`` -> 10**9, ``"512MiB"`` -> 2**29, ``"1000"`` -> 1000 (units as in transformers)."""
    match = _SIZE.fullmatch(text)
    if not match or float(match[1]) <= 0:
        raise click.BadParameter(f"expected a size such as 1GB, 500MB or 2GiB, got {text!r}", param_hint="--max-shard-size")
    return int(float(match[1]) * _UNITS[match[2] and match[2].lower()])


def default_workers() -> int:
    """One worker per usable core, at most 4: each holds one weight in flight, so memory grows with them."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _hook(module: str, name: str, option: str):
    """A function another part of moeconv provides, or a clear error naming the option if it does not yet."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise click.UsageError(f"{option} is not available yet in this build of moeconv ({module}.{name} is missing)") from None


def _explicit(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)


@click.command("convert")
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub SRC.")
@click.option("--scheme", default="nf4", show_default=True,
              help="Scheme of the routed experts: int2/3/4/8[-sym], nf4, fp4, mxfp4.")
@click.option("--group-size", type=int, default=None, help="Elements per scale.  [default: 64; 32 for mxfp4]")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="Quantize nf4/fp4 block scales again (8-bit, blocks of 256).")
@click.option("--method", type=click.Choice(["rtn", "gptq", "awq"]), default="rtn", show_default=True,
              help="Round-to-nearest, or GPTQ / AWQ on calibration text (--calib).")
@click.option("--calib", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Calibration text file for --method gptq/awq and --alloc sensitivity/frequency.")
@click.option("--device", default="cpu", show_default=True, help="Torch device that quantizes (cpu, cuda, cuda:1...).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Weights quantized in parallel (threads).  [default: the usable CPU cores, at most 4]")
@click.option("--dry-run", is_flag=True, help="Check the source and print what would be written; write nothing.")
@click.option("--quantize-dense", "quantize_dense", metavar="SCHEME", default=None,
              help="Also quantize shared experts, dense MLPs and attention with SCHEME (never embeddings, heads, routers).")
@click.option("--keep", multiple=True, metavar="PATTERN",
              help="Store tensors whose source name matches this glob as they are (repeatable).")
@click.option("--max-shard-size", default=None, metavar="SIZE",
              help="Largest output shard, e.g. 1GB.  [default: a quarter of the largest source shard, at most 5GB]")
@allocation_options
@click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", default=None,
              help="Upload OUT to this Hub repository after converting.")
@click.option("--allow-pickle", is_flag=True,
              help="Read PyTorch .bin checkpoints (pickles can run code: only for files you trust).")
@click.pass_context
def command(ctx: click.Context, src: str, out: Path, revision, scheme, group_size, double_quant, method, calib,
            device, workers, dry_run, quantize_dense, keep, max_shard_size, avg_bits, alloc, bit_levels, zeta,
            router_reference, budget, alloc_seed, push_to_hub, allow_pickle) -> None:
    """Quantize the MoE checkpoint SRC (local directory or Hub repo id) into OUT.

    By default routed experts become NF4 (blocks of 64, double quantization),
    routers stay exactly as stored (BF16, or wider if the source is), and every
    other tensor is kept as stored.  The conversion streams one weight at a
    time, and an interrupted run resumes when started again with the same
    arguments.
    """
    from moeconv.adapters import AdapterError
    from moeconv.pipeline import ConvertError, Options, plan_conversion
    from moeconv.quant import QuantSpec
    from moeconv.source import SourceError, open_source

    if avg_bits is None:
        given = [name for name in _ALLOC_ONLY if _explicit(ctx, name)]
        if given and not (given == ["alloc"] and alloc == "uniform"):
            raise click.UsageError(f"--{given[0].replace('_', '-')} only applies with --avg-bits")
    if method != "rtn" and calib is None:
        raise click.UsageError(f"--method {method} needs --calib FILE (calibration text)")
    if push_to_hub:
        check_push_target = _hook("moeconv.hub", "check_push_target", "--push-to-hub")
        _fail_as_click(lambda: check_push_target(push_to_hub))
    try:
        spec = QuantSpec(scheme, group_size, double_quant)
        dense = QuantSpec(quantize_dense, group_size, double_quant) if quantize_dense else None
        options = Options(spec, dense, tuple(keep), method, parse_size(max_shard_size) if max_shard_size else None,
                          _digest(calib) if calib and method != "rtn" else None)
        source = open_source(src, revision, allow_pickle)
        assignment, alloc_plan = {}, None
        if avg_bits is not None or alloc == "uniform" and _explicit(ctx, "alloc"):
            plan_allocation = _hook("moeconv.alloc", "plan_allocation", "--avg-bits/--alloc")
            kwargs = allocation_kwargs(avg_bits, alloc, bit_levels, zeta, router_reference, budget, alloc_seed)
            alloc_plan = plan_allocation(
                source, **kwargs, calib=calib,
                scheme=scheme if _explicit(ctx, "scheme") else None,
                group_size=group_size, method=method, device=device,
            )
            assignment = alloc_plan.assignment
        conv = plan_conversion(source, options, assignment)
        _print_plan(conv, alloc_plan)
        if dry_run:
            click.echo("dry run: nothing written")
            return
        quantizer = calibrated_quantizer(conv, method, calib, device) if method != "rtn" else None
        started = time.monotonic()
        result = _run(conv, out, quantizer, workers or default_workers(), device, alloc_plan, push_to_hub)
    except (SourceError, AdapterError, ConvertError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # e.g. OUT under a file, no permission; a partial run stays resumable
        raise click.ClickException(os_error_line(exc)) from None
    seconds = time.monotonic() - started
    click.echo(
        f"wrote {out} ({result.out_bytes / 1e6:,.1f} MB from {result.source_bytes / 1e6:,.1f} MB in {seconds:,.1f} s"
        + (f"; resumed, {result.tasks_resumed} tensors were already written" if result.tasks_resumed else "") + ")"
    )
    if push_to_hub:
        upload_folder = _hook("moeconv.hub", "upload_folder", "--push-to-hub")
        done = _fail_as_click(lambda: upload_folder(out, push_to_hub))
        click.echo(f"uploaded to {done.repo_id} ({done.commit_url})")


def os_error_line(exc: OSError) -> str:
    """One line for an operating-system error, naming the path it concerns."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def calibrated_quantizer(conv, method: str, calib: Path, device: str, n_samples: int = 128):
    """GPTQ / AWQ: calibrate every routed expert on ``calib`` first, then hand the pipeline their parts.

    ``moeconv.calib`` runs the model layer by layer on the calibration text and
    quantizes each expert against the tokens routed to it; the pipeline then
    streams as usual and takes those parts for routed experts (RTN for the
    rest).  AWQ runs with its scales inside each expert only (``awq_input="none"``):
    folding a scale into the norm would also rescale the router, which moeconv
    keeps bit-identical to the source.
    """
    from moeconv.adapters import ROUTED

    calibrate_checkpoint = _hook("moeconv.calib", "calibrate_checkpoint", f"--method {method}")
    from moeconv.calib import CalibConfig

    keys = {t.item.name: (t.item.layer, t.item.expert, t.item.proj)
            for t in conv.tasks if t.item.role == ROUTED and t.spec is not None}
    specs = {keys[t.item.name]: t.spec for t in conv.tasks if t.item.name in keys}
    config = CalibConfig(method=method, awq_input="none")
    result = calibrate_checkpoint(conv.source.path, calib, lambda layer, expert, proj: specs.get(
        (layer, expert, proj), conv.options.spec), config, n_samples=n_samples, device=device)
    for message in result.fallbacks:
        click.echo(f"warning: {message}", err=True)
    return result.quantizer(keys)


def _fail_as_click(call):
    """Run a Hub call; its one-line errors become click errors."""
    try:
        return call()
    except (RuntimeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def _print_plan(conv, alloc_plan) -> None:
    from moeconv.modelcard import routed_average_bits, scheme_rows

    click.echo(f"{conv.source.path}: {conv.adapter.name} adapter, {len(conv.tasks)} tensors, "
               f"{conv.source_bytes / 1e6:,.1f} MB", err=True)
    for row in scheme_rows(conv):
        click.echo(f"  {row.role:<14} {row.storage:<34} {row.tensors:>6} tensors {row.params:>14,} params "
                   f"{row.bits_per_weight:7.3f} bits/weight", err=True)
    stored, code = routed_average_bits(conv)
    click.echo(f"  routed experts: {stored:.3f} stored bits/weight ({code:.3f} code bits); "
               f"output {conv.out_bytes / 1e6:,.1f} MB", err=True)
    for note in getattr(alloc_plan, "notes", []):
        click.echo(f"  allocation: {note}", err=True)


def _run(conv, out: Path, quantizer, workers: int, device: str, alloc_plan, push_to_hub):
    from moeconv.modelcard import render
    from moeconv.pipeline import convert

    extra = {"allocation": {k: v for k, v in alloc_plan.to_dict().items() if k != "experts"}} if alloc_plan else None
    title = f"{(conv.source.repo_id or conv.source.path.name).split('/')[-1]} (moeconv {conv.options.spec.scheme})"
    card = render(conv, title, push_to_hub or str(out))
    total = len(conv.tasks)
    state = {"done": 0, "bytes": 0, "t0": time.monotonic()}
    interactive = sys.stderr.isatty()

    def progress(task) -> None:
        state["done"] += 1
        state["bytes"] += task.source_bytes
        if interactive:
            rate = state["bytes"] / 1e6 / max(time.monotonic() - state["t0"], 1e-9)
            click.echo(f"\r  {state['done']}/{total} tensors, {rate:,.0f} MB/s ", nl=False, err=True)

    result = convert(conv, out, quantizer=quantizer, workers=workers, device=device,
                     extra_files={"README.md": card.encode()}, config_extra=extra, progress=progress)
    if interactive:
        click.echo("", err=True)
    if conv.assignment:
        from moeconv.cardplot import plot_bit_allocation

        plot_bit_allocation(out)
    return result
