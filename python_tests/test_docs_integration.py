"""docs/integration.md and docs/analysis.md: every python block runs as written, each in a fresh namespace."""

import pathlib
import re
import socket

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
NEEDS = {"peft": "peft", "transformers": "transformers", "safetensors": "safetensors",
         "BitsAndBytesConfig": "bitsandbytes"}


def _blocks(name):
    """``(doc, code, title)`` for each python block of ``docs/<name>``; title: the section it sits under."""
    path = DOCS / name
    text = path.read_text()
    out = []
    for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        title = re.findall(r"^#+ (.+)$", text[: match.start()], flags=re.M)[-1]
        out.append(pytest.param(path, match.group(1), id=f"{path.stem}: {title}"))
    return out


BLOCKS = _blocks("integration.md") + _blocks("analysis.md")


def test_the_docs_have_examples():
    assert len(_blocks("integration.md")) >= 8
    assert len(_blocks("analysis.md")) >= 1


@pytest.mark.parametrize("doc, code", BLOCKS)
def test_doc_block_runs(doc, code, monkeypatch, tmp_path):
    for module in sorted({m for word, m in NEEDS.items() if re.search(rf"\b(from|import) {word}\b", code)}):
        pytest.importorskip(module)
    if "init_process_group" in code:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
        for var in ("RANK", "WORLD_SIZE"):
            monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(doc), "exec"), {"__name__": "__doc_example__"})
