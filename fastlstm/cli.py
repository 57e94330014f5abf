"""The ``fastlstm`` command line: ``fastlstm train`` and ``fastlstm bench``."""
import argparse
import json
import sys

import numpy as np


def _train(args):
    if args.threads:
        # The built-in tasks' matrices are small: BLAS threads gain little on them
        # (adding, T=100: 51 s with 2 threads, 60 s with 1) and, when another process
        # is busy on the cores, spin against it (the same run took over 540 s).
        from threadpoolctl import threadpool_limits
        with threadpool_limits(limits=args.threads, user_api="blas"):
            return _train_run(args)
    return _train_run(args)


def _train_run(args):
    from . import tasks
    dtype = np.dtype(args.dtype)
    say = (lambda *a, **k: None) if args.json else (lambda *a, **k: print(*a, **k, flush=True))
    progress = not args.json and not args.no_progress
    common = dict(dtype=dtype, seed=args.seed, progress=progress, backend=args.backend)
    if args.data:
        say(f"Training on {args.data} ({args.backend}) ...")
        model, summary = tasks.train_data(args.data, hidden=args.hidden or 64, layers=args.layers,
                                          batch_size=args.batch_size, lr=args.lr or 3e-3,
                                          optimizer=args.optimizer, epochs=args.epochs,
                                          **common)
    elif args.task == "adding":
        T = args.seq_len or 100
        say(f"The adding problem (Hochreiter & Schmidhuber 1997) at T={T}: training until all "
            f"2560 validation sequences are within 0.03 ({args.backend}, "
            f"{'curriculum over T' if not args.no_curriculum else 'no curriculum'}, "
            f"at most {args.max_seconds:.0f} s) ...")
        model, summary = tasks.train_adding(
            seq_len=T, hidden=args.hidden or 64, layers=args.layers, batch_size=args.batch_size,
            lr=args.lr or 3e-3, optimizer=args.optimizer, max_seconds=args.max_seconds,
            max_steps=args.steps, curriculum=not args.no_curriculum, **common)
    elif args.task == "sine":
        say(f"Forecasting a noisy sum of sines, sequence to sequence ({args.backend}) ...")
        model, summary = tasks.train_sine(
            seq_len=args.seq_len or 50, hidden=args.hidden or 32, layers=args.layers,
            batch_size=args.batch_size, lr=args.lr or 1e-2, optimizer=args.optimizer,
            max_seconds=args.max_seconds, max_steps=args.steps or 1500, **common)
    else:
        return _train_article(args, say)
    if args.save:
        model.save(args.save)
        summary["saved"] = args.save
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0 if summary.get("criterion_met") in (True, None) else 1


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


def _train_article(args, say):
    from .tasks import train_article
    dtype = np.dtype(args.dtype) if args.dtype != "float32" else np.dtype(np.float64)
    steps = args.steps or 3000
    lr = args.lr or 0.01
    say(f"Training the article's example (T=3, 2 features, 3 hidden units, logistic output, "
        f"gradient descent, lr={lr}) for {steps} steps, {dtype.name}:")
    fast = train_article(steps=steps, lr=lr, seed=args.seed, dtype=dtype,
                         report_every=None if args.json else max(steps // 10, 1), out=say)
    ref = train_article(steps=min(steps, 500), lr=lr, seed=args.seed, dtype=dtype,
                        backend="reference")
    summary = dict(task="article", seq_len=3, steps=steps, sequences=steps * 8,
                   seconds=round(fast["step_seconds"] * steps, 3),
                   test_mse=None, test_accuracy=fast["accuracy"],
                   criterion_met=fast["accuracy"] == 1.0, loss_first=fast["losses"][0],
                   loss_last=fast["losses"][-1], step_us_fastlstm=fast["step_seconds"] * 1e6,
                   step_us_reference=ref["step_seconds"] * 1e6,
                   speedup=ref["step_seconds"] / fast["step_seconds"])
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}, "
              f"accuracy {summary['test_accuracy']:.0%}")
        print(f"median step: fastlstm {summary['step_us_fastlstm']:.1f} us, NumPy reference "
              f"{summary['step_us_reference']:.1f} us ({summary['speedup']:.1f}x); whole step "
              f"including the NumPy logistic head")
    return 0


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
    return text, (B, T, I, H)


def _bench(args):
    from . import bench
    sizes = dict(args.size) if args.size else dict(bench.SIZES)
    dtypes = ["float32", "float64"] if args.dtype == "both" else [args.dtype]
    progress = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.train:
        result = bench.train_table(sizes, dtypes, min_time=args.min_time, progress=progress)
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
                    print(f"  {impl:10} " + "  ".join(f"{k} {v:.3f}" for k, v in parts.items()))
        return 0
    layer = dict(num_layers=args.layers, bidirectional=args.bidirectional,
                 proj_size=args.proj)
    if args.layers > 1 or args.bidirectional or args.proj:
        say = print if not args.json else (lambda *a: None)
        say(f"{args.layers} layer(s), {'bidirectional' if args.bidirectional else 'one direction'}"
            f"{f', proj {args.proj}' if args.proj else ''} (the NumPy reference is one layer, "
            "one direction: left out)")
    result = bench.bench_table(sizes, dtypes, min_time=args.min_time, progress=progress,
                               **layer)
    print(json.dumps(result) if args.json else bench.format_table(result))
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="fastlstm", description=__doc__)
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="train on a built-in task (default: the adding problem) "
                                     "or on your data")
    t.add_argument("--task", choices=["adding", "article", "sine"], default="adding")
    t.add_argument("--data", help="an .npz with x (N, T, I), y and optional lengths")
    t.add_argument("--seq-len", type=int, help="T (adding: 100; sine: 50)")
    t.add_argument("--hidden", type=int, help="hidden units (adding: 64, sine: 32)")
    t.add_argument("--layers", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, help="learning rate (adding: 3e-3, sine: 1e-2, "
                                            "article: 0.01)")
    t.add_argument("--optimizer", choices=["adam", "adamw", "sgd", "rmsprop"], default="adam")
    t.add_argument("--epochs", type=int, default=10, help="epochs over --data")
    t.add_argument("--steps", type=int, help="at most this many training steps")
    t.add_argument("--max-seconds", type=float, default=540.0,
                   help="stop training after this long (default 540)")
    t.add_argument("--no-curriculum", action="store_true",
                   help="adding: train at the full T from the start")
    t.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--backend", choices=["fastlstm", "reference"], default="fastlstm",
                   help="'reference' trains through the NumPy reference, to compare wall time")
    t.add_argument("--threads", type=int, default=1,
                   help="BLAS threads while training (default 1: robust on a busy machine; "
                        "0 leaves BLAS's own default)")
    t.add_argument("--save", help="write the trained model to this .npz")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true",
                   help="print a JSON summary as the last line")
    t.set_defaults(func=_train)

    b = sub.add_parser("bench", help="time fastlstm against the NumPy reference and torch")
    b.add_argument("--size", action="append", type=_parse_size,
                   help="a named size (seed, small, long, medium, large) or B,T,I,H; "
                        "repeatable; default: all named sizes")
    b.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    b.add_argument("--min-time", type=float, default=0.3,
                   help="seconds to spend timing each case (at least 5 runs)")
    b.add_argument("--layers", type=int, default=1, help="stacked layers (default 1)")
    b.add_argument("--bidirectional", action="store_true")
    b.add_argument("--proj", type=int, default=0, help="proj_size (default 0: none)")
    b.add_argument("--profile", action="store_true",
                   help="split one fwd+bwd into input GEMM, recurrent GEMMs, weight-gradient "
                        "GEMMs and the elementwise rest")
    b.add_argument("--train", action="store_true",
                   help="time a whole training step (LSTM + linear head + MSE + Adam) instead")
    b.add_argument("--json", action="store_true", help="print JSON instead of a table")
    b.set_defaults(func=_bench)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
