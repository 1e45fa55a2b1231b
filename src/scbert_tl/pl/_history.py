"""``scbert.pl.history``: loss and validation metrics per epoch of a fine-tuning or pretraining run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._utils import finish, new_axes, plot_doc

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .._scbert import ScBERT


@plot_doc()
def history(model: ScBERT, *, stage: str = "finetune", ax: Axes | None = None, show: bool | None = None) -> Axes | None:
    """Training loss and validation metrics per epoch, with the selected epoch marked.

    Parameters
    ----------
    model
        A model returned by :func:`scbert_tl.tl.finetune` or :func:`scbert_tl.tl.pretrain` (or loaded
        with its history).
    stage
        Which records to show: ``"finetune"`` or ``"pretrain"`` (a model keeps both).
    {ax_show}

    Returns
    -------
    The Axes (losses on the left axis, metrics on a twin right axis), when not shown.
    """
    records = [r for r in model.history if "epoch" in r and r.get("stage", "finetune") == stage]
    if not records:
        raise ValueError(f"This model has no {stage} history (it was not trained so in this package).")
    ax = new_axes(ax, (6, 4))
    epochs = [r["epoch"] for r in records]
    for key, style in (("train_loss", "-"), ("val_loss", "--")):
        if key in records[0]:
            ax.plot(epochs, [r[key] for r in records], style, color="C0", label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    metrics = [k for k in ("val_accuracy", "val_macro_f1", "val_balanced_probability") if k in records[0]]
    lines, labels = ax.get_legend_handles_labels()
    if metrics:
        right = ax.twinx()
        for i, key in enumerate(metrics):
            right.plot(epochs, [r[key] for r in records], color=f"C{i + 1}", label=key.replace("_", " "))
        right.set_ylabel("validation metric")
        right.set_ylim(0, 1.02)
        more = right.get_legend_handles_labels()
        lines, labels = lines + more[0], labels + more[1]
    selected = [r["epoch"] for r in records if r.get("selected")]
    if selected:
        ax.axvline(selected[0], color="grey", linestyle=":", label="selected")
        lines.append(ax.lines[-1])
        labels.append("selected epoch")
    ax.legend(lines, labels, loc="center right", fontsize="small")
    return finish(ax, show)
