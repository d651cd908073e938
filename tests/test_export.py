"""Export mechanics: graphs past the external-data threshold keep their weights in one
side file, the bundle lists it, and the runtime loads it."""
from __future__ import annotations

import numpy as np
import torch


def test_large_graph_goes_to_one_external_data_file(tmp_path, monkeypatch):
    import onnxruntime as ort

    import scops.export.onnx_stages as stages
    monkeypatch.setattr(stages, "EXTERNAL_DATA_BYTES", 1 << 20)      # 2 MiB of weights counts as large
    spec = stages.OnnxStageSpec(name="t", file="t.onnx", inputs=(stages.TensorSpec("x", ("batch", 512)),),
                                outputs=(stages.TensorSpec("y", ("batch", 1024)),))
    module = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU())
    result = stages.export_and_validate(module, spec, tmp_path, log=lambda s: None)
    assert result["max_abs_diff"] <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx", "t.onnx.data"]
    assert (tmp_path / "t.onnx").stat().st_size < (1 << 16)           # the weights are not inside
    x = np.random.default_rng(0).standard_normal((3, 512), dtype=np.float32)
    got = ort.InferenceSession(str(tmp_path / "t.onnx")).run(None, {"x": x})[0]
    with torch.no_grad():
        assert np.max(np.abs(got - module(torch.from_numpy(x)).numpy())) <= 1e-4
