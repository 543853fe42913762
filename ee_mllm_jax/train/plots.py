"""The loss curve a run leaves in its workdir (loss.png): train loss (and its running mean) and
val loss on a log axis (a linear one is all step 0's loss), the val answer accuracy on a second axis."""

from __future__ import annotations

import numpy as np


def loss_curve(path: str, history: list[dict], evals: list[dict]):
  """Writes the curve of `history` (metrics.jsonl's step records) and `evals` (its eval records)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = loss_figure(history, evals)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def loss_figure(history: list[dict], evals: list[dict]):
  """The figure `loss_curve` writes (its first axes: the losses)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  steps = [h["step"] for h in history]
  losses = [h["loss"] for h in history]
  ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="train loss")
  if len(losses) >= 10:
    k = max(len(losses) // 20, 2)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1:], smooth, color="tab:blue", lw=2, label=f"train loss ({k}-step mean)")
  if evals:
    ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", color="tab:orange", label="val loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (log scale)")
  ax.set_yscale("log", nonpositive="mask")
  _plain_log_labels(ax, ticker)
  ax.grid(alpha=0.3)
  ax.grid(alpha=0.12, which="minor")
  if evals and evals[-1].get("val_accuracy") is not None:
    acc = ax.twinx()
    acc.plot([e["step"] for e in evals], [100 * e["val_accuracy"] for e in evals], "s--", color="tab:green",
             label="val answer accuracy (%)")
    acc.set_ylabel("val answer accuracy (%)")
    acc.set_ylim(0, 100)
    acc.legend(loc="center right")
  ax.legend(loc="upper right")
  fig.tight_layout()
  return fig


def _plain_log_labels(ax, ticker):
  """Plain numbers (0.3, 2, 6) on the log y axis: at every tick when it spans under a decade,
  else at 1, 2 and 5 (at 1 alone over three decades and more)."""
  def label(value, _):
    low, high = ax.get_ylim()
    keep = "123456789" if high < 10 * low else "125" if high < 1000 * low else "1"
    return f"{value:g}" if f"{value:.0e}"[0] in keep else ""
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(label))
  ax.yaxis.set_minor_formatter(ticker.FuncFormatter(label))
