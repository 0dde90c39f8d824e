"""docs/parameters.md is generated from the schema and must be kept in step with it."""
from pathlib import Path

from jaxscale.params import iter_parameters, markdown_docs

DOC = Path(__file__).resolve().parents[2] / "docs" / "parameters.md"


def test_committed_doc_equals_generated():
    assert DOC.read_text() == markdown_docs(), (
        "docs/parameters.md is stale: regenerate with `jaxscale show-config --markdown > docs/parameters.md`")


def test_doc_lists_every_parameter():
    text = DOC.read_text()
    assert all(f"`{info.path}`" in text for info in iter_parameters())
