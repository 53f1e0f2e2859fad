"""docs/integration.md: every python block runs as written, each in a fresh namespace."""

import pathlib
import re
import socket

import pytest

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "integration.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
NEEDS = {"peft": "peft", "transformers": "transformers", "safetensors": "safetensors"}


def _title(code):
    """The section a block sits under, for the test id."""
    before = DOC.read_text().split(code)[0]
    return re.findall(r"^#+ (.+)$", before, flags=re.M)[-1]


def test_the_doc_has_examples():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("code", BLOCKS, ids=[_title(c) for c in BLOCKS])
def test_integration_doc_block_runs(code, monkeypatch, tmp_path):
    for module in sorted({m for word, m in NEEDS.items() if re.search(rf"\b(from|import) {word}\b", code)}):
        pytest.importorskip(module)
    if "init_process_group" in code:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
        for var in ("RANK", "WORLD_SIZE"):
            monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOC), "exec"), {"__name__": "__doc_example__"})
