"""The README's Python example runs as written (it is the first thing users copy)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def test_the_readme_example_runs():
    text = README.read_text()
    assert "```python\n" in text, "README.md lost its Python example"
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(example, str(README), "exec"), namespace)
    match, bank = namespace["match"], namespace["bank"]
    # The in-place warm re-match left a consistent result: its rows are the bank under its perms.
    torch = namespace["torch"]
    assert torch.equal(match.permuted, namespace["permute"](bank, match.index_maps))
    assert set(namespace["curve"].loss_barrier) == {"train", "test"}


def test_the_documents_point_only_inside_the_project():
    for document in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        text = document.read_text()
        assert "../shared" not in text, f"{document.name} points outside the project"
    assert (REPO / "docs" / "DESIGN.md").exists()
