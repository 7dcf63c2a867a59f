"""Generated bad values for every option of every command: each is a user error, rejected before any model is
built or anything is written. 360 examples in all (fit 120, doctor and predict 50 each, export and evaluate 40,
inspect and recipes/models 30).

For each example: exit status 2, no traceback, the toolkit's message on one line (argparse's usage lines are
allowed for its own errors), nothing on stdout, and nothing new or changed under the sandbox (data folder,
weights cache, working directory: no ``runs/``). Only the one generated value is wrong; the rest of the
command line is valid (a tiny real image folder, a folder that looks like a run), so an example that got
through the checks would go on to load a model, which the sandbox cannot do fast: such a bug fails the deadline
or the test instead of passing unnoticed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagefolders import make_image_folder

from finetune import recipes
from finetune.arguments import MAX_PROCESSES, MAX_SEED
from finetune.cli import main
from finetune.formats import FORMAT_ALIASES as EXPORT_ALIASES
from finetune.formats import FORMATS as EXPORT_FORMATS

# 1 s per example: a rejection takes milliseconds; anything that imports torch or builds a model takes seconds.
FUZZ = settings(deadline=1000, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=examples)


# --- the sandbox: built once, checked after every example ---------------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    make_image_folder(root / "data", classes=2, per_class=2, size=8)
    for name in ("cache", "cwd", "empty"):
        (root / name).mkdir()
    (root / "run").mkdir()  # looks like a run (the checks read names only; it is never loaded)
    (root / "run" / "config.json").write_text("{}")
    (root / "run" / "model.safetensors").write_bytes(b"")
    (root / "labels.csv").write_text("red/0.png,red\nred/1.png,red\ngreen/0.png,green\ngreen/1.png,green\n")
    (root / "notes.txt").write_text("not an image folder, not a model\n")
    (root / "bad.toml").write_text('lr = "fast"\n')
    (root / "latin1.toml").write_bytes("lr = 1e-3 # caf\xe9\n".encode("latin-1"))
    return root


@pytest.fixture
def sandbox(tree: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FINETUNE_CACHE", str(tree / "cache"))
    monkeypatch.chdir(tree / "cwd")
    return tree


def _snapshot(root: Path) -> set[tuple[str, int, int]]:
    return {(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _assert_rejected(argv: list[str], root: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    before = _snapshot(root)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors: bad choice, type=int failure, missing value
        code = e.code
    captured = capsys.readouterr()
    context = f"argv={argv!r}\nstdout={captured.out!r}\nstderr={captured.err!r}"
    assert code == 2, context
    assert "Traceback" not in captured.out + captured.err, context
    assert captured.out == "", context
    lines = captured.err.strip().splitlines()
    if lines and lines[0].startswith("usage:"):
        assert ": error: " in lines[-1], context
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), context
    assert not (root / "cwd" / "runs").exists(), context
    assert _snapshot(root) == before, context


# --- bad values -----------------------------------------------------------------------------------------------
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
NAME = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=10)


def _parses(kind: type, text: str) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


NOT_AN_INT = st.one_of(st.sampled_from(["nan", "inf", "1.5", "1e3", "", "abc", "0x10", "3 dogs"]),
                       TEXT.filter(lambda s: not _parses(int, s)))
NOT_A_FLOAT = st.one_of(st.sampled_from(["", "abc", "0,2", "1/5", "20%"]), TEXT.filter(lambda s: not _parses(float, s)))
NON_FINITE = st.sampled_from(["nan", "inf", "-inf", "NaN", "Infinity", "1e400"])


def below(limit: int) -> st.SearchStrategy[str]:
    """Integers < limit, as typed, and text that is no integer at all."""
    return st.one_of(st.integers(max_value=limit - 1).map(str), NOT_AN_INT)


def above(limit: int) -> st.SearchStrategy[str]:
    return st.integers(min_value=limit + 1).map(str)


POSITIVE_INT = below(1)
NON_NEGATIVE_INT = below(0)
PROCESSES = st.one_of(below(0), above(MAX_PROCESSES))
SEED = st.one_of(below(0), above(MAX_SEED))
FRACTION = st.one_of(st.floats(max_value=0).map(repr), st.floats(min_value=1).map(repr), NON_FINITE, NOT_A_FLOAT)


def missing(root: Path) -> st.SearchStrategy[str]:
    return NAME.map(lambda name: str(root / "missing" / name))


def a_file(root: Path) -> st.SearchStrategy[str]:
    return st.sampled_from([str(root / "labels.csv"), str(root / "notes.txt"), str(root / "data" / "red" / "0.png")])


def a_folder(root: Path) -> st.SearchStrategy[str]:
    return st.sampled_from([str(root / "data"), str(root / "empty"), str(root / "cwd")])


def not_a_folder(root: Path) -> st.SearchStrategy[str]:
    return st.one_of(missing(root), a_file(root))


def not_a_file(root: Path) -> st.SearchStrategy[str]:
    return st.one_of(missing(root), a_folder(root))


def not_one_of(allowed) -> st.SearchStrategy[str]:
    return TEXT.filter(lambda s: s not in allowed)


def bad_formats() -> st.SearchStrategy[str]:
    known = {*EXPORT_FORMATS, *EXPORT_ALIASES}
    item = TEXT.filter(lambda s: "," not in s and s.strip() and s.strip().lower() not in known)
    good = st.sampled_from(sorted(known))
    return st.one_of(
        st.lists(st.one_of(good, item), min_size=1, max_size=3).flatmap(
            lambda items: item.map(lambda bad: ",".join([*items, bad]))),
        st.sampled_from([",", " , ", "pickle", "torchscript,pickle", "onnx;pt2"]),
    )


# --set: fields and values no built-in recipe accepts
RECIPE_FIELDS = {f.name for f in dataclasses.fields(recipes.Recipe)}
BAD_OVERRIDES = st.one_of(
    st.tuples(st.sampled_from(["epochs", "batch_size", "head_stages"]), below(1)),
    st.tuples(st.sampled_from(["freeze_epochs", "early_stopping", "feature_views"]), below(0)),
    st.tuples(st.sampled_from(["lr", "backbone_lr_scale", "layer_decay"]),
              st.one_of(st.floats(max_value=0).map(repr), st.floats(min_value=1, exclude_min=True).map(repr))),
    st.tuples(st.sampled_from(["hflip", "min_lr_ratio"]),
              st.one_of(st.floats(max_value=0, exclude_max=True).map(repr),
                        st.floats(min_value=1, exclude_min=True).map(repr))),
    st.tuples(st.sampled_from(["head_dropout", "drop_path", "label_smoothing", "momentum"]),
              st.one_of(st.floats(max_value=0, exclude_max=True).map(repr), st.floats(min_value=1).map(repr))),
    st.tuples(st.sampled_from(["weight_decay", "warmup_epochs", "color_jitter", "lr", "scale_min"]), NON_FINITE),
    st.tuples(st.sampled_from(["lr", "weight_decay", "hflip"]), NOT_A_FLOAT),
    st.tuples(st.sampled_from(["pretrained", "cached_features"]),
              TEXT.filter(lambda s: s.strip().lower() not in ("true", "false", "1", "0", "yes", "no"))),
    st.tuples(st.just("optimizer"), TEXT.filter(lambda s: s.strip() not in recipes.OPTIMIZERS)),
    st.tuples(st.just("head"), TEXT.filter(lambda s: s.strip() not in recipes.HEADS)),
    st.tuples(NAME.filter(lambda s: s not in RECIPE_FIELDS), TEXT),
).map(lambda kv: f"{kv[0]}={kv[1]}")
BAD_SET = st.one_of(BAD_OVERRIDES, TEXT.filter(lambda s: "=" not in s), st.sampled_from(["=1", " =3e-4"]))


def bad_recipe(root: Path) -> st.SearchStrategy[str]:
    allowed = {"auto", *recipes.names()}
    return st.one_of(
        NAME.filter(lambda s: s not in allowed),
        a_folder(root),
        missing(root).map(lambda p: p + ".toml"),
        st.sampled_from([str(root / "bad.toml"), str(root / "latin1.toml")]),
    )


def options(*pairs) -> st.SearchStrategy[list[str]]:
    """One of (option, bad values) as a command-line fragment: --option=value."""
    return st.one_of(*(values.map(lambda v, o=option: [f"{o}={v}"]) for option, values in pairs))


# --- one test per command ---------------------------------------------------------------------------------------
@fuzz(120)
@given(data=st.data())
def test_fit_rejects_bad_values(data, sandbox, capsys):
    root = sandbox
    valid = ["fit", str(root / "data"), "--no-progress"]
    bad = data.draw(st.one_of(
        not_a_folder(root).map(lambda p: ["fit", p, "--no-progress"]),
        options(("--val-fraction", FRACTION), ("--seed", SEED), ("--workers", PROCESSES),
                ("--epochs", POSITIVE_INT), ("--batch-size", POSITIVE_INT), ("--set", BAD_SET),
                ("--recipe", bad_recipe(root)), ("--export", bad_formats()),
                ("--weights", not_a_file(root)), ("--split", not_a_file(root)), ("--labels", not_a_file(root)),
                ("--out", st.one_of(a_file(root), st.just(str(root / "data")))),
                ("--domain", not_one_of(("auto", "similar", "different"))),
                ("--precision", not_one_of(("auto", "bf16", "fp32", "16"))),
                ("--feature-backend", not_one_of(("auto", "onnx", "torch")))).map(lambda o: valid + o),
    ))
    _assert_rejected(bad, root, capsys)


@fuzz(30)
@given(data=st.data())
def test_inspect_rejects_bad_values(data, sandbox, capsys):
    root = sandbox
    bad = data.draw(st.one_of(
        not_a_folder(root).map(lambda p: ["inspect", p]),
        options(("--labels", not_a_file(root))).map(lambda o: ["inspect", str(root / "data"), *o]),
    ))
    _assert_rejected(bad, root, capsys)


@fuzz(50)
@given(data=st.data())
def test_doctor_rejects_bad_values(data, sandbox, capsys):
    root = sandbox
    valid = ["doctor", str(root / "data"), "--no-progress", "--quarantine"]  # a miss would move files: seen
    bad = data.draw(st.one_of(
        not_a_folder(root).map(lambda p: ["doctor", p, "--quarantine"]),
        options(("--val-fraction", FRACTION), ("--seed", SEED), ("--workers", PROCESSES),
                ("--max-rows", NON_NEGATIVE_INT), ("--labels", not_a_file(root))).map(lambda o: valid + o),
    ))
    _assert_rejected(bad, root, capsys)


@fuzz(40)
@given(data=st.data())
def test_export_rejects_bad_values(data, sandbox, capsys):
    root = sandbox
    valid = ["export", str(root / "run")]
    bad = data.draw(st.one_of(
        st.one_of(not_a_folder(root), a_folder(root)).map(lambda p: ["export", p]),  # no model in those folders
        options(("--format", bad_formats()), ("--out", a_file(root))).map(lambda o: valid + o),
        missing(root).map(lambda p: [*valid, "--images", p]),
    ))
    _assert_rejected(bad, root, capsys)


def _not_a_model(root: Path) -> st.SearchStrategy[str]:
    """Neither a run/export folder (no config.json) nor an .onnx file."""
    return st.one_of(missing(root), a_file(root), a_folder(root), missing(root).map(lambda p: p + ".onnx"))


@fuzz(50)
@given(data=st.data())
def test_predict_rejects_bad_values(data, sandbox, capsys):
    root = sandbox
    image = str(root / "data" / "red" / "0.png")
    valid = ["predict", str(root / "run"), image]
    bad = data.draw(st.one_of(
        _not_a_model(root).map(lambda p: ["predict", p, image]),
        options(("--top-k", POSITIVE_INT), ("--batch-size", POSITIVE_INT), ("--threads", PROCESSES),
                ("--output", st.one_of(a_folder(root), missing(root).map(lambda p: p + "/out.csv"))),
                ("--format", not_one_of(("table", "csv", "json"))),
                ("--backend", not_one_of(("auto", "onnx", "torch")))).map(lambda o: valid + o),
    ))
    _assert_rejected(bad, root, capsys)


@fuzz(40)
@given(data=st.data())
def test_evaluate_rejects_bad_values(data, sandbox, capsys):
    root = sandbox
    folder = str(root / "data")
    valid = ["evaluate", str(root / "run"), folder]
    bad = data.draw(st.one_of(
        _not_a_model(root).map(lambda p: ["evaluate", p, folder]),
        not_a_folder(root).map(lambda p: ["evaluate", str(root / "run"), p]),
        options(("--batch-size", POSITIVE_INT), ("--out", a_file(root)),
                ("--backend", not_one_of(("auto", "onnx", "torch")))).map(lambda o: valid + o),
    ))
    _assert_rejected(bad, root, capsys)


@fuzz(30)
@given(data=st.data())
def test_recipes_and_models_reject_bad_values(data, sandbox, capsys):
    root = sandbox
    bad = data.draw(st.one_of(
        bad_recipe(root).map(lambda name: ["recipes", name]),
        st.one_of(NAME, st.just("--json")).map(lambda extra: ["models", extra]),
    ))
    _assert_rejected(bad, root, capsys)


def test_head_stages_beyond_the_backbone_is_a_user_error(sandbox, capsys):
    """A value every recipe accepts but this backbone cannot do: its check needs the backbone itself, so it
    comes after the imports, but still before the run folder is written."""
    root = sandbox
    data_before = _snapshot(root / "data")
    argv = ["fit", str(root / "data"), "--recipe", "small-different", "--model", "test_efficientnet",
            "--no-pretrained", "--set", "head_stages=9", "--workers", "0", "--no-progress", "--no-export"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err and "head_stages" in captured.err
    assert not (root / "cwd" / "runs").exists() and _snapshot(root / "data") == data_before
