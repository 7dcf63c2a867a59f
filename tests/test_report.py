"""The run report: every plot of a tiny LP-FT run and of a probe-only run, read back from its matplotlib figure
(axis labels, legend entries, plotted data, no text outside the image), report.md and the self-contained
report.html, `finetune report RUN` rewriting the same bytes, and the train/validation gap sentence."""

from __future__ import annotations

import base64
import re
import shutil

import numpy as np
import pytest
from imagefolders import COLOURS, make_image_folder
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from finetune import runs
from finetune.cli import main
from finetune.report import gap_sentence, write_report
from finetune.train import fit

EPOCH_PLOTS = {"curves.png", "lr.png"}
PREDICTION_PLOTS = {"confusion.png", "per_class.png", "wrong.png", "reliability.png"}
WRITTEN = ("report.md", "report.html", "probe.png", *EPOCH_PLOTS, *PREDICTION_PLOTS)


def _folder(root):
    """train/ and val/ of three colours, plus a red image filed under val/blue: a wrong label that the model
    should predict as red with a high probability."""
    folder = make_image_folder(root, per_class=8, split=True)
    pixels = np.clip(np.array(COLOURS["red"]) + np.random.default_rng(1).normal(0, 30, (48, 48, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(folder / "val" / "blue" / "mislabelled.png")
    return folder


def _fit(folder, out, recipe, **overrides):
    return fit(folder, recipe, model="test_efficientnet", pretrained=False, out=out, progress=False,
               num_workers=0, export=None, overrides={"head_stages": 2, **overrides})


@pytest.fixture(scope="module")
def lpft(tmp_path_factory):
    """An LP-FT run (probe, then 2 Lightning epochs of 9 steps: the learning rate is logged at 3 of them) and
    the bytes of what its fit wrote."""
    root = tmp_path_factory.mktemp("report")
    result = _fit(_folder(root / "data"), root / "run", "large-different", epochs=3, freeze_epochs=1, batch_size=2)
    return result, {name: (result.run_dir / name).read_bytes() for name in WRITTEN}


@pytest.fixture(scope="module")
def figures(lpft):
    """The LP-FT run's report written again, for its figures."""
    return write_report(lpft[0].run_dir).figures


@pytest.fixture(scope="module")
def probe_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-probe")
    return _fit(_folder(root / "data"), root / "run", "small-similar")


def _texts(fig):
    """Every visible text of the figure: titles, axis and tick labels, legends, cell numbers."""
    texts = [fig._suptitle] if fig._suptitle else []
    for ax in fig.axes:
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        ticks = [t for t in ax.get_xticklabels() if x0 <= t.get_position()[0] <= x1]  # the ones drawn
        ticks += [t for t in ax.get_yticklabels() if y0 <= t.get_position()[1] <= y1]
        texts += [ax.title, *ax.texts] + ([ax.xaxis.label, ax.yaxis.label, *ticks] if ax.axison else [])
        texts += ax.get_legend().get_texts() if ax.get_legend() else []
    texts += [t for legend in fig.legends for t in legend.get_texts()]
    return [t for t in texts if t.get_visible() and t.get_text()]


def _nothing_clipped(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box = fig.bbox.padded(1)
    for text in _texts(fig):
        extent = text.get_window_extent(canvas.get_renderer())
        assert box.contains(extent.x0, extent.y0) and box.contains(extent.x1, extent.y1), text.get_text()


def _legend(fig):
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + fig.legends
    return {t.get_text() for legend in legends for t in legend.get_texts()}


def _labelled(ax):
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), ax


def test_lp_ft_report_draws_every_plot_labelled_with_data(lpft, figures):
    result, _ = lpft
    assert set(figures) == {"probe.png", *EPOCH_PLOTS, *PREDICTION_PLOTS}
    for name, fig in figures.items():
        _nothing_clipped(fig)
        assert (result.run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    loss, acc = figures["curves.png"].axes
    for ax in (loss, acc):
        _labelled(ax)
        assert all(np.isfinite(line.get_ydata()).any() for line in ax.get_lines() if line.get_marker() != "None")
    assert {"train (augmented)", "validation", "linear probe: train", "linear probe: validation",
            "probe | fine-tuning"} <= _legend(figures["curves.png"])
    assert [round(x) for x in acc.get_lines()[0].get_xdata()] == [1, 2]  # the two fine-tuning epochs

    (lr,) = figures["lr.png"].axes
    _labelled(lr)
    assert lr.get_yscale() == "log"
    groups = [line for line in lr.get_lines() if line.get_label() in _legend(figures["lr.png"])
              and not line.get_label().startswith("end of")]
    assert groups[0].get_label() == "head" and any(g.get_label() == "stage 0 (stem)" for g in groups)
    assert all(len(g.get_xdata()) == 3 and (np.asarray(g.get_ydata()) > 0).all() for g in groups)
    head, stem = groups[0].get_ydata(), next(g for g in groups if "stem" in g.get_label()).get_ydata()
    assert (np.asarray(stem) < np.asarray(head)).all()  # layer-wise decay: the stem learns slowest

    (probe,) = figures["probe.png"].axes
    _labelled(probe)
    assert {"train", "validation"} <= _legend(figures["probe.png"])
    assert any(t.startswith("chosen: ") for t in _legend(figures["probe.png"]))


def test_prediction_plots_show_the_validation_predictions(figures):
    classes = ["blue", "green", "red"]

    matrix, _colorbar = figures["confusion.png"].axes
    _labelled(matrix)
    rates = np.asarray(matrix.get_images()[0].get_array())
    assert rates.shape == (3, 3) and np.allclose(rates.sum(axis=1), 1)
    assert [t.get_text() for t in matrix.get_yticklabels()] == classes
    assert rates[0, 2] > 0  # the red image filed under blue

    (scores,) = figures["per_class.png"].axes
    _labelled(scores)
    assert {"precision", "recall", "F1"} == _legend(figures["per_class.png"])
    bars = [p.get_width() for p in scores.patches]
    assert len(bars) == 3 and all(0 <= b <= 1 for b in bars)
    assert all(any(c in t.get_text() for c in classes) for t in scores.get_yticklabels())

    wrong = figures["wrong.png"]
    shown = [ax for ax in wrong.axes if ax.get_images()]
    assert shown and all(ax.get_images()[0].get_array().size for ax in shown)
    assert "true: blue\npredicted: red" in shown[0].get_title() and "p=" in shown[0].get_title()

    before, after = figures["reliability.png"].axes
    for ax in (before, after):
        _labelled(ax)
        assert "ECE" in ax.get_title() and ax.patches
        assert all(0 <= p.get_y() + p.get_height() <= 1.001 for p in ax.patches)
    assert "before" in before.get_title() and "after temperature scaling" in after.get_title()
    assert {"accuracy", "perfectly calibrated"} <= _legend(figures["reliability.png"])


def test_report_md_and_html_show_every_plot_and_stand_alone(lpft, figures):
    run = lpft[0].run_dir
    md = (run / "report.md").read_text()
    for name in figures:
        assert f"![{name}]({name})" in md
    assert re.search(r"\*\*(Overfitting|Underfitting|Fine)\*\*: at the kept epoch", md) or "for the probed head" in md
    assert "| blue | red | 1 |" in md  # the most confused pair
    assert "val/blue/mislabelled.png | blue | red |" in md  # the confidently wrong image, named
    assert "validation (used for selection)" in md and 'name = "large-different"' in md
    html = (run / "report.html").read_text()
    inlined = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)">', html)
    assert {name for name, _ in inlined} == set(figures)
    assert all(base64.b64decode(data) == (run / name).read_bytes() for name, data in inlined)
    assert len(re.findall(r"src=", html)) == len(inlined) and "http" not in html.lower().replace("http-equiv", "")


def test_val_predictions_hold_the_files_in_the_order_of_the_logits(lpft, probe_only):
    for result in (lpft[0], probe_only):
        saved = runs.read_val_predictions(result.run_dir)
        classes = result.summary["classes"]
        assert saved.logits.shape == (len(saved.labels), 3) == (result.summary["val_images"], 3)
        assert [f.split("/")[-2] for f in saved.files] == [classes[i] for i in saved.labels]
        assert all((saved.root / f).is_file() for f in saved.files)
        assert saved.logits.argmax(1).tolist().count(2) >= 3  # red's 2 images and the mislabelled one


def test_learning_rates_are_logged_per_group_once(lpft):
    rates = runs.read_step_metrics(lpft[0].run_dir / "metrics.csv", "lr/")
    assert "head" in rates and "stage0" in rates and not any(name.endswith(".no_decay") for name in rates)


def test_probe_only_report_says_there_are_no_epochs_and_shows_the_sweep(probe_only):
    report = write_report(probe_only.run_dir)
    assert set(report.figures) == {"probe.png", *PREDICTION_PLOTS}
    assert not (probe_only.run_dir / "curves.png").exists() and not (probe_only.run_dir / "lr.png").exists()
    md = (probe_only.run_dir / "report.md").read_text()
    assert "No epochs: the head was fitted by L-BFGS" in md and "![probe.png](probe.png)" in md
    assert "for the probed head" in md


def test_finetune_report_rewrites_what_fit_wrote(lpft, capsys):
    result, written = lpft
    assert main(["report", str(result.run_dir)]) == 0
    printed = capsys.readouterr().out.split()
    assert {p.rsplit("/", 1)[-1] for p in printed} == set(WRITTEN)
    for name, data in written.items():
        assert (result.run_dir / name).read_bytes() == data, name


def test_finetune_report_of_a_folder_that_is_not_a_finished_run_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path) in err and "summary.json" in err


def test_a_moved_data_folder_is_named_instead_of_failing(lpft, tmp_path):
    run = shutil.copytree(lpft[0].run_dir, tmp_path / "run")
    saved = runs.read_val_predictions(run)
    np.savez_compressed(run / runs.VAL_PREDICTIONS, logits=saved.logits, labels=saved.labels,
                        files=np.array(saved.files), root=np.array(str(tmp_path / "gone")))
    (run / "wrong.png").unlink()
    report = write_report(run)
    md = (run / "report.md").read_text()
    assert "wrong.png" not in report.figures and not (run / "wrong.png").exists()
    assert f"`{tmp_path / 'gone'}` is not there any more" in md and "val/blue/mislabelled.png" in md


def _summary(train_acc, val_acc, best_epoch=2, kept="trained"):
    return {"best_epoch": best_epoch, "kept": kept, "val": {"acc": val_acc}, "probe": None}


@pytest.mark.parametrize(("train", "val", "val_losses", "verdict", "advice"), [
    (0.99, 0.80, [0.9, 0.7, 0.6], "Overfitting", "augmentation"),
    (0.90, 0.88, [0.5, 0.4, 0.6], "Overfitting", "early stopping"),  # the validation loss turned up
    (0.60, 0.59, [1.2, 1.1, 1.0], "Underfitting", "more epochs"),
    (0.95, 0.93, [0.5, 0.4, 0.35], "Fine", "more images"),
])
def test_gap_sentence_reads_the_kept_epoch(train, val, val_losses, verdict, advice):
    rows = [{"epoch": e, "train/acc": train, "train/loss": 1.0 - 0.1 * e, "val/loss": loss}
            for e, loss in enumerate(val_losses)]
    sentence = gap_sentence(_summary(train, val), rows, {})
    assert sentence.startswith(f"**{verdict}**") and advice in sentence and f"{train:.3f}" in sentence


def test_gap_sentence_of_a_probe_reads_its_chosen_weight_decay():
    summary = {"kept": "trained", "best_epoch": None, "val": {"acc": 0.70},
               "probe": {"weight_decay": 0.1, "sweep": [{"weight_decay": 0.01, "train_acc": 1.0, "val_acc": 0.6},
                                                        {"weight_decay": 0.1, "train_acc": 0.72, "val_acc": 0.7}]}}
    sentence = gap_sentence(summary, [], {"head": "linear"})
    assert sentence.startswith("**Underfitting**") and "0.720" in sentence and "--recipe large-different" in sentence
