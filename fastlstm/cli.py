"""The ``fastlstm`` command line: ``train``, ``bench`` and ``compile``."""
import argparse
import json
import math
import os
import sys

import numpy as np

from . import _options, optim

#: What each run of `fastlstm train` takes, with its defaults. An option given on the
#: command line that its run does not take is refused, never silently ignored.
TRAIN_DEFAULTS = {
    "adding": dict(seq_len=100, hidden=64, layers=1, batch_size=32, lr=1e-2, optimizer="adam",
                   max_steps=None, max_seconds=540.0, curriculum=True, dtype="float32",
                   save=None),
    "sine": dict(seq_len=50, hidden=32, layers=1, batch_size=32, lr=1e-2, optimizer="adam",
                 max_steps=1500, max_seconds=540.0, dtype="float32", save=None),
    "data": dict(hidden=64, layers=1, batch_size=32, lr=3e-3, optimizer="adam", epochs=10,
                 max_seconds=None, dtype="float32", save=None),
    # the article's own loop: plain gradient descent on the LSTM and a logistic output
    "article": dict(hidden=3, lr=0.01, max_steps=3000, dtype="float64"),
}
COMMON_DEFAULTS = dict(seed=0, backend="fastlstm", threads=None)
#: the LSTM variants (options of fastlstm.LSTM, from _options' table), off by default
VARIANTS = dict(_options.VARIANTS)
for _task in ("adding", "sine", "data"):       # the runs that train a SequenceModel
    TRAIN_DEFAULTS[_task].update(distributed=False, export_onnx=None, recompute=None,
                                 **VARIANTS)
for _task in ("adding", "data"):               # the runs that keep a training history
    TRAIN_DEFAULTS[_task].update(plot=None)
#: command-line spelling of each setting
FLAGS = dict(seq_len="--seq-len", hidden="--hidden", layers="--layers",
             batch_size="--batch-size", lr="--lr", optimizer="--optimizer", max_steps="--steps",
             max_seconds="--max-seconds", curriculum="--no-curriculum", dtype="--dtype",
             epochs="--epochs", save="--save", distributed="--distributed",
             export_onnx="--export-onnx", plot="--plot", recompute="--recompute",
             **{o.name: o.cli[0] for o in _options.OPTIONS if o.cli})


def _settings(args, parser):
    """The run's settings: the task's defaults, overridden by what was given;
    an option the task does not take is an error."""
    if args.data and args.task:
        parser.error("give --task or --data, not both")
    task = "data" if args.data else (args.task or "adding")
    given = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    defaults = TRAIN_DEFAULTS[task]
    for k in given:
        if k not in defaults:
            takers = [t for t, d in TRAIN_DEFAULTS.items() if k in d]
            where = "--data" if task == "data" else f"--task {task}"
            parser.error(f"{FLAGS[k]} does not apply to {where} (it applies to: "
                         + ", ".join("--data" if t == "data" else t for t in takers) + ")")
    run = dict(COMMON_DEFAULTS, **defaults)
    run.update(given)
    run.update(seed=args.seed if args.seed is not None else run["seed"],
               backend=args.backend or run["backend"],
               threads=args.threads if args.threads is not None else run["threads"])
    return task, run


def _writable_path(option, path, parser):
    """Refuse, by its option, a path that cannot take a new file: a folder, or a file
    in a folder that does not exist."""
    if os.path.isdir(path):
        parser.error(f"{option} {path!r} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"{option} {path!r}: the folder {folder!r} does not exist")


def _check_run(task, run, args, parser):
    """Everything a run's options and files must satisfy, refused before training."""
    if task == "adding" and run["seq_len"] < 2:
        parser.error(f"--seq-len must be >= 2 for the adding problem (two marked values in "
                     f"each sequence), got {run['seq_len']}")
    for key in ("save", "export_onnx", "plot"):
        if run.get(key):
            _writable_path(FLAGS[key], run[key], parser)
    if run.get("plot"):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'fastlstm[plot]'")
    if run.get("export_onnx"):
        for k in _options.inexpressible("onnx"):
            if run.get(k) and k in FLAGS:
                parser.error(f"--export-onnx cannot express {FLAGS[k]}: ONNX's LSTM "
                             "operator has no such option (train without it, or drop "
                             "--export-onnx)")
        try:
            import onnx  # noqa: F401
        except ImportError:
            parser.error("--export-onnx needs onnx: pip install 'fastlstm[onnx]'")
    if task == "data":
        from .tasks import load_data
        try:
            load_data(args.data, np.dtype(run["dtype"]))
        except (OSError, ValueError) as e:
            parser.error(f"--data: {e}")


def _train(args, parser):
    task, run = _settings(args, parser)
    _check_run(task, run, args, parser)
    if run.get("distributed"):
        return _distributed(args, task, run)
    return _train_threads(args, task, run)


def _distributed(args, task, run):
    """Every rank trains; rank 0 alone prints and saves. An exception on any rank
    aborts the whole job (as ``python -m mpi4py`` does) instead of leaving the
    others waiting in a collective forever."""
    import traceback

    from .distributed import MPI
    comm = MPI.COMM_WORLD
    if comm.Get_rank() != 0:
        args.json, args.no_progress = True, True          # silent: rank 0 reports
        args.quiet = True
    try:
        return _train_threads(args, task, run)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        if comm.Get_size() > 1:
            comm.Abort(1)
        raise


def _train_threads(args, task, run):
    if run["threads"]:
        # A limit on BLAS is also the LSTM's thread count (see fastlstm._threads): one
        # knob for both. By default each LSTM call splits its batch over the cores, with
        # BLAS single-threaded meanwhile, so no BLAS pool spins against another process.
        from threadpoolctl import threadpool_limits
        with threadpool_limits(limits=run["threads"], user_api="blas"):
            return _train_run(args, task, run)
    return _train_run(args, task, run)


def _train_run(args, task, run):
    from . import tasks
    say = (lambda *a, **k: None) if args.json else (lambda *a, **k: print(*a, **k, flush=True))
    quiet = getattr(args, "quiet", False)
    if task == "article":
        return _train_article(args, run, say)
    common = dict(dtype=np.dtype(run["dtype"]), seed=run["seed"], backend=run["backend"],
                  progress=not args.json and not args.no_progress, hidden=run["hidden"],
                  layers=run["layers"], batch_size=run["batch_size"], lr=run["lr"],
                  optimizer=run["optimizer"], max_seconds=run["max_seconds"],
                  distributed=run["distributed"],
                  lstm_options={k: run[k] for k in (*VARIANTS, "recompute")
                                if run[k] != dict(VARIANTS, recompute=None)[k]})
    if task == "data":
        say(f"Training on {args.data} ({run['backend']}) ...")
        model, summary = tasks.train_data(args.data, epochs=run["epochs"], plot=run["plot"],
                                          **common)
    elif task == "adding":
        say(f"The adding problem (Hochreiter & Schmidhuber 1997) at T={run['seq_len']}: "
            f"training until all 2560 validation sequences are within 0.03 ({run['backend']}, "
            f"{'curriculum over T' if run['curriculum'] else 'no curriculum'}, "
            f"at most {run['max_seconds']:.0f} s) ...")
        model, summary = tasks.train_adding(seq_len=run["seq_len"], max_steps=run["max_steps"],
                                            curriculum=run["curriculum"], plot=run["plot"],
                                            **common)
    else:
        say(f"Forecasting a noisy sum of sines, sequence to sequence ({run['backend']}) ...")
        model, summary = tasks.train_sine(seq_len=run["seq_len"], max_steps=run["max_steps"],
                                          **common)
    if run["save"] and not quiet:
        model.save(run["save"])               # the ranks hold the same model: rank 0 writes
        summary["saved"] = run["save"]
    if run["export_onnx"] and not quiet:
        from .interop import export_onnx
        export_onnx(model, run["export_onnx"])
        summary["onnx"] = run["export_onnx"]
    if not quiet:
        _report(args, summary, run)
    return 0 if summary.get("criterion_met") in (True, None) else 1


def _report(args, summary, run):
    """Print the summary; the JSON carries every setting that shaped the run."""
    summary = dict(summary, settings=run, dtype=run["dtype"])
    if args.json:
        print(json.dumps(summary))
    elif summary["task"] != "article":
        _print_summary(summary)


def _print_summary(s):
    print(f"{s['task']}: {s['steps']} steps, {s['sequences']} training sequences, "
          f"{s['seconds']} s ({s['backend']})")
    print(f"test MSE {s['test_mse']:.3g}, accuracy {s['test_accuracy']:.4f}", end="")
    if "test_wrong" in s:
        print(f" ({s['test_wrong']} of {s['test_size']} wrong)", end="")
    print(f"; criterion met: {s['criterion_met']}")
    if "paper_t100" in s:
        p = s["paper_t100"]
        print(f"the 1997 paper at T=100: {p['sequences']} training sequences, "
              f"{p['test_wrong']} of {p['test_size']} wrong")


def _train_article(args, run, say):
    from .tasks import train_article
    dtype, steps, lr = np.dtype(run["dtype"]), run["max_steps"], run["lr"]
    say(f"Training the article's example (T=3, 2 features, {run['hidden']} hidden units, "
        f"logistic output, gradient descent, lr={lr}) for {steps} steps, {dtype.name}, "
        f"{run['backend']}:")
    opts = dict(lr=lr, seed=run["seed"], dtype=dtype, hidden=run["hidden"])
    fast = train_article(steps=steps, backend=run["backend"], out=say,
                         report_every=None if args.json else max(steps // 10, 1), **opts)
    # the NumPy reference's step time beside it (the same steps, fewer of them)
    ref = train_article(steps=min(steps, 500), backend="reference", **opts)
    summary = dict(task="article", seq_len=3, steps=steps, sequences=steps * 8,
                   seconds=round(fast["step_seconds"] * steps, 3),
                   test_mse=None, test_accuracy=fast["accuracy"],
                   criterion_met=fast["accuracy"] == 1.0, loss_first=fast["losses"][0],
                   loss_last=fast["losses"][-1], step_us=fast["step_seconds"] * 1e6,
                   step_us_reference=ref["step_seconds"] * 1e6,
                   speedup=ref["step_seconds"] / fast["step_seconds"], backend=run["backend"])
    _report(args, summary, run)
    if not args.json:
        print(f"loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}, "
              f"accuracy {summary['test_accuracy']:.0%}")
        print(f"median step: {run['backend']} {summary['step_us']:.1f} us, NumPy reference "
              f"{summary['step_us_reference']:.1f} us ({summary['speedup']:.1f}x); whole step "
              f"including the NumPy logistic head")
    return 0 if summary["criterion_met"] else 1


def _parse_size(text):
    from .bench import SIZES
    if text in SIZES:
        return text, SIZES[text]
    try:
        B, T, I, H = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--size takes a name ({', '.join(SIZES)}) or B,T,I,H, got {text!r}") from None
    if min(B, T, I, H) < 1:
        raise argparse.ArgumentTypeError(f"--size values must be >= 1, got {text!r}")
    from ._layout import param_size, workspace_size
    from ._validate import _gib, _physical_bytes
    # the float64 workspace, parameters and the inputs of one fwd+bwd, the least a run holds
    need = 8 * (workspace_size(T, B, I, H, H) + 2 * param_size(I, H, H, True) + 2 * T * B * I)
    have = _physical_bytes()
    if have is not None and need > have:
        raise argparse.ArgumentTypeError(f"--size {text!r} would need {_gib(need)}, more than "
                                         f"this machine's {_gib(have)} of memory")
    return text, (B, T, I, H)


def _bench(args, parser):
    from . import bench
    if args.plot:
        other = [f for f in ("profile", "train", "variants", "torch_module", "distributed",
                             "deepbench", "recompute", "stream")
                 if getattr(args, f)]
        if other:
            parser.error(f"--plot draws the default table's ratios against torch; it does not "
                         f"combine with --{other[0].replace('_', '-')}")
        _writable_path("--plot", args.plot, parser)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'fastlstm[plot]'")
    sizes = dict(args.size) if args.size else dict(bench.SIZES)
    for name, (_, _, _, H) in sizes.items():
        if args.proj >= H:
            parser.error(f"--proj must be smaller than the hidden size, got {args.proj} for "
                         f"--size {name} (H={H})")
    dtypes = ["float32", "float64"] if args.dtype == "both" else [args.dtype]
    progress = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.distributed:
        result = bench.distributed_table(sizes, dtypes, min_time=max(args.min_time, 1.0),
                                         progress=progress)
        if result is not None:                        # rank 0 reports
            print(json.dumps(result) if args.json else bench.format_distributed_table(result))
        return 0
    if args.variants:
        sizes = dict(args.size) if args.size else {k: bench.SIZES[k] for k in ("small", "medium")}
        result = bench.variants_table(sizes, ["float32"] if args.dtype == "both" else dtypes,
                                      min_time=args.min_time, progress=progress,
                                      rounds=args.rounds)
        print(json.dumps(result) if args.json else bench.format_variants_table(result))
        return 0
    if args.stream:
        if args.size:
            parser.error("--stream runs its own sizes (B=1: I=32, H=64, one layer; I=256, "
                         "H=256, two layers); it does not take --size")
        result = bench.stream_table(rounds=args.rounds, progress=progress)
        print(json.dumps(result) if args.json else bench.format_stream_table(result))
        return 0
    if args.recompute:
        if len(sizes) != 1 and args.size:
            parser.error("--recompute times one size: give one --size")
        size = sizes.popitem()[1] if args.size else bench.SIZES["long"]
        result = bench.recompute_table(size, "float32" if args.dtype == "both" else args.dtype,
                                       min_time=args.min_time, progress=progress,
                                       rounds=args.rounds)
        print(json.dumps(result) if args.json else bench.format_recompute_table(result))
        return 0
    if args.deepbench:
        if args.size:
            parser.error("--deepbench runs DeepBench's own sizes; it does not take --size")
        result = bench.deepbench_table(["float32"] if args.dtype == "both" else dtypes,
                                       min_time=args.min_time, progress=progress,
                                       rounds=args.rounds)
        print(json.dumps(result) if args.json else bench.format_deepbench_table(result))
        return 0
    if args.torch_module:
        if not args.size:
            sizes = {k: bench.SIZES[k] for k in ("seed", "small", "long", "medium")}
            sizes["packed"] = (32, 1000, 32, 64)
        result = bench.torch_module_table(sizes, dtypes, min_time=args.min_time,
                                          progress=progress, rounds=args.rounds)
        print(json.dumps(result) if args.json else bench.format_torch_module_table(result))
        return 0
    if args.train:
        result = bench.train_table(sizes, dtypes, min_time=args.min_time, progress=progress,
                                   rounds=args.rounds)
        print(json.dumps(result) if args.json else bench.format_train_table(result))
        return 0
    if args.profile:
        result = {}
        for name, (B, T, I, H) in sizes.items():
            for dt in dtypes:
                if progress:
                    progress(f"profiling {name} {dt}")
                result[f"{name} {dt}"] = bench.profile(B, T, I, H, dt, min_time=args.min_time)
        if args.json:
            print(json.dumps(result))
        else:
            for key, impls in result.items():
                print(f"{key}: one fwd+bwd, median ms")
                for impl, parts in impls.items():
                    print(f"  {impl:10} " + "  ".join(
                        f"{k} {v:.3f}" if isinstance(v, float) and k != "GEMM share"
                        else f"{k} {v:.0%}" if k == "GEMM share" else f"{k} {v}"
                        for k, v in parts.items()))
        return 0
    layer = dict(num_layers=args.layers, bidirectional=args.bidirectional,
                 proj_size=args.proj)
    if args.layers > 1 or args.bidirectional or args.proj:
        say = print if not args.json else (lambda *a: None)
        say(f"{args.layers} layer(s), {'bidirectional' if args.bidirectional else 'one direction'}"
            f"{f', proj {args.proj}' if args.proj else ''} (the NumPy reference is one layer, "
            "one direction: left out)")
    result = bench.bench_table(sizes, dtypes, min_time=args.min_time, progress=progress,
                               rounds=args.rounds, **layer)
    print(json.dumps(result) if args.json else bench.format_table(result))
    if args.plot:
        from .plot import plot_bench
        plot_bench(result, args.plot)
        if not args.json:
            print(f"plot: {args.plot}")
    return 0


def _number(kind, ok, requirement):
    """An argparse type: `kind` parsed from the text, then held to `ok`; the error
    names what was expected and what was given."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            article = "an" if kind.__name__[0] in "aeiou" else "a"
            raise argparse.ArgumentTypeError(f"expected {article} {kind.__name__}, got {text!r}"
                                             ) from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return v
    return parse


def _positive(kind):
    return _number(kind, lambda v: 0 < v < math.inf, "> 0" + (" and finite" if kind is float
                                                            else ""))


_probability = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")


def _recompute(text):
    """--recompute: 'sqrt' or a number of steps >= 1 (fastlstm.LSTM's recompute)."""
    if text == "sqrt":
        return text
    try:
        steps = int(text)
    except ValueError:
        steps = 0
    if steps < 1:
        raise argparse.ArgumentTypeError(f"expected 'sqrt' or a number of steps >= 1, "
                                         f"got {text!r}")
    return steps
_nonnegative_int = _number(int, lambda v: v >= 0, ">= 0")


def build_parser():
    p = argparse.ArgumentParser(prog="fastlstm", description=__doc__)
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="train on a built-in task (default: the adding problem) "
                                     "or on your data")
    t.add_argument("--task", choices=["adding", "article", "sine"],
                   help="a built-in task (default: adding)")
    t.add_argument("--data", help="an .npz with x (N, T, I), y and optional lengths")
    t.add_argument("--seq-len", type=_positive(int), help="T (adding: 100; sine: 50)")
    t.add_argument("--hidden", type=_positive(int),
                   help="hidden units (adding, --data: 64; sine: 32; article: 3)")
    t.add_argument("--layers", type=_positive(int), help="stacked layers (default 1)")
    t.add_argument("--batch-size", type=_positive(int), help="sequences per step (default 32)")
    t.add_argument("--lr", type=_positive(float), help="learning rate (adding: 1e-2; --data: 3e-3; "
                                                         "sine: 1e-2; article: 0.01)")
    t.add_argument("--optimizer", choices=sorted(k.lower() for k in optim.OPTIMIZERS),
                   help="default adam (the article's run is plain gradient descent)")
    t.add_argument("--epochs", type=_positive(int), help="epochs over --data (default 10)")
    t.add_argument("--steps", type=_positive(int), dest="max_steps",
                   help="at most this many training steps (sine: 1500; article: 3000)")
    t.add_argument("--max-seconds", type=_positive(float),
                   help="stop training after this long (adding, sine: 540)")
    t.add_argument("--no-curriculum", action="store_const", const=False, dest="curriculum",
                   help="adding: train at the full T from the start")
    t.add_argument("--dtype", choices=["float32", "float64"],
                   help="default float32 (the article's run: float64)")
    t.add_argument("--seed", type=_nonnegative_int, help="default 0")
    t.add_argument("--backend", choices=["fastlstm", "reference"],
                   help="'reference' trains through the NumPy reference, to compare wall time")
    t.add_argument("--threads", type=_positive(int),
                   help="threads while training: the LSTM's batch split and BLAS "
                        "(default: the cores available)")
    for o in _options.OPTIONS:            # the layer's variants, as _options spells them
        if o.cli and o.cli[1] == "switch":
            t.add_argument(o.cli[0], action="store_const", const=True, help=o.help)
        elif o.cli:
            t.add_argument(o.cli[0], type=_probability, metavar="P", help=o.help)
    t.add_argument("--recompute", type=_recompute, metavar="K|sqrt",
                   help="keep the LSTM's state every K steps (sqrt: every sqrt(T)) and "
                        "recompute the rest in the backward: memory for time, same gradients")
    t.add_argument("--save", help="write the trained model to this .npz")
    t.add_argument("--plot", metavar="PATH",
                   help="adding, --data: draw the training curve to this image (.png, .svg; "
                        "needs pip install 'fastlstm[plot]')")
    t.add_argument("--export-onnx", metavar="PATH",
                   help="write the trained model as an ONNX graph (needs pip install "
                        "'fastlstm[onnx]')")
    t.add_argument("--distributed", action="store_const", const=True,
                   help="data-parallel over the ranks of an MPI job: mpiexec -n N fastlstm "
                        "train --distributed (needs pip install 'fastlstm[mpi]')")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true",
                   help="print a JSON summary as the last line")
    t.set_defaults(func=_train)

    b = sub.add_parser("bench", help="time fastlstm against the NumPy reference and torch")
    b.add_argument("--size", action="append", type=_parse_size,
                   help="a named size (seed, small, long, medium, large) or B,T,I,H; "
                        "repeatable; default: all named sizes")
    b.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    b.add_argument("--min-time", type=_positive(float), default=0.3,
                   help="seconds to spend timing each case (at least 5 runs)")
    b.add_argument("--rounds", type=_positive(int), default=3,
                   help="rounds of alternated worker processes (default 3)")
    b.add_argument("--layers", type=_positive(int), default=1,
                   help="stacked layers (default 1)")
    b.add_argument("--bidirectional", action="store_true")
    b.add_argument("--proj", type=_nonnegative_int, default=0,
                   help="proj_size (default 0: none)")
    b.add_argument("--profile", action="store_true",
                   help="split one fwd+bwd into input GEMM, recurrent GEMMs, weight-gradient "
                        "GEMMs and the elementwise rest")
    b.add_argument("--train", action="store_true",
                   help="time a whole training step (LSTM + linear head + MSE + Adam) instead")
    b.add_argument("--variants", action="store_true",
                   help="time each LSTM variant ("
                        + ", ".join(list(_options.bench_variants())[1:])
                        + ") against the plain layer and against a torch-autograd step "
                        "loop (default sizes: small and medium; dtype: float32)")
    b.add_argument("--torch-module", action="store_true",
                   help="a torch training loop (LSTM, nn.Linear, MSELoss, Adam) with nn.LSTM "
                        "against fastlstm.torch.LSTM (default sizes: seed, small, long, "
                        "medium, and 'packed': B=32, T=1000, I=32, H=64 as a PackedSequence "
                        "of lengths in [100, 1000])")
    b.add_argument("--distributed", action="store_true",
                   help="under mpiexec -n N: data-parallel training steps per second and "
                        "the Allreduce's share of a step")
    b.add_argument("--deepbench", action="store_true",
                   help="DeepBench's LSTM training (fwd+bwd) and inference (evaluation "
                        "forward, B = 1, 2, 4) sizes with H <= 2048, against torch "
                        "(default dtype: float32; takes about ten minutes)")
    b.add_argument("--stream", action="store_true",
                   help="per-step latency (p50, p99 over 10,000 steps) of a live stream: "
                        "fastlstm's Inference.stream, torch.nn.LSTM one step at a time, "
                        "onnxruntime on the exported model one step at a time")
    b.add_argument("--recompute", action="store_true",
                   help="time and memory of fwd+bwd with recompute = None, 10, sqrt and T/4 "
                        "at one --size (default: long; dtype: float32)")
    b.add_argument("--json", action="store_true", help="print JSON instead of a table")
    b.add_argument("--plot", metavar="PATH",
                   help="draw the ratios against torch per size and dtype, with their spread, "
                        "to this image (needs pip install 'fastlstm[plot]')")
    b.set_defaults(func=_bench)

    c = sub.add_parser("compile", help="compile the kernels ahead of time (an image, a "
                                       "cluster's shared cache, CI); a first run does it "
                                       "anyway, for what it needs")
    c.add_argument("--dtype", choices=["float32", "float64", "both"], default="both",
                   help="the dtypes to compile for (default: both)")
    c.set_defaults(func=_compile_command)
    return p


def _compile_command(args, parser):
    from .tasks import compile_kernels
    dtypes = ("float32", "float64") if args.dtype == "both" else (args.dtype,)
    for name, seconds in compile_kernels(dtypes).items():
        print(f"{name}: compiled or loaded in {seconds:.1f} s")
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args, parser)


if __name__ == "__main__":
    sys.exit(main())
