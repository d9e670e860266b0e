"""docs/adapters.md's methods table is the registry's own rendering."""

from pathlib import Path

from surgeon.methods import method_names
from surgeon.methods.docs_table import BEGIN, END, methods_table, with_methods_table

PAGE = Path(__file__).resolve().parents[3] / "docs" / "adapters.md"


def test_the_methods_table_of_the_docs_is_current():
    text = PAGE.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "docs/adapters.md lost the methods table's markers"
    assert with_methods_table(text) == text, (
        "docs/adapters.md's methods table is stale: write it again as surgeon/methods/docs_table.py says")


def test_the_table_has_a_row_per_registered_method():
    rows = [line for line in methods_table().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == method_names()
