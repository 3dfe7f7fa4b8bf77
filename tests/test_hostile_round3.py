"""Bad input, round three: paths of every kind, names that would leave --out, late refusals made early, read-only
folders, signals at any moment, silent choices said, and error text printed as written.  Each case: one line
naming the file, setting or run, exit 2 (130 for SIGINT, 143 for SIGTERM), nothing lost.  Tests that involve another
process wait for a condition (a file, a line, a signal handler in place), never a fixed time."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from featstore.synthetic import make_pair, make_store
from tests.test_runner import ROOT, subprocess_env

SHORT = ["--set", "steps=8", "--set", "stage1_steps=4", "--set", "batch_source=4", "--set", "batch_target=4",
         "--set", "validators=false", "--quiet"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("feat"), "i3d", spatial=False, n=24, channels=8)


def run(*args, cwd=None):
    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


def one_line(res, *words, code=2):
    assert res.exit_code == code, res.output
    text = " ".join(res.output.split())
    assert "Traceback" not in res.output and all(w in text for w in words), res.output


def wait_for(cond, what, timeout=600):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------------------
# paths


def test_relative_paths_with_dotdot_symlinks_and_spaces_work(root, tmp_path):
    work = tmp_path / "a dir" / "work"
    work.mkdir(parents=True)
    feats = tmp_path / "my feats"
    shutil.copytree(root, feats)
    (tmp_path / "linked").symlink_to(feats)
    rel = Path("..") / ".." / "my feats" / "i3d"
    res = run("train", "--method", "source_only", "--source", rel / "S_train.zarr", "--target", rel / "T_train.zarr",
              "--eval", rel / "T_test.zarr", "--out", "../runs", *SHORT, cwd=work)
    assert res.exit_code == 0, res.output
    for name, split in (("S_train", "K1_train"), ("T_train", "K2_train"), ("T_test", "K2_test")):
        shutil.copytree(feats / "i3d" / f"{name}.zarr", feats / "i3d" / f"{split}.zarr")
    res = run("train", "--method", "source_only", "--source", "K1", "--target", "K2", "--features-root",
              "../../linked", "--out", "../runs", *SHORT, cwd=work)  # a root named through .. and a symlink
    assert res.exit_code == 0, res.output
    res = run("inspect", Path("..") / ".." / "linked" / "i3d" / "S_train.zarr", cwd=work)
    assert res.exit_code == 0 and "24 done" in res.output, res.output
    spec = work / "s.toml"
    spec.write_text('methods = ["source_only"]\npairs = [["../../my feats/i3d/S_train.zarr", '
                    '"../../linked/i3d/T_train.zarr", "../../my feats/i3d/T_test.zarr"]]\nout = "../sweep"\n'
                    'set = {steps = 8, stage1_steps = 4, batch_source = 4, batch_target = 4, validators = false}\n')
    res = run("sweep", spec, "--quiet", cwd=work)
    assert res.exit_code == 0, res.output


def test_a_method_file_in_a_sweep_spec_is_found_beside_the_spec(root, tmp_path):
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "mine.py").write_text("from adapt.methods.dann import DANN\n\n\nclass Mine(DANN):\n    name = 'mine'\n")
    b = root / "i3d"
    (specs / "s.toml").write_text(
        f'methods = ["mine.py"]\npairs = [["{b}/S_train.zarr", "{b}/T_train.zarr", "{b}/T_test.zarr"]]\n'
        f'out = "{tmp_path}/o"\nset = {{steps = 8, stage1_steps = 4, batch_source = 4, batch_target = 4, '
        f'validators = false}}\n[per_method."mine.py"]\nset = {{w_adv = 0.5}}\n')
    res = run("sweep", specs / "s.toml", "--quiet", cwd=tmp_path)  # started from elsewhere
    assert res.exit_code == 0, res.output
    saved = json.loads(next((tmp_path / "o").glob("mine_*/config.json")).read_text())
    assert saved["w_adv"] == 0.5 and saved["method"] == str(specs / "mine.py")


# ------------------------------------------------------------------------------------------------------------
# names that would leave --out or take a folder of the tool's


@pytest.mark.parametrize("tag", ["x.partial", "x.replaced"])
def test_a_tag_that_names_a_working_folder_is_refused(root, tmp_path, tag):
    b = root / "i3d"
    common = ["train", "--method", "dann", "--source", b / "S_train.zarr", "--target", b / "T_train.zarr", "--eval",
              b / "T_test.zarr", "--out", tmp_path, *SHORT]
    assert run(*common, "--set", "tag=x").exit_code == 0
    one_line(run(*common, "--set", f"tag={tag}"), f"tag='{tag}'", "this tool uses while it writes a run")
    assert (tmp_path / "dann_S_train-T_train_s0_x" / "final.json").is_file()  # the complete run is untouched


# ------------------------------------------------------------------------------------------------------------
# late refusals, made before the work


@pytest.fixture(scope="module")
def epic100(tmp_path_factory):
    from adapt.importer import import_features
    from tests.test_importer import challenge_pickle
    tmp = tmp_path_factory.mktemp("epic100")
    for i, (split, n) in enumerate((("source_val", 24), ("target_val", 24), ("source_train", 24),
                                    ("target_train", 24))):
        challenge_pickle(tmp / f"{split}.pkl", split, n, i, shift=float(i % 2))
        import_features(tmp / f"{split}.pkl", split, tmp / "features" / "tbn" / f"{split}.zarr")
    return tmp


@pytest.mark.parametrize("select, extra, words", [
    ("dev", {}, ["--select dev: needs held-out source clips", "source_holdout"]),
    ("entropy", {"validators": False}, ["--select entropy: the tuning runs have validators off"]),
    ("oracle", {}, ["missing", "target_test.zarr"]),
])
def test_the_protocol_refuses_before_tuning(epic100, tmp_path, select, extra, words):
    from adapt.protocol import run_protocol
    from featstore.errors import UserError
    spec = {"methods": ["source_only"], "seeds": [0], "backbone": "tbn", "features_root": str(epic100 / "features"),
            "set": {"epochs": None, "lr_epochs": [], "steps": 4, "batch_source": 4, "batch_target": 4, **extra}}
    with pytest.raises(UserError) as e:
        run_protocol(spec, tmp_path / "p", select, progress=False)
    text = str(e.value)
    assert all(w in text for w in words), text
    assert not (tmp_path / "p" / "tune").exists()  # nothing trained


def test_report_leaves_out_a_run_it_cannot_read_says_so_and_exits_0(root, tmp_path):
    b = root / "i3d"
    for seed in (0, 1, 2):
        assert run("train", "--method", "source_only", "--source", b / "S_train.zarr", "--target",
                   b / "T_train.zarr", "--eval", b / "T_test.zarr", "--out", tmp_path / "runs", "--seed", seed,
                   *SHORT).exit_code == 0
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    metrics = runs[0] / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-20])                    # cut
    final = json.loads((runs[1] / "final.json").read_text())
    (runs[1] / "final.json").write_text(json.dumps({**final, "action_top1": 1.0}))  # EPIC-100 keys, but not all
    res = run("report", tmp_path / "runs", "--no-plots")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "metrics.jsonl cut or damaged" in text and "final.json has no verb_top1" in text
    assert "(1 runs)" in (tmp_path / "runs" / "report.md").read_text()


# ------------------------------------------------------------------------------------------------------------
# read-only folders (as root, whom permissions do not stop, the refusal is injected at the same call)


def _read_only(monkeypatch, folder: Path, calls):
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    for module, name in calls:
        real = getattr(module, name)

        def refuse(*a, _real=real, **k):
            where = k.get("dir") or (a[0] if a else "")
            if str(where).startswith(str(folder)):
                raise PermissionError(13, "Permission denied", str(where))
            return _real(*a, **k)
        monkeypatch.setattr(module, name, refuse)


def test_read_only_folders_are_one_line(root, tmp_path, monkeypatch):
    import tempfile
    b = root / "i3d"
    assert run("train", "--method", "source_only", "--source", b / "S_train.zarr", "--target", b / "T_train.zarr",
               "--eval", b / "T_test.zarr", "--out", tmp_path / "theirs", *SHORT).exit_code == 0
    ro = tmp_path / "theirs"
    _read_only(monkeypatch, ro, [(tempfile, "mkstemp")])
    one_line(run("report", ro, "--no-plots"), str(ro), "cannot write the report there", "--out")
    assert run("report", ro, "--no-plots", "--out", tmp_path / "mine").exit_code == 0  # elsewhere: fine
    monkeypatch.undo()
    locked = tmp_path / "ro_sweep"
    from adapt import runs as R
    _read_only(monkeypatch, locked, [(R.os, "open")])
    spec = tmp_path / "s.toml"
    spec.write_text(f'methods = ["source_only"]\npairs = [["{b}/S_train.zarr", "{b}/T_train.zarr", '
                    f'"{b}/T_test.zarr"]]\nout = "{locked}"\nset = {{steps = 8, stage1_steps = 4}}\n')
    one_line(run("sweep", spec, "--quiet"), str(locked), "cannot write there")
    monkeypatch.undo()
    from tests.test_importer import challenge_pickle
    challenge_pickle(tmp_path / "t.pkl", "target_val", 8, 0)
    ro_store = tmp_path / "ro_store"
    ro_store.mkdir()
    if os.geteuid() == 0:
        real = Path.mkdir

        def refuse(self, *a, **k):
            if str(self).startswith(str(ro_store) + "/"):
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *a, **k)
        monkeypatch.setattr(Path, "mkdir", refuse)
    else:
        ro_store.chmod(0o555)
    one_line(run("import-features", tmp_path / "t.pkl", "--manifest", "target_val", "--out", ro_store / "s.zarr"),
             str(ro_store), "cannot write a store there")


# ------------------------------------------------------------------------------------------------------------
# signals at any moment


def _caught(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (its SigCgt mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt")), 16)
    return bool(mask >> (sig - 1) & 1)


def test_ctrl_c_while_the_tool_starts_is_one_line(root, tmp_path):
    b = root / "i3d"
    p = subprocess.Popen([sys.executable, "cli.py", "train", "--method", "dann", "--source", str(b / "S_train.zarr"),
                          "--target", str(b / "T_train.zarr"), "--out", str(tmp_path), "--quiet"], cwd=ROOT,
                         env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: _caught(p.pid, signal.SIGTERM) or p.poll() is not None, "the tool's first handler")
    p.send_signal(signal.SIGINT)  # while it imports torch and the stages, before the command runs
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 130 and "Traceback" not in out and "interrupted" in out, out
    assert not any(tmp_path.iterdir())


def test_sigterm_while_training_is_one_line_and_keeps_what_is_complete(root, tmp_path):
    b = root / "i3d"
    p = subprocess.Popen([sys.executable, "cli.py", "train", "--method", "dann", "--source", str(b / "S_train.zarr"),
                          "--target", str(b / "T_train.zarr"), "--eval", str(b / "T_test.zarr"), "--out",
                          str(tmp_path), "--quiet", "--set", "steps=100000", "--set", "eval_every=1",
                          "--set", "batch_source=4", "--set", "batch_target=4", "--set", "validators=false"],
                         cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "dann_S_train-T_train_s0.partial" / "metrics.jsonl"
    wait_for(lambda: (metrics.is_file() and metrics.stat().st_size > 0) or p.poll() is not None, "its first evaluation")
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 143 and "Traceback" not in out, out
    assert "terminated (SIGTERM)" in out and "runs already complete are kept" in out


# ------------------------------------------------------------------------------------------------------------
# silent choices said, absurd values refused, text printed as written


def test_a_store_without_audio_says_the_run_leaves_audio_out(tmp_path):
    b = tmp_path / "i3d"
    b.mkdir()
    three = {"rgb": (8,), "flow": (8,), "audio": (8,)}
    make_store(b / "S.zarr", 24, 4, 1, three, 0.0, 1)
    make_store(b / "T.zarr", 24, 4, 1, {"rgb": (8,), "flow": (8,)}, 1.0, 2)
    make_store(b / "E.zarr", 12, 4, 1, three, 1.0, 3)
    res = run("train", "--method", "source_only", "--source", b / "S.zarr", "--target", b / "T.zarr", "--eval",
              b / "E.zarr", "--out", tmp_path / "o", *SHORT)
    assert res.exit_code == 0, res.output
    assert "modality audio left out: the target store has none (the run trains on rgb, flow)" in \
        " ".join(res.output.split())


def test_absurd_steps_are_refused(root, tmp_path):
    b = root / "i3d"
    one_line(run("train", "--method", "dann", "--source", b / "S_train.zarr", "--target", b / "T_train.zarr",
                 "--out", tmp_path, "--steps", "1000000000000"), "steps=1000000000000", "would run for years")


def test_error_text_is_printed_as_written(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "two.py").write_text("from adapt.methods.dann import DANN\n\n\nclass A(DANN):\n    name='a'\n")
    res = run("train", "--method", f"{tmp_path}/m/two.py:Zzz", "--source", "x.zarr", "--target", "y.zarr")
    one_line(res, "two.py has no class Zzz", "(its methods: A)")
    res = run("inspect", tmp_path / "f" / ":smile:.zarr")
    one_line(res, ":smile:.zarr")


def test_a_refused_sweep_leaves_no_folder(root, tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(f'methods = ["source_only"]\npairs = [["{tmp_path}/none.zarr", "{root}/i3d/T_train.zarr"]]\n'
                    f'out = "{tmp_path}/new/out"\n')
    one_line(run("sweep", spec, "--quiet"), "missing")
    assert not (tmp_path / "new").exists()
