import numpy as np

from moekit.train import plots


def test_expert_load_columns_sit_over_their_steps_when_log_points_are_uneven(tmp_path, monkeypatch):
    """Log points are uneven after a --stop-at off the log interval or a resume with another
    train.log_every. Each heatmap column must be drawn over its own step (the loss plot's x axis); they
    were spread evenly between the first and last step, so step 2 showed step 1's load, and so on."""
    steps, shares = [1, 2, 3, 10, 20], [0.1, 0.2, 0.3, 0.4, 0.45]  # expert 0's share of one layer's tokens
    records = [{"kind": "train", "step": s, "moe": {"tokens_per_expert": [[100 * a, 100 * (1 - a)]]}}
               for s, a in zip(steps, shares)]
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)  # keep the figure to read its pixels
    plots.plot_expert_load(records, tmp_path / "load.png")
    fig = figures[0]
    ax = fig.axes[0]
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())
    colours = (ax.images + ax.collections)[0]
    for step, share in zip(steps, shares):
        x, y = ax.transData.transform((step, 0))  # row 0: layer 0, expert 0
        got = pixels[int(round(pixels.shape[0] - y)), int(round(x)), :3] / 255
        want = np.asarray(colours.to_rgba(2 * share)[:3])
        assert np.abs(got - want).max() < 0.02, (step, got, want)
