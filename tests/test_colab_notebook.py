"""Executes launch/colab_demo.ipynb top to bottom on CPU in fast mode (tiny model, a few SFT and RL
steps, a real CPU vLLM server for the RL part), as CI does."""
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "launch" / "colab_demo.ipynb"


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1200)
def test_colab_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    if not (REPO / ".venv-vllm" / "bin" / "vllm-serve-jaxrl").exists():
        pytest.skip("needs the CPU vLLM environment (make install-vllm)")
    monkeypatch.setenv("JAXRL_VL_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("JAXRL_VL_NOTEBOOK_DIR", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("JAXRL_VL_NOTEBOOK_INSTALL", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO / "launch")}})
    client.execute()  # raises CellExecutionError (with the cell's traceback) on any failing cell

    outputs = "\n".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", []))
    assert "fast mode: True" in outputs
    assert '"steps": 10' in outputs            # the SFT summary
    assert '"rl_steps": 2' in outputs          # the RL summary
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3                    # digits, SFT curves, RL curves
    assert (tmp_path / "sft" / "export" / "model.safetensors").exists()
    assert (tmp_path / "rl" / "metrics.jsonl").exists()
