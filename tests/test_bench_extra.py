"""The bench's own packages are the megamem[bench] extra: without one, `megamem bench` says which and how to add it,
in one error line, before anything is loaded."""

import sys

import pytest
from typer.testing import CliRunner

import megamem.bench
from megamem.cli import app


def forget_bench_modules(monkeypatch):
    """Make the next import of the bench's modules run them again (undone after the test)."""
    for name in [m for m in sys.modules if m.startswith("megamem.bench.")]:
        monkeypatch.delitem(sys.modules, name)
        monkeypatch.delattr(megamem.bench, name.rsplit(".", 1)[1], raising=False)


@pytest.mark.parametrize("package", ["matplotlib", "filelock"])
def test_bench_without_its_extra_names_the_package(package, monkeypatch, tmp_path):
    forget_bench_modules(monkeypatch)
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails as if it were not installed
    r = CliRunner().invoke(app, ["bench", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert package in lines[0] and "pip install 'megamem[bench]'" in lines[0]
    assert not (tmp_path / "run").exists()
