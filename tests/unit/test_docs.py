"""The documents against the tree: the README's folder table against the import contracts
of pyproject.toml and against what each package imports, and every file a document
names against the files that exist."""

import ast
import os
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
PACKAGES = CONTRACTS["root_packages"]
# Where a document names a file, these suffixes mark it as one.
FILE_SUFFIXES = ("py", "cc", "h", "md", "json", "yaml", "yml", "proto", "toml", "sh", "txt")
SKIPPED_DIRS = {".venv", ".git", "node_modules", "__pycache__"}


def folder_table() -> dict[str, str]:
    """README folder table: folder name (no slash) -> its 'may import' cell."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        for folder in re.findall(r"`([\w.]+)/`", cells[0]):
            rows[folder] = cells[2]
    return rows


def declared(cell: str) -> tuple[set[str] | None, set[str]]:
    """(modules a row may import, None for any; modules it says it never imports)."""
    allowed_text, _, never_text = cell.partition("never")
    if "everything below" in cell or cell.strip() == "anything":
        return None, set(re.findall(r"`([\w.]+)`", never_text))
    return set(re.findall(r"`([\w.]+)`", allowed_text)), set(re.findall(r"`([\w.]+)`",
                                                                        never_text))


def covers(entry: str, module: str) -> bool:
    return module == entry or module.startswith(entry + ".")


def first_party_imports(package: str) -> set[str]:
    """Modules of the other root packages that `package` imports (module.name deep)."""
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root in PACKAGES and root != package:
                    found.add(".".join(name.split(".")[:2]))
    return found


def test_the_folder_table_names_every_package():
    assert set(PACKAGES) <= set(folder_table()), \
        f"packages missing from the README's folder table: {set(PACKAGES) - set(folder_table())}"


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_what_its_row_allows(package):
    allowed, never = declared(folder_table()[package])
    imported = first_party_imports(package)
    if allowed is not None:
        stray = {m for m in imported if not any(covers(a, m) for a in allowed)}
        assert not stray, f"{package}/ imports {sorted(stray)}, which its row does not allow"
    broken = {m for m in imported for n in never if covers(n, m)}
    assert not broken, f"{package}/ imports {sorted(broken)}, which its row says it never does"


def test_no_row_allows_what_a_contract_forbids():
    table = folder_table()
    for contract in CONTRACTS["contracts"]:
        if contract["type"] == "forbidden":
            pairs = [(source, set(contract["forbidden_modules"]))
                     for source in contract["source_modules"]]
        elif contract["type"] == "independence":
            pairs = [(m, set(contract["modules"]) - {m}) for m in contract["modules"]]
        elif contract["type"] == "layers":
            layers = [set(layer.replace(" ", "").split("|")) for layer in contract["layers"]]
            pairs = [(m, set().union(*layers[:i + 1]) - {m})
                     for i, layer in enumerate(layers) for m in layer]
        else:
            pytest.fail(f"this test does not know contracts of type {contract['type']}")
        for source, forbidden in pairs:
            allowed, _ = declared(table[source])
            if allowed is None:
                continue
            clash = {a for a in allowed for f in forbidden if covers(f, a)}
            assert not clash, (f"the folder table lets {source}/ import {sorted(clash)}; "
                               f"contract '{contract['name']}' forbids it")


def named_files(text: str) -> set[str]:
    """Inline code spans and relative links of a document that name files or folders."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # commands and pictures, not names
    names = set()
    for span in re.findall(r"`([^`\s]+)`", text):
        if re.fullmatch(r"[\w.-]+(/[\w.-]+)+/?", span) or re.fullmatch(
                r"[\w-]+\.({})".format("|".join(FILE_SUFFIXES)), span):
            names.add(span)
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", link) and not link.startswith("#"):
            names.add("./" + link.split("#")[0])
    return names


def existing_names() -> set[str]:
    names = set()
    for _, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED_DIRS]
        names.update(subfolders, files)
    return names


@pytest.fixture(scope="module")
def everywhere() -> set[str]:
    return existing_names()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_a_document_names_only_files_that_exist(doc, everywhere):
    missing = []
    for name in sorted(named_files(doc.read_text())):
        if name.startswith("./"):  # a link, relative to the document
            found = (doc.parent / name).exists()
        elif "/" in name:  # a path from the repository's root, or from docs/
            first = name.split("/")[0]
            if not (ROOT / first).is_dir():
                continue  # a path in a container or a cache, not in this tree
            found = (ROOT / name.rstrip("/")).exists()
        else:  # a file name alone: some file of the tree has it
            found = name in everywhere
        if not found:
            missing.append(name)
    assert not missing, f"{doc.relative_to(ROOT)} names files that do not exist: {missing}"
