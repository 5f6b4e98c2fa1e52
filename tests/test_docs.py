"""The documentation shipped in docs/ matches the code: record fields (parsed from the schema
tables) against real records, CLI flags against the parser, links that resolve."""
import argparse
import json
import re

import pytest

from conftest import ROOT
from tpmpi.cli import main, make_parser

DOCS = ROOT / "docs"
ROW = re.compile(r"^\|\s*`([A-Za-z_][A-Za-z0-9_.]*)`\s*\|(.*)$")


def schema(section: str) -> dict:
    """{field path: the rest of its table row} of the table under ``## <section>``."""
    text = (DOCS / "record-schema.md").read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = match.group(2)
    assert rows, section
    return rows


def _check(rec: dict, rows: dict, *, bench: bool) -> None:
    top = {f for f, rest in rows.items() if "." not in f and (bench or "*(bench)*" not in rest)}
    assert set(rec) == top, (sorted(set(rec) - top), sorted(top - set(rec)))
    children: dict = {}
    for field in rows:
        if "." in field:
            parent, child = field.rsplit(".", 1)
            children.setdefault(parent, set()).add(child)
    for parent, documented in children.items():
        for path, value in _resolve(rec, parent.split(".")):
            if value is None:
                continue
            if parent == "blas":  # threadpoolctl's fields differ between libraries and GPUs
                assert set(value) <= documented, (path, set(value) - documented)
            else:
                assert set(value) == documented, (path, set(value) ^ documented)


def _resolve(obj, parts, path=""):
    """(path, value) of every match of ``parts`` ("PHASE" matches any key)."""
    if not parts:
        yield path, obj
        return
    if not isinstance(obj, dict):
        return
    head, rest = parts[0], parts[1:]
    keys = list(obj) if head == "PHASE" else [head]
    for key in keys:
        if key in obj:
            yield from _resolve(obj[key], rest, f"{path}.{key}")


def _records(path) -> list:
    return [json.loads(line) for line in open(path).read().splitlines() if line.strip()]


def test_run_record_fields_are_documented(tmp_path):
    from mpi4py import MPI

    out = tmp_path / "run.jsonl"
    argv = ["run", "--m", "6", "--k", "5", "--n", "4", "--iters", "2", "--warmup", "0",
            "--json", str(out)]
    assert main(argv + ["--backward", "--baseline", "--measure-overlap"], MPI.COMM_SELF) == 0
    assert main(argv + ["--scheme", "mlp", "--k", "4"], MPI.COMM_SELF) == 0
    rows = schema("Scheme record")
    full, plain = _records(out)
    assert full["overlap"] and full["spread"]["baseline_s"] and full["bwd_s"] is not None
    for rec in (full, plain):
        _check(rec, rows, bench=False)


def test_bench_and_collective_record_fields_are_documented(tmp_path):
    from mpi4py import MPI

    out, coll = tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert main(["bench", "--m", "4", "--k", "4", "--n", "4", "--iters", "1", "--warmup", "0",
                 "--json", str(out)], MPI.COMM_SELF) == 0
    (rec,) = _records(out)
    _check(rec, schema("Scheme record"), bench=True)
    assert main(["bench", "--collective", "allreduce", "-b", "8", "-e", "8", "--iters", "1",
                 "--json", str(coll)], MPI.COMM_SELF) == 0
    (crec,) = _records(coll)
    _check(crec, schema("Collective record"), bench=True)


@pytest.mark.parametrize("section,cls", [("Scheme record", "RunRecord"),
                                         ("Collective record", "CollectiveRecord")])
def test_record_dataclasses_have_the_documented_fields_in_order(section, cls):
    import dataclasses

    from tpmpi.studies import record

    top = [f for f in schema(section) if "." not in f]
    assert [f.name for f in dataclasses.fields(getattr(record, cls))] == top


def test_schema_rows_say_unit_and_statistic():
    for section in ("Scheme record", "Collective record"):
        for field, rest in schema(section).items():
            cells = [c.strip() for c in rest.split("|")]
            assert len(cells) >= 3 and all(cells[:3]), (field, cells)


def _flags(parser) -> set:
    return {o for a in parser._actions for o in a.option_strings
            if o.startswith("--") and o not in ("--help", "--version")}


def test_cli_reference_lists_every_flag():
    text = (DOCS / "cli.md").read_text()
    sections = {s.split("\n", 1)[0].strip(): s for s in text.split("\n## ")[1:]}
    (sub,) = [a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == set(sections)
    for name, parser in sub.choices.items():
        documented = set(re.findall(r"`(--[a-z-]+)`", sections[name]))
        if name == "bench":  # "all the flags of run except --check and --baseline"
            documented |= set(re.findall(r"`(--[a-z-]+)`", sections["run"]))
        missing = _flags(parser) - documented
        assert not missing, (name, missing)


LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


@pytest.mark.parametrize("page", ["README.md", "slurm/README.md"] +
                         [f"docs/{p.name}" for p in sorted(DOCS.glob("*.md"))])
def test_links_resolve_and_stay_in_the_repository(page):
    path = ROOT / page
    text = path.read_text()
    assert "shared/DESIGN" not in text and "../shared" not in text
    for target, _ in LINK.findall(text):
        if "://" in target:
            continue
        resolved = (path.parent / target).resolve()
        assert resolved.exists(), (page, target)
        assert ROOT in resolved.parents or resolved == ROOT, (page, target)


def test_readme_points_to_the_docs():
    text = (ROOT / "README.md").read_text()
    for page in ("docs/record-schema.md", "docs/cli.md", "docs/cluster.md",
                 "docs/statistics.md", "docs/layouts.md"):
        assert f"]({page}" in text, page


def test_readme_package_layout_names_every_module():
    """README's "Layout of the package" names every module of each subpackage, and no module
    that does not exist."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout of the package"):text.index("## Documentation")]
    package = ROOT / "tpmpi"
    for sub in ("core", "layers", "models", "checkpoint", "studies"):
        bullet = re.search(rf"^\* \*\*`tpmpi/{sub}/`\*\*(.*?)(?=^\* |\Z)", section, re.M | re.S)
        assert bullet, sub
        named = set(re.findall(r"`(\w+)\.py`", bullet.group(1)))
        on_disk = {p.stem for p in (package / sub).glob("*.py") if p.stem != "__init__"}
        assert named == on_disk, (sub, sorted(named ^ on_disk))


def _keywords(cls) -> set:
    """The constructor keywords a user can pass to ``cls``: its own and, through ``**kwargs``,
    those of the ParallelLinear base; private ones (``_dense``) left out."""
    import inspect

    from tpmpi.layers.base import ParallelLinear

    names = set()
    for klass in (cls, ParallelLinear) if issubclass(cls, ParallelLinear) else (cls,):
        for p in list(inspect.signature(klass.__init__).parameters.values())[1:]:
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and not p.name.startswith("_"):
                names.add(p.name)
    return names


@pytest.mark.parametrize("name", ["ColumnParallelLinear", "RowParallelLinear", "ParallelMLP",
                                  "TileParallelLinear"])
def test_api_doc_lists_every_constructor_keyword_of_every_public_layer(name):
    """docs/api.md shows each layer's whole signature and explains every keyword in its table
    (check_finite, check_replicated, overlap, sequence_parallel were missing once)."""
    import tpmpi

    text = (DOCS / "api.md").read_text()
    call = re.search(rf"tpmpi\.{name}\((.*?)\)\n", text, re.S)
    assert call, name
    documented = {re.sub(r"=.*", "", arg.strip()) for arg in call.group(1).split(",")} - {"*"}
    assert documented == _keywords(getattr(tpmpi, name)), name
    table = {m.group(1) for m in re.finditer(r"^\| `([a-z_]+)` \|", text, re.M)}
    assert _keywords(getattr(tpmpi, name)) - {"in_features", "out_features", "d_model",
                                              "d_hidden"} <= table, name
