"""tools/device/best_configs.py reads inductor's saved launch configurations (`*.best_config` beside a kernel's
source): each with the Triton kernels of its directory, filtered by name and by whether coordinate descent found it;
unreadable files are skipped."""
import json

from tools.device.best_configs import best_configs


def _kernel(root, name, src, config):
    d = root / name
    d.mkdir()
    (d / f"{name}.py").write_text(src)
    if config is not None:
        (d / "k.best_config").write_text(config if isinstance(config, str) else json.dumps(config))


def test_best_configs_pairs_each_configuration_with_its_kernel(tmp_path):
    _kernel(tmp_path, "aa", "@triton.jit\ndef triton_tem_fused_flex_attention_1(arg_Q, arg_K):\n    pass\n",
            {"num_warps": 8, "num_stages": 2, "found_by_coordesc": True, "triton_cache_hash": "x"})
    _kernel(tmp_path, "bb", "def triton_per_fused_rms_norm_2(in_ptr0):\n    pass\n",
            {"XBLOCK": 1, "RBLOCK": 1024, "num_warps": 4, "num_stages": 1})
    _kernel(tmp_path, "cc", "def triton_poi_fused_add_3(in_ptr0):\n    pass\n", "{not json")
    _kernel(tmp_path, "dd", "def triton_poi_fused_mul_4(in_ptr0):\n    pass\n", None)
    rows = best_configs(tmp_path)
    assert [r["kernels"] for r in rows] == [["triton_tem_fused_flex_attention_1"], ["triton_per_fused_rms_norm_2"]]
    assert rows[0]["config"] == {"num_warps": 8, "num_stages": 2} and rows[0]["found_by_coordesc"]
    assert not rows[1]["found_by_coordesc"]
    assert [r["kernels"] for r in best_configs(tmp_path, match="flex")] == [["triton_tem_fused_flex_attention_1"]]
    assert len(best_configs(tmp_path, coordesc_only=True)) == 1
