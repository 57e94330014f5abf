"""Pictures of a run: a training history (``plot_history``) and a ``fastlstm bench``
table's speed ratios against torch (``plot_bench``). matplotlib is an optional extra:
``pip install 'fastlstm[plot]'``."""
__all__ = ["plot_history", "plot_bench"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'fastlstm[plot]' (or pip "
                          "install matplotlib)") from None
    matplotlib.use("Agg")            # files only; no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_history(history, path, criterion=None, title=None):
    """Write the training curve of `history` to the image file `path`.

    Parameters
    ----------
    history : dict
        ``SequenceModel.fit``'s (loss and val_loss per epoch), or any dict with a
        ``loss`` list and optionally ``val_loss``, ``val_accuracy`` (a fraction),
        ``at`` (the step of each entry; default: epochs 1, 2, ...), ``x_label``, and
        ``T`` (a curriculum's sequence length at each entry, drawn on a second axis).
    path : str
        The image file (its suffix picks the format: .png, .svg, .pdf).
    criterion : (value, label), optional
        A level the validation accuracy must reach, drawn as a line on its panel.
    title : str, optional
    """
    plt = _pyplot()
    loss = list(history.get("loss", []))
    if not loss:
        raise ValueError("history has no 'loss' entries to plot")
    at = list(history.get("at") or range(1, len(loss) + 1))
    x_label = history.get("x_label", "epoch" if "at" not in history else "step")
    acc = history.get("val_accuracy") or []
    fig, axes = plt.subplots(1, 2 if acc else 1, figsize=(10 if acc else 6, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(at, loss, marker="o", ms=3, label="training loss")
    val = history.get("val_loss") or []
    if val:
        ax.plot(at[:len(val)], val, marker="s", ms=3, label="validation loss")
    if all(v > 0 for v in loss + list(val)):
        ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if history.get("T"):
        t_ax = ax.twinx()
        line, = t_ax.step(at[:len(history["T"])], history["T"], where="post", color="0.5",
                          alpha=0.6, label="T (curriculum)")
        t_ax.set_ylabel("T")
        handles.append(line)
        labels.append(line.get_label())
    ax.legend(handles, labels)
    if acc:
        ax = axes[0, 1]
        ax.plot(at[:len(acc)], acc, marker="o", ms=3, color="C2",
                label=history.get("accuracy_label", "validation accuracy"))
        if criterion is not None:
            ax.axhline(criterion[0], color="C3", ls="--", label=criterion[1])
        ax.set_xlabel(x_label)
        ax.set_ylabel("accuracy")
        ax.set_ylim(min(min(acc), criterion[0] if criterion else 1) - 0.05, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bench(result, path, title=None):
    """Write ``fastlstm bench``'s ratios against torch (the median of the per-round
    ratios, with bars from the lowest to the highest round) per size and dtype to `path`.
    `result`: what ``fastlstm.bench.run`` returns (``fastlstm bench --json``)."""
    plt = _pyplot()
    rows = [r for r in result["rows"] if "vs_torch" in r]
    if not rows:
        raise ValueError("the bench result has no ratios against torch to plot (is torch "
                         "installed?)")
    dtypes = sorted({r["dtype"] for r in rows})
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(sizes) * len(dtypes)), 4))
    width = 0.8 / len(dtypes)
    for k, dt in enumerate(dtypes):
        xs, ys, lo, hi = [], [], [], []
        for i, s in enumerate(sizes):
            r = next((r for r in rows if r["size"] == s and r["dtype"] == dt), None)
            if r is None:
                continue
            xs.append(i + (k - (len(dtypes) - 1) / 2) * width)
            ys.append(r["vs_torch"])
            lo.append(r["vs_torch"] - r.get("vs_torch_min", r["vs_torch"]))
            hi.append(r.get("vs_torch_max", r["vs_torch"]) - r["vs_torch"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=dt)
        for x, y, h in zip(xs, ys, hi):          # above the bar's spread
            ax.annotate(f"{y:.2f}x", (x, y + h), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_ylabel("torch time / fastlstm time")
    if max(r["vs_torch"] for r in rows) / max(min(r["vs_torch"] for r in rows), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_title(title or "fwd+bwd speed against torch.nn.LSTM (above 1: fastlstm faster)")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

