"""The `multiflow` command line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multiflow import Masks
from multiflow.cli import main


def test_default_prune_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--out", str(out), "--no-progress"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "layer_sparsity.png",
        "masks_multiflow_s0.63.safetensors",
        "masks_multiflow_s0.75.safetensors",
        "masks_multiflow_s0.90.safetensors",
        "report.json",
        "report.md",
    ]
    report = json.loads((out / "report.json").read_text())
    for label, s in (("s=0.63", 0.63), ("s=0.75", 0.75), ("s=0.90", 0.9)):
        r = report["results"][label]
        assert r["achieved_sparsity"] == pytest.approx(s, abs=2e-3)
        assert set(r["modality_sparsity"]) == {"vision", "text"}
        m = Masks.load(r["file"])
        assert m.metadata["sparsity"] == s and m.metadata["method"] == "multiflow"
    assert (out / "layer_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "calibration" in report["timings_s"]
    printed = capsys.readouterr().out
    assert "s=0.75" in printed

    assert main(["inspect", str(out / "masks_multiflow_s0.75.safetensors")]) == 0
    assert "vision" in capsys.readouterr().out


def test_nm_and_baseline(tmp_path):
    out = tmp_path / "nm"
    assert main(["prune", "--out", str(out), "--no-progress", "--nm", "2:4", "--batches", "1", "--batch-size", "2"]) == 0
    m = Masks.load(out / "masks_multiflow_2of4.safetensors")
    for n, t in m.items():
        assert (t.reshape(t.shape[0], -1, 4).sum(-1) == 2).all()
    assert main(["prune", "--out", str(out), "--no-progress", "--method", "omp", "--sparsity", "0.5"]) == 0
    assert Masks.load(out / "masks_omp_s0.50.safetensors").sparsity == pytest.approx(0.5, abs=1e-3)


def test_json_data(tmp_path):
    from multiflow.data import procedural_sample

    entries = []
    for i in range(4):
        img, cap = procedural_sample(i, 48)
        img.save(tmp_path / f"{i}.png")
        entries.append({"image": f"{i}.png", "caption": cap})
    (tmp_path / "data.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    rc = main(["prune", "--out", str(out), "--no-progress", "--data", str(tmp_path / "data.json"),
               "--batches", "2", "--batch-size", "2", "--sparsity", "0.5"])
    assert rc == 0
    assert json.loads((out / "report.json").read_text())["calibration_samples"] == 4


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["prune", "--model", "no-such-model"], "unknown model"),
        (["prune", "--data", "/nonexistent/data.json"], "data.json"),
        (["inspect", "/nonexistent/m.safetensors"], "not found"),
    ],
)
def test_errors_are_one_line(argv, needle, tmp_path, capsys):
    rc = main(argv + (["--out", str(tmp_path / "o")] if argv[0] == "prune" else []))
    assert rc != 0
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_sparsity_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "--sparsity", "1.5"])
    assert e.value.code != 0
    assert "sparsity" in capsys.readouterr().err


def test_console_script_installed():
    exe = Path(sys.executable).with_name("multiflow")
    assert exe.exists(), "the multiflow console script is not installed next to python"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "prune" in r.stdout


def test_sigint_leaves_no_partial_output(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    exe = Path(sys.executable).with_name("multiflow")
    proc = subprocess.Popen([str(exe), "prune", "--no-progress", "--batches", "400", "--batch-size", "8",
                             "--out", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # printed when calibration starts
        assert "calibrating" in line, line
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert rc == 130
    assert "interrupted while calibrating batch" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def _main_with_sigint_while_importing_torch(argv, prelude=""):
    """cli.main(argv) in a fresh Python that runs ``prelude`` first and sends itself SIGINT
    while torch is being imported (after checking `import multiflow.cli` did not import it)."""
    code = f"""
import builtins, os, signal, sys
{prelude}
import multiflow.cli as cli
assert "torch" not in sys.modules, "import multiflow.cli imported torch"
real_import = builtins.__import__
def sending(name, *args, **kwargs):
    if name == "torch" and "torch" not in sys.modules:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while torch is being imported
    return real_import(name, *args, **kwargs)
builtins.__import__ = sending
sys.exit(cli.main({list(argv)!r}))
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_sigint_while_importing_torch(tmp_path):
    """Ctrl-C that arrives while the command line imports torch (its first second) is held back
    until the import is done, then ends the run like any other interrupt: exit 130, one line,
    no traceback, nothing written. `import multiflow.cli` itself does not import torch."""
    out = tmp_path / "run"
    r = _main_with_sigint_while_importing_torch(["prune", "--no-progress", "--out", str(out)])
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip() == "multiflow: interrupted while starting (importing torch); nothing was written"
    assert not out.exists()


def test_submodules_after_a_plain_import():
    """The public names load on first use; the submodules are attributes after `import
    multiflow`, as they were when __init__ imported them."""
    code = ("import sys, multiflow; assert 'torch' not in sys.modules; "
            "print(multiflow.models.build_model.__name__, multiflow.masks.Masks is multiflow.Masks, "
            "sorted(set(multiflow.__all__) - set(dir(multiflow))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["build_model", "True", "[]"], r.stderr


def test_sigint_ignored_stays_ignored(tmp_path):
    """Started with Ctrl-C ignored (nohup, a background job), the command line leaves it so."""
    r = _main_with_sigint_while_importing_torch(["inspect", str(tmp_path / "missing.safetensors")],
                                                 "signal.signal(signal.SIGINT, signal.SIG_IGN)")
    assert r.returncode == 1 and "mask file not found" in r.stderr, r.stderr


def _json_dataset(tmp_path, n, bad):
    from multiflow.data import procedural_sample

    entries = []
    for i in range(n):
        name = f"{i}.png"
        if i in bad:
            (tmp_path / name).write_bytes(b"this is not an image")
        elif i != n - 1 or (n - 1) not in bad:
            procedural_sample(i, 32)[0].save(tmp_path / name)
        entries.append({"image": name, "caption": f"caption {i}"})
    (tmp_path / "data.json").write_text(json.dumps(entries))
    return tmp_path / "data.json"


def test_unreadable_images_are_skipped_with_a_count(tmp_path, capsys):
    from multiflow.data import ImageCaptionDataset, calibration_batches

    path = _json_dataset(tmp_path, 24, bad={3})
    ds = ImageCaptionDataset(path, tmp_path)
    batches = calibration_batches(ds, batch_size=4, num_batches=3, image_size=32)
    assert [b["pixel_values"].shape[0] for b in batches] == [4, 4, 4]  # later samples fill the gap
    assert [i for i, _ in batches.skipped] == [3] and "3.png" in batches.skipped[0][1]
    rc = main(["prune", "--no-progress", "--data", str(path), "--batches", "3", "--batch-size", "4",
               "--sparsity", "0.5", "--out", str(tmp_path / "out")])
    assert rc == 0
    assert "skipped 1 samples with unreadable images" in capsys.readouterr().err


def test_the_unreadable_fraction_counts_every_sample_read(tmp_path):
    """max_bad_fraction is a fraction of the samples read, wherever the bad ones sit: two
    broken images among the first eight of 40 (5%) are skipped; one of five (20%) is an error."""
    from multiflow.data import ImageCaptionDataset, calibration_batches

    path = _json_dataset(tmp_path, 40, bad={2, 7})
    batches = calibration_batches(ImageCaptionDataset(path, tmp_path), batch_size=4, image_size=32)
    assert [i for i, _ in batches.skipped] == [2, 7] and len(batches) == 10 - 1 + 1  # 38 samples: 10 batches
    small = tmp_path / "small"
    small.mkdir()
    path = _json_dataset(small, 5, bad={1})
    with pytest.raises(ValueError, match="1 of the 2 samples read have unreadable images: more than max_bad"):
        calibration_batches(ImageCaptionDataset(path, small), batch_size=4, image_size=32)


def test_too_many_unreadable_images_is_an_error(tmp_path, capsys):
    path = _json_dataset(tmp_path, 6, bad={0, 1, 2})
    rc = main(["prune", "--no-progress", "--data", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc != 0 and "unreadable images" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_local_checkpoint_folder(tmp_path, task):
    from multiflow.models.blip import build_blip_tiny

    build_blip_tiny(task).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    rc = main(["prune", "--model", str(tmp_path / "ckpt"), "--no-progress", "--batches", "1", "--batch-size", "2",
               "--sparsity", "0.5", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model_class"] == {"caption": "BlipForConditionalGeneration", "vqa": "BlipForQuestionAnswering"}[task]
    m = Masks.load(out / "masks_multiflow_s0.50.safetensors")
    assert any(n.startswith("text_decoder.") for n in m)


def test_sparsify_command(tmp_path, capsys):
    import multiflow_kernels as mk
    from multiflow.models.blip import build_blip_tiny

    out = tmp_path / "run"
    assert main(["prune", "--no-progress", "--sparsity", "0.75", "--batches", "2", "--out", str(out)]) == 0
    maskfile = out / "masks_multiflow_s0.75.safetensors"
    target = tmp_path / "sparse.safetensors"
    assert main(["sparsify", "blip-tiny", str(maskfile), "--out", str(target)]) == 0
    printed = capsys.readouterr().out
    assert "total (sparse layers)" in printed and str(target) in printed
    model = mk.sparsify(build_blip_tiny(seed=3), Masks.load(maskfile))
    mk.load_sparse(model, target)  # the file loads into a model sparsified with the same masks
    assert main(["sparsify", "blip-tiny", str(maskfile), "--format", "2:4", "--out", str(tmp_path / "b")]) != 0
    err = capsys.readouterr().err
    assert "not 2:4" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()
    assert main(["sparsify", "blip-tiny", str(maskfile), "--format", "auto", "--out", str(tmp_path / "c")]) == 0
    assert "format auto: bitmap" in capsys.readouterr().out


def test_sparsify_rebuilds_the_pruned_model(tmp_path, capsys):
    """sparsify takes the seed and task the mask file records: the same model as the pruning
    run (another seed is another random model, refused), and --out is checked first."""
    import multiflow_kernels as mk
    from multiflow.models.blip import build_blip_tiny

    out = tmp_path / "run"
    assert main(["prune", "--no-progress", "--task", "caption", "--seed", "5", "--sparsity", "0.5", "--batches", "1",
                 "--out", str(out)]) == 0
    maskfile = out / "masks_multiflow_s0.50.safetensors"
    masks = Masks.load(maskfile)
    assert masks.metadata["seed"] == 5 and masks.metadata["task"] == "caption"
    target = tmp_path / "sparse.safetensors"
    assert main(["sparsify", "blip-tiny", str(maskfile), "--out", str(target)]) == 0
    want = mk.sparsify(build_blip_tiny(task="caption", seed=5), masks).state_dict()
    got = mk.load_sparse(mk.sparsify(build_blip_tiny(task="caption", seed=0), masks), target).state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    capsys.readouterr()

    assert main(["sparsify", "blip-tiny", str(maskfile), "--seed", "0", "--out", str(tmp_path / "s0")]) != 0
    assert "seed 5" in capsys.readouterr().err and not (tmp_path / "s0").exists()
    before = maskfile.read_bytes()
    assert main(["sparsify", "blip-tiny", str(maskfile), "--out", str(maskfile)]) != 0
    assert "is the mask file" in capsys.readouterr().err and maskfile.read_bytes() == before
    assert main(["sparsify", "blip-tiny", str(maskfile), "--out", str(tmp_path)]) != 0
    assert "is a folder" in capsys.readouterr().err
    assert main(["sparsify", "blip-tiny", str(maskfile), "--out", str(tmp_path / "no" / "such.safetensors")]) != 0
    assert "does not exist" in capsys.readouterr().err


def test_corrupt_data_json_is_one_line(tmp_path, capsys):
    (tmp_path / "data.json").write_text("[{not json")
    rc = main(["prune", "--no-progress", "--data", str(tmp_path / "data.json"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and "data.json" in err and "Traceback" not in err


def test_unwritable_output_folder(tmp_path, monkeypatch):
    import os

    from multiflow_kernels._io import atomic_write

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    with pytest.raises(PermissionError, match="not writable"):
        atomic_write(tmp_path / "x.safetensors", lambda tmp: Path(tmp).write_text("x"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_umask_mode(tmp_path, umask):
    """atomic_write's temporary file is 0600 (mkstemp); the result must get the mode a plain
    open() would give it, so outputs on a shared machine are readable as usual."""
    import os
    import stat

    from multiflow_kernels._io import atomic_write

    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "x.txt", lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_failed_write_leaves_the_previous_outputs(tmp_path, monkeypatch, capsys):
    """The outputs of a run are written together: an interrupt while writing the last one (the
    plot) leaves every file of the previous run as it was, and no temporary behind."""
    from multiflow import cli

    out = tmp_path / "out"
    args = ["prune", "--no-progress", "--batches", "1", "--batch-size", "2", "--sparsity", "0.5", "--out", str(out)]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "layer_sparsity.png" in before and len(before) == 4

    def interrupted(results):
        def write(tmp):
            raise KeyboardInterrupt

        return write

    monkeypatch.setattr(cli, "layer_sparsity_plot", interrupted)
    assert main(args + ["--seed", "7"]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _rename_failing_at(n, error, calls=None):
    """An os.replace whose n-th rename of a temporary file (an output put in place) raises
    ``error``; the others, and the renames of backups, are done."""
    import os

    real_replace, calls = os.replace, [] if calls is None else calls

    def replace(src, dst):
        if str(src).endswith(".tmp"):
            calls.append(dst)
            if len(calls) == n:
                raise error
        return real_replace(src, dst)

    return replace


def test_a_failed_rename_puts_back_the_previous_outputs(tmp_path, monkeypatch, capsys):
    """A rename that fails after others have succeeded (here the third of four) puts the
    replaced files back: the previous run's outputs stay whole, no new file and no temporary or
    backup link is left. An output path that is a folder is refused before any rename."""
    import os

    out = tmp_path / "out"
    args = ["prune", "--no-progress", "--batches", "1", "--batch-size", "2", "--sparsity", "0.5", "--out", str(out)]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real_replace, calls = os.replace, []
    monkeypatch.setattr(os, "replace", _rename_failing_at(3, OSError(28, "No space left on device"), calls))
    assert main(args + ["--seed", "7"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert len(calls) == 3
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(os, "replace", real_replace)

    (out / "report.md").unlink()
    (out / "report.md").mkdir()
    assert main(args + ["--seed", "7"]) == 1
    assert "output path is a folder, not a file" in capsys.readouterr().err
    del before["report.md"]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "report.md"])


@pytest.mark.parametrize("links", [True, False])
def test_atomic_write_all_puts_everything_back(tmp_path, monkeypatch, links):
    """The renames fail at the third file: the two replaced before it, the third (hard-linked
    or moved aside, where the file system has no hard links) and a symbolic link among them are
    as they were, the new file is gone, and no temporary or backup is left."""
    import os

    from multiflow_kernels._io import atomic_write_all

    (tmp_path / "target").write_text("linked")
    (tmp_path / "a").write_text("old a")
    (tmp_path / "b").symlink_to("target")
    (tmp_path / "d").write_text("old d")
    before = {p.name: (p.is_symlink(), p.read_text()) for p in tmp_path.iterdir()}
    names = ["a", "b", "new", "d"]
    if not links:
        monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(95, "no hard links")))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", _rename_failing_at(4, OSError(5, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        atomic_write_all([(tmp_path / n, lambda tmp, n=n: Path(tmp).write_text(f"new {n}")) for n in names])
    assert {p.name: (p.is_symlink(), p.read_text()) for p in tmp_path.iterdir()} == before
    monkeypatch.setattr(os, "replace", real_replace)
    atomic_write_all([(tmp_path / n, lambda tmp, n=n: Path(tmp).write_text(f"new {n}")) for n in names])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "d", "new", "target"]
    assert all((tmp_path / n).read_text() == f"new {n}" for n in names) and not (tmp_path / "b").is_symlink()
    assert (tmp_path / "target").read_text() == "linked"


def test_atomic_write_all_keeps_a_backup_it_cannot_put_back(tmp_path, monkeypatch):
    """If putting a replaced file back fails too, its backup stays and the error names it."""
    import os

    from multiflow_kernels._io import atomic_write_all

    (tmp_path / "a").write_text("old a")
    (tmp_path / "b").write_text("old b")
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp") and str(dst).endswith("b") or str(src).endswith(".old"):
            raise OSError(5, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="I/O error") as e:
        atomic_write_all([(tmp_path / n, lambda tmp, n=n: Path(tmp).write_text(f"new {n}")) for n in "ab"])
    kept = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert len(kept) == 1 and kept[0].read_text() == "old a" and (tmp_path / "b").read_text() == "old b"
    notes = " ".join(getattr(e.value, "__notes__", []))
    assert str(kept[0]) in notes and "the previous" in notes


def test_a_corrupt_blip_checkpoint_is_one_line(tmp_path, capsys):
    from multiflow.models.blip import build_blip_tiny

    folder = tmp_path / "ck"
    build_blip_tiny("retrieval").save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    assert main(["prune", "--model", str(folder), "--no-progress", "--batches", "1", "--batch-size", "2",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("multiflow: error: cannot load the BLIP checkpoint in") and "SafetensorError" in err
    assert not out.exists()
    (folder / "config.json").write_text("[1, 2]")
    assert main(["prune", "--model", str(folder), "--no-progress", "--out", str(out)]) == 1
    assert "a JSON object expected, got list" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["file", "file/sub"])
def test_a_bad_out_folder_fails_before_calibrating(tmp_path, capsys, bad):
    (tmp_path / "file").write_text("not a folder")
    rc = main(["prune", "--no-progress", "--out", str(tmp_path / bad)])
    err = capsys.readouterr().err
    assert rc == 1 and "--out" in err and "calibrating" not in err


def test_sparsities_that_round_alike_get_their_own_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--no-progress", "--sparsity", "0.631", "0.634", "0.5", "--batches", "1",
                 "--out", str(out)]) == 0
    names = sorted(p.name for p in out.glob("masks_*"))
    assert names == ["masks_multiflow_s0.50.safetensors", "masks_multiflow_s0.631.safetensors",
                     "masks_multiflow_s0.634.safetensors"]
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["results"]) == ["s=0.50", "s=0.631", "s=0.634"]
    capsys.readouterr()
    assert main(["prune", "--no-progress", "--sparsity", "0.5", "0.50", "--out", str(tmp_path / "b")]) != 0
    assert "same sparsity twice" in capsys.readouterr().err
