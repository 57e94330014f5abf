"""The ``fastlstm`` command line: ``fastlstm train`` and ``fastlstm bench``."""
import argparse
import json
import sys

import numpy as np


def _train(args):
    from .tasks import train_article
    dtype = np.dtype(args.dtype)
    say = (lambda *a, **k: None) if args.json else print
    say(f"Training the article's example (T=3, 2 features, 3 hidden units, logistic output, "
        f"gradient descent, lr={args.lr}) for {args.steps} steps, {dtype.name}:")
    fast = train_article(steps=args.steps, lr=args.lr, seed=args.seed, dtype=dtype,
                         report_every=None if args.json else max(args.steps // 10, 1), out=say)
    ref = train_article(steps=min(args.steps, 500), lr=args.lr, seed=args.seed, dtype=dtype,
                        backend="reference")
    summary = dict(task="article", seq_len=3, steps=args.steps, loss_first=fast["losses"][0],
                   loss_last=fast["losses"][-1], accuracy=fast["accuracy"],
                   step_us_fastlstm=fast["step_seconds"] * 1e6,
                   step_us_reference=ref["step_seconds"] * 1e6,
                   speedup=ref["step_seconds"] / fast["step_seconds"])
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}, "
              f"accuracy {summary['accuracy']:.0%}")
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
    t = sub.add_parser("train", help="train on a built-in task (default: the article's example)")
    t.add_argument("--task", choices=["article"], default="article")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--lr", type=float, default=0.01)
    t.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", action="store_true", help="print one JSON summary line")
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
